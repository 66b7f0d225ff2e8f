#!/usr/bin/env bash
# The GPU check: every GPU figure of the project from one command, eight steps, each under its own time limit.
# bench/GPU.md: how to run it on the lent GPU machine and how to commit what comes back.
#
#   bash bench/gpu_suite.sh [--rehearse] [--steps env,loss,...]
#
#   env    GPU, driver, torch/triton versions, commit, device-to-device copy bandwidth
#   loss   fused loss at E=4 B=256 C=1000 bf16 fwd+bwd against eager, torch.compile (static shapes, and
#          reduce-overhead) and Liger; do_bench and CUDA-graph replays (host overhead apart from device time)
#   train  ResNet-50, 224 px, bf16, channels-last, compiled, synthetic data: plain vs BYOT (torch loss) vs BYOT
#          (fused loss), img/s side by side with the exit heads' FLOP ratio; and the fused BYOT step compiled with
#          mode="reduce-overhead" (CUDA graphs) against the same step without graphs
#   exits  per-exit latency of ResNet-50 at batch 1 and 256 (CUDA graphs) against FLOP ratios and BYOT's claims
#   large  fused loss at E*B = 16384 rows, C = 32000: bandwidth as a fraction of step env's copy, peak extra memory
#   stress the fused loss under real concurrency: random shapes and dtypes, grids of 1 to 16 x the SM count, against
#          float64 and bitwise across repeats, two streams at once, a CUDA-graph replay calling it twice
#   tests  kernel, method and no-sync tests with compiled kernels; the loop under the sync debug mode; timm + BYOT
#   dali   DALI mixed decoding, only where DALI is importable (its wheels carried under .whl/)
#
# --rehearse  the same steps on CPU at toy sizes (Triton interpreter, tiny models, few iterations)
# --steps     run only these (the summary still lists them in this order)
# Results: after EVERY step summary.md, summary.json and results.tgz (every step's folder and log) are rewritten in
# $OUT, so a command stopped at its limit still returns the steps it finished. Without $OUT: the step folders and
# the summary go to bench/results/<date>-<gpu>/ (rehearsal: a new temporary folder).
# Wheels under .whl/ are installed first (--no-deps, into /tmp/site); the commit comes from git, else from
# .whl/COMMIT (make gpu-prep). TIMEOUT_<STEP>=seconds overrides a step's limit. Exit code 0: every step ok or skipped.
# The rehearsal runs each step under REHEARSAL_LIMIT, not the GPU's limits: its steps take 5-25 s on a 2-core CPU,
# so the limit only catches a hang and a slow machine never fails it. REHEARSE_DELAY_<STEP>=seconds (rehearsal
# only) makes a step slow on purpose, for the test of what happens at a limit.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL=env,loss,train,exits,large,stress,tests,dali
# 535 s in all, under 9 minutes. The stress step's 55 s came out of the others (env 40 -> 30, loss 85 -> 75,
# train 195 -> 185 with its graphs sub-step, exits 45 -> 40, large 40 -> 35, tests 105 -> 95): none has run on a
# GPU yet, so each limit is a share of the budget, to be re-balanced from the first real run's step times.
declare -A LIMIT=([env]=30 [loss]=75 [train]=185 [exits]=40 [large]=35 [stress]=55 [tests]=95 [dali]=20)
REHEARSAL_LIMIT=600
REHEARSE=0
STEPS=$ALL
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1; shift ;;
    --steps) STEPS=$2; shift 2 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for s in ${STEPS//,/ }; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "gpu_suite.sh: --steps: unknown step '$s'; the steps are $ALL" >&2; exit 2; }
done
PLANNED=$(for s in ${ALL//,/ }; do case ",$STEPS," in *",$s,"*) printf '%s,' "$s" ;; esac; done)
limit_of() {  # STEP: its limit in this mode, TIMEOUT_<STEP> first
  local var=TIMEOUT_${1^^}
  if [ $REHEARSE -eq 1 ]; then echo "${!var:-$REHEARSAL_LIMIT}"; else echo "${!var:-${LIMIT[$1]}}"; fi
}
BUDGET=0 GPU_BUDGET=0
for s in ${PLANNED//,/ }; do BUDGET=$((BUDGET + $(limit_of "$s"))); GPU_BUDGET=$((GPU_BUDGET + ${LIMIT[$s]})); done

export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ $REHEARSE -eq 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  GPU=cpu-rehearsal
  SITE=$(mktemp -d)
else
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
        | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
  [ -n "$GPU" ] || { echo "gpu_suite.sh: no NVIDIA GPU visible (nvidia-smi); the CPU rehearsal is --rehearse" >&2
                     exit 2; }
  SITE=/tmp/site
fi
if [ -n "${OUT:-}" ]; then
  DEST=$OUT WORK=$(mktemp -d)
elif [ $REHEARSE -eq 1 ]; then
  DEST=$(mktemp -d) WORK=$DEST
else
  DEST=bench/results/$(date -u +%Y-%m-%d)-$GPU
  i=2; base=$DEST
  while [ -e "$DEST" ]; do DEST=$base-$i; i=$((i + 1)); done
  WORK=$DEST
fi
mkdir -p "$DEST" "$WORK"
trap '[ "$WORK" = "$DEST" ] || rm -rf "$WORK"; [ "$SITE" = /tmp/site ] || rm -rf "$SITE"' EXIT
: > "$WORK/steps.tsv"
echo "== GPU check on $GPU -> $DEST (step limits ${BUDGET} s in all)"

if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  then export PYTHONPATH="$PYTHONPATH:$SITE"
  else echo "gpu_suite.sh: installing .whl/*.whl failed; going on without those packages" >&2
  fi
fi

if [ $REHEARSE -eq 0 ] && [ -f .dali/MANIFEST ] && ! python3 -c "import nvidia.dali" 2> /dev/null; then
  if bash bench/dali_parts.sh install "$SITE"; then case ":$PYTHONPATH:" in *":$SITE:"*) ;;
                                                    *) export PYTHONPATH="$PYTHONPATH:$SITE" ;; esac
  else echo "gpu_suite.sh: DALI's parts did not all arrive; the dali step will say skipped" >&2
  fi
fi

pack() {
  python3 -m bench.gpu_check summary "$WORK" "$DEST" "$PLANNED" "gpu=$GPU" "rehearse=$REHEARSE" "budget=$BUDGET" \
    "gpu_budget=$GPU_BUDGET" \
    "command=bash bench/gpu_suite.sh${ARGS:+ $ARGS}" || echo "gpu_suite.sh: the summary failed" >&2
  if [ "$DEST" != "$WORK" ]; then
    tar -czf "$DEST/results.tgz.part" -C "$WORK" . && mv -f "$DEST/results.tgz.part" "$DEST/results.tgz"
  fi
}
record() {  # NAME STATUS EXIT_CODE SECONDS LIMIT COMMAND
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/steps.tsv"
  echo "   $1: $2 ($4 s)"
  pack
}
FAILED=0
step() {  # NAME CMD...: runs CMD under the step's limit, its output in NAME/log.txt
  local name=$1 delay="REHEARSE_DELAY_${1^^}" t0=$SECONDS rc status limit
  shift
  case ",$PLANNED" in *",$name,"*) ;; *) return 0 ;; esac
  limit=$(limit_of "$name")
  delay=$( ((REHEARSE)) && echo "${!delay:-0}" || echo 0)
  mkdir -p "$WORK/$name"
  echo "== $name (limit $limit s): $*"
  timeout -k 5 "$limit" bash -c 'sleep "$0" && exec "$@"' "$delay" "$@" > "$WORK/$name/log.txt" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after $limit s"; [ $((SECONDS - t0)) -ge "$limit" ] || status="killed (exit $rc)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  if [ $rc -ne 0 ]; then FAILED=1; tail -n 8 "$WORK/$name/log.txt" | sed 's/^/   | /'; fi
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$*"
}
ARGS=$( (($REHEARSE)) && echo -n "--rehearse "; [ "$STEPS" = "$ALL" ] || echo -n "--steps $STEPS")
ARGS=${ARGS% }
pack

