#!/usr/bin/env bash
# Every GPU measurement of the project in one command:
#   kernels (bench/kernels.py), loaders (bench/loader.py: dali, dali-cpu, torch), training throughput
#   (bench/train.py, full matrix) and per-exit latency (bench/exits.py: resnet18 and resnet50 at 224 px).
#
#   bash bench/gpu_suite.sh [--data DIR] [--quick] [--dry-run]
#
#   --data DIR    ImageNet-style image folder (DIR/train, DIR/val) for the real loaders (else synthetic only)
#   --quick       a reduced matrix (RN50 224 px, plain + BYOT) for a first look
#   --dry-run     print the commands, run nothing (works without a GPU)
#   env: CKPT_RESNET18 / CKPT_RESNET50 = checkpoints for the exit profiles (else random init, no accuracy);
#        SELFDISTILL = the CLI to call (default: python -m engine.cli); BENCH_RESULTS = results root
#        (default: bench/results)
#
# Writes bench/results/<UTC date>-<gpu>/: one folder per measurement (report.json, report.md, PNGs), logs/,
# steps.tsv, nvidia-smi.txt, suite.json (commit, versions, GPU, every step's status) and suite.md (index).
# A step that fails or is not built yet is recorded as such; the suite goes on with the others.
set -uo pipefail
cd "$(dirname "$0")/.."

ARGS=("$@")
DATA=""
QUICK=0
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
SD=${SELFDISTILL:-python -m engine.cli}
RESULTS=${BENCH_RESULTS:-bench/results}

# --- DALI wheels shipped next to the checkout (offline GPU machines) -----------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== installing the DALI wheels from .whl/ into /tmp/site"
  if [ $DRY -eq 1 ]; then
    echo "pip install --no-index --target /tmp/site .whl/*.whl"
  elif ! pip install --no-index --target /tmp/site .whl/*.whl; then
    echo "gpu_suite.sh: the .whl/ install failed; DALI steps will report DALI as unavailable" >&2
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- output folder -------------------------------------------------------------------------------------------
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr '[:upper:]' '[:lower:]' \
      | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
if [ -z "$GPU" ]; then
  if [ $DRY -eq 0 ]; then
    echo "gpu_suite.sh: no NVIDIA GPU visible (nvidia-smi failed); this suite measures GPUs only" >&2
    exit 2
  fi
  GPU=no-gpu
fi
DATE=$(date -u +%Y-%m-%d)
OUT="${RESULTS}/${DATE}-${GPU}"
i=2
while [ -e "$OUT" ] && [ $DRY -eq 0 ]; do OUT="${RESULTS}/${DATE}-${GPU}-$i"; i=$((i + 1)); done
if [ $DRY -eq 0 ]; then mkdir -p "$OUT/logs"; : > "$OUT/steps.tsv"; fi
echo "== GPU suite on ${GPU} -> ${OUT}"

# step NAME MODULE CMD...: runs CMD (unless MODULE is not importable: "skipped"), logs to logs/NAME.log and
# appends NAME, status, exit code, seconds and the command to steps.tsv.
step() {
  local name=$1 module=$2
  shift 2
  echo "== ${name}: $*"
  if [ $DRY -eq 1 ]; then return 0; fi
  if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('${module}') is None)" 2>/dev/null; then
    echo "   skipped: ${module} is not part of this build"
    printf '%s\tskipped: %s not in this build\t-\t0\t%s\n' "$name" "$module" "$*" >> "$OUT/steps.tsv"
    return 0
  fi
  local t0 rc status
  t0=$(date +%s)
  "$@" > "$OUT/logs/${name}.log" 2>&1
  rc=$?
  status=ok
  [ $rc -eq 0 ] || status="failed (see logs/${name}.log)"
  echo "   ${status} in $(( $(date +%s) - t0 )) s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$OUT/steps.tsv"
}

DATA_ARGS=()
LOADER_DATA=()  # bench/loader.py reads --root (default: a generated photo folder)
[ -n "$DATA" ] && DATA_ARGS=(--data "$DATA") && LOADER_DATA=(--root "$DATA")
LOADERS=synthetic
[ -n "$DATA" ] && LOADERS=synthetic,torch,dali,dali-cpu
if [ $QUICK -eq 1 ]; then
  TRAIN_MATRIX=(--models resnet50 --sizes 224 --variants plain,byot --steps 20 --repeats 2)
else
  TRAIN_MATRIX=(--models resnet18,resnet50 --sizes 224,32 --variants plain,byot,cskd,beta --steps 30 --repeats 3)
fi

# shellcheck disable=SC2086  # $SD is a command line on purpose
step kernels bench.kernels $SD bench kernels --out "$OUT/kernels"
# shellcheck disable=SC2086
step loader bench.loader $SD bench loader --backends dali,dali-cpu,torch --out "$OUT/loader" "${LOADER_DATA[@]}"
# shellcheck disable=SC2086
step train bench.train $SD bench train "${TRAIN_MATRIX[@]}" --loaders "$LOADERS" --out "$OUT/train" "${DATA_ARGS[@]}"
for MODEL in resnet18 resnet50; do
  CKPT_VAR="CKPT_${MODEL^^}"
  CKPT=${!CKPT_VAR:-}
  if [ -n "$CKPT" ]; then
    SRC=(--checkpoint "$CKPT" "${DATA_ARGS[@]}")
  else
    SRC=("model.name=${MODEL}" model.stem=imagenet model.num_classes=1000 data.image_size=224)
  fi
  # shellcheck disable=SC2086
  step "exits-${MODEL}-224" bench.exits $SD profile exits "${SRC[@]}" --batch-sizes 1,32,256 \
    --modes eager,compiled,cudagraph --amp bf16 --channels-last --out "$OUT/exits-${MODEL}-224"
done

if [ $DRY -eq 1 ]; then echo "== dry run: nothing was run"; exit 0; fi

# --- provenance and index ------------------------------------------------------------------------------------
nvidia-smi -q > "$OUT/nvidia-smi.txt" 2>&1 || true
python - "$OUT" "${ARGS[@]}" <<'PY'
import json, sys
from pathlib import Path
from engine.rundir import provenance

out = Path(sys.argv[1])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds, cmd = line.split("\t", 4)
    report = out / name / "report.md"
    steps.append({"name": name, "status": status, "exit_code": rc, "seconds": int(seconds), "command": cmd,
                  "report": str(report.relative_to(out)) if report.is_file() else None})
prov = provenance({"gpu": (out / "nvidia-smi.txt").read_text()[:4000]})
(out / "suite.json").write_text(json.dumps({"provenance": prov, "steps": steps}, indent=2) + "\n")
vers = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
lines = [f"# GPU suite {out.name}", "", f"- commit: `{prov['commit']}`", f"- date (UTC): {prov['date']}",
         f"- versions: {vers}", f"- command: `bash bench/gpu_suite.sh {' '.join(sys.argv[2:])}`", "",
         "| step | status | seconds | report | command |", "|---|---|---|---|---|"]
for s in steps:
    link = f"[{s['report']}]({s['report']})" if s["report"] else ""
    lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {link} | `{s['command']}` |")
(out / "suite.md").write_text("\n".join(lines) + "\n")
print(f"== suite index: {out / 'suite.md'}")
PY