if [ $REHEARSE -eq 1 ]; then
  LOSS=(--exits 4 --batch 16 --classes 100 --feature-dim 16 --compile-backend eager --repeats 3)
  LARGE=(--exits 4 --batch 64 --classes 2000 --feature-dim 16 --repeats 2)  # E*B = 256 rows
  TRAIN=(--models resnet18 --sizes 8 --batch 8 --steps 2 --warmup 1 --repeats 2 --threads 1 model.width=0.25
         "model.depths=[1,1,1,1]" model.num_classes=10 precision.compile_backend=eager)
  EXITS=(model.name=resnet18 model.stem=cifar model.width=0.25 "model.depths=[1,1,1,1]" model.num_classes=10
         data.image_size=8 precision.amp=bf16 precision.channels_last=true --batch-sizes 1,8 --modes eager
         --warmup 1 --iters 2 --repeats 2 --ee-samples 8 --threads 1)
  STRESS=(--seconds 20 --max-configs 8 --repeats 2)
  TESTS=(tests/test_gpu_suite.py -k "not rehearsal")
  DALI=(--backends dali,dali-cpu --workers 1 --threads 1 --size 32 --batch-size 4 --batches 2 --warmup 1
        --repeats 1 --per-class 2 --cache "$SITE/photos")
else
  LOSS=(--exits 4 --batch 256 --classes 1000 --feature-dim 512)
  LARGE=(--exits 4 --batch 4096 --classes 32000 --feature-dim 512)  # E*B = 16384 rows
  TRAIN=(--models resnet50 --sizes 224 --batch 256 --steps 20 --warmup 3 --repeats 2)
  EXITS=(model.name=resnet50 model.stem=imagenet model.num_classes=1000 data.image_size=224 precision.amp=bf16
         precision.channels_last=true --batch-sizes 1,256 --modes cudagraph --ee-samples 64)
  STRESS=(--seconds 40 --max-configs 400 --repeats 3)
  TESTS=(tests/test_kernels.py tests/test_kernels_launches.py tests/test_kernels_methods.py
         tests/test_kernel_self_check.py tests/test_kernels_objective.py tests/test_methods_nosync.py tests/test_gpu_suite.py -k "not rehearsal")
  python3 -c "import xdist" 2> /dev/null && TESTS=(-n 8 "${TESTS[@]}")  # 8 workers share the GPU
  DALI=(--backends dali,dali-cpu,torch --batches 20 --repeats 2 --cache "$SITE/photos")
fi

step env python3 -m bench.gpu_check env --out "$WORK/env"
COPY=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["copy_gbps"])' "$WORK/env/report.json" \
       2> /dev/null)  # steps loss and large state bandwidth against this copy (measured again if it is missing)
step loss python3 -m bench.kernels "${LOSS[@]}" ${COPY:+--copy-gbps "$COPY"} --dtypes bf16 --modes fwd+bwd \
  --providers eager,fused,liger,compile,compile-ro --graphs --out "$WORK/loss"
step train python3 -m bench.train "${TRAIN[@]}" --variants plain,byot --backend triton,torch --ablate byot \
  --compile compiled,compiled-ro --amp bf16 --layout channels_last --loaders synthetic --no-plots --out "$WORK/train"
step exits python3 -m bench.profile "${EXITS[@]}" --thresholds 0,0.5,0.9,1.01 --no-plots --out "$WORK/exits"
step large python3 -m bench.kernels "${LARGE[@]}" ${COPY:+--copy-gbps "$COPY"} --dtypes bf16 --modes fwd+bwd \
  --providers eager,fused --out "$WORK/large"
step stress python3 -m bench.kernel_stress "${STRESS[@]}" --out "$WORK/stress"
step tests python3 -m pytest -q -p no:cacheprovider --junitxml "$WORK/tests/junit.xml" "${TESTS[@]}"
case ",$PLANNED" in *,dali,*)
  if python3 -c "import nvidia.dali" 2> /dev/null; then
    step dali python3 -m bench.loader "${DALI[@]}" --out "$WORK/dali"
  else
    record dali "skipped: DALI is not installed (carry its wheels under .whl/ to measure mixed decoding)" - 0 \
      "${LIMIT[dali]}" ""
  fi ;;
esac

echo "== done: $DEST/summary.md"
exit $FAILED
