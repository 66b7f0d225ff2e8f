"""`selfdistill bench train`: training throughput (images/s) of the real training step, side by side.

Axes (comma lists; the FIRST value of each is the base setting):
  --models resnet18,resnet50   --sizes 224,32 (<= 64 px: CIFAR form, 3x3 stem, 100 classes; else ImageNet, 1000)
  --variants plain,byot,cskd,beta   plain = objective ce with exits.stages=[]; byot = exits [0,1,2];
             cskd = 2B images a step (B anchors + B same-class partners); beta = Beta smoothing (single exit)
  --compile compiled,eager   --amp bf16,fp32   --layout channels_last,nchw   --backend torch,triton
  --loaders synthetic,torch,dali   (real loaders read --data DIR, an image folder, or --dataset digits|fashion_mnist)
--design oat (default): every variant at the base setting, plus, for the --ablate variants, the base with one axis
changed at a time. --design full: the whole cartesian product.

One step is exactly the training loop's: autocast forward through the objective, zero_grad, (scaled) backward,
optimizer step, objective.after_step. Per repeat: wall time (CUDA events on GPU / perf_counter on CPU, from the
first fetch to the last step), compute time (events around each step only) and host data wait (time blocked in
the loader's next()). img/s counts training samples (anchors); `fwd_img_s` counts every image through the network
(2x for CS-KD). FLOPs of one training step (forward + backward, FlopCounterMode, eager fp32) are counted per variant,
so the multi-exit slowdown can be set against the FLOP prediction.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from bench.common import (
    NvmlSampler,
    Report,
    Stats,
    StepTimer,
    check_choices,
    count_flops,
    cpu_note,
    csv_list,
    default_out_dir,
    fmt_num,
    int_list,
    log,
    md_table,
    provenance,
    provenance_md,
    resolve_device,
    synchronize,
)

AXES = ("compile", "amp", "layout", "backend", "loader")
AXIS_CHOICES = {"compile": ("compiled", "eager"), "amp": ("bf16", "fp32", "fp16"),
                "layout": ("channels_last", "nchw"), "backend": ("torch", "triton"),
                "loader": ("synthetic", "torch", "dali", "dali-cpu")}
# value that counts as "the optimisation" of each axis (gain = img/s with it / img/s without it)
OPTIMISED = {"compile": "compiled", "amp": "bf16", "layout": "channels_last", "backend": "triton"}
VARIANTS = {
    "plain": {"objective": "ce", "stages": [], "overrides": []},
    "byot": {"objective": "byot", "stages": [0, 1, 2], "overrides": []},
    "cskd": {"objective": "cskd", "stages": [], "overrides": ["data.sampler=class_pair"]},
    "beta": {"objective": "beta", "stages": [], "overrides": []},
}
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "preact_resnet18")
TARGET_RN50_IMG_S = 3000.0  # issue 7: plain RN50, 224 px, bf16, channels-last, compiled, synthetic, one H100
TARGET_BYOT_EXCESS_PCT = 10.0
TARGET_LOADER_RATIO = 0.90


@dataclass(frozen=True)
class RunSpec:
    model: str
    size: int
    variant: str
    compile: str
    amp: str
    layout: str
    backend: str
    loader: str

    @property
    def key(self) -> str:
        return "/".join(str(v) for v in asdict(self).values())

    def axes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in AXES}


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--sizes", default="224,32", help="image sizes; <= 64 px uses the CIFAR form")
    p.add_argument("--variants", default="plain,byot,cskd,beta")
    p.add_argument("--compile", default="compiled,eager")
    p.add_argument("--amp", default="bf16,fp32")
    p.add_argument("--layout", default="channels_last,nchw")
    p.add_argument("--backend", default="torch,triton", help="objective.backend (multi-exit objectives only)")
    p.add_argument("--loaders", default="synthetic,torch,dali")
    p.add_argument("--design", choices=("oat", "full"), default="oat")
    p.add_argument("--ablate", default="plain,byot", help="variants that get the one-axis-at-a-time runs (oat)")
    p.add_argument("--data", help="image folder (root/train/<class>/...) for the real loaders")
    p.add_argument("--dataset", choices=("imagefolder", "digits", "fashion_mnist"), default=None,
                   help="dataset of the real loaders (default: imagefolder when --data is given)")
    p.add_argument("--workers", type=int, default=8, help="data.workers for the real loaders")
    p.add_argument("--batch", type=int, default=256, help="training samples (anchors) per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (absorbs compilation/autotuning)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=float, default=None, help="model.width (tiny CPU models)")
    p.add_argument("--depths", default=None, help="model.depths, e.g. 1,1,1,1")
    p.add_argument("--num-classes", type=int, default=None, help="default 100 (CIFAR form) / 1000 (ImageNet)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); 1 avoids "
                                                            "OpenMP spinning on a shared machine")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--config", help="base YAML for every run (overrides below apply on top)")
    p.add_argument("--out", help="report folder (default bench/results/train-<date>-<device>/)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides applied to every run, e.g. model.in_chans=1")
    return p


def _axis_lists(args: argparse.Namespace) -> dict[str, list[str]]:
    lists = {"compile": csv_list(args.compile), "amp": csv_list(args.amp), "layout": csv_list(args.layout),
             "backend": csv_list(args.backend), "loader": csv_list(args.loaders)}
    for axis, values in lists.items():
        if not values:
            raise SystemExit(f"--{axis}: give at least one value")
        check_choices(f"--{axis}", values, AXIS_CHOICES[axis])
    return lists


def plan_runs(models: list[str], sizes: list[int], variants: list[str], lists: dict[str, list[str]], design: str,
              ablate: list[str]) -> list[RunSpec]:
    """The runs of the matrix, in order, without duplicates. The backend axis is skipped for 'plain' (the CE
    objective has no fused kernel)."""
    runs: list[RunSpec] = []
    base = {a: v[0] for a, v in lists.items()}
    for model, size, variant in itertools.product(models, sizes, variants):
        if design == "full":
            combos = [dict(zip(AXES, c)) for c in itertools.product(*(lists[a] for a in AXES))]
        else:
            combos = [base]
            if variant in ablate:
                combos += [dict(base, **{a: v}) for a in AXES for v in lists[a][1:]]
        for combo in combos:
            if variant == "plain" and combo["backend"] != base["backend"]:
                continue
            spec = RunSpec(model, size, variant, **combo)
            if spec not in runs:
                runs.append(spec)
    return runs


# --------------------------------------------------------------------------------------------- one run


def run_overrides(spec: RunSpec, args: argparse.Namespace, ckpt_dir: str) -> list[str]:
    cifar = spec.size <= 64
    v = VARIANTS[spec.variant]
    ov = [f"model.name={spec.model}", f"model.stem={'cifar' if cifar else 'imagenet'}",
          f"model.num_classes={args.num_classes or (100 if cifar else 1000)}",
          f"exits.stages={v['stages']}", f"objective.name={v['objective']}", f"objective.backend={spec.backend}",
          f"data.image_size={spec.size}", f"data.batch_size={args.batch}",
          f"data.augment={'crop_flip' if cifar else 'random_resized_crop'}",
          f"precision.amp={spec.amp}", f"precision.channels_last={str(spec.layout == 'channels_last').lower()}",
          "precision.compile=false", "logging.progress=false", f"checkpoint.dir={ckpt_dir}"]
    if spec.loader == "synthetic":
        ov += ["data.dataset=synthetic"]
    else:
        dataset = args.dataset or "imagefolder"
        ov += [f"data.dataset={dataset}", f"data.backend={spec.loader}", f"data.workers={args.workers}"]
        if args.data:
            ov.append(f"data.root={args.data}")
    if args.width is not None:
        ov.append(f"model.width={args.width}")
    if args.depths:
        ov.append(f"model.depths=[{args.depths}]")
    return ov + v["overrides"] + list(args.overrides)


def unavailable_reason(spec: RunSpec, args: argparse.Namespace, device: torch.device) -> Optional[str]:
    from engine.objectives import OBJECTIVES

    objective = VARIANTS[spec.variant]["objective"]
    if objective not in OBJECTIVES:
        return f"objective '{objective}' is not registered in this build"
    if spec.backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "objective.backend=triton needs a CUDA device, or TRITON_INTERPRET=1 (no speed measure) on CPU"
        try:
            import engine.objectives.fused  # noqa: F401
        except ImportError as e:
            return f"Triton objective kernels not importable ({e})"
    if spec.loader != "synthetic":
        if args.data is None and (args.dataset or "imagefolder") == "imagefolder":
            return f"loader '{spec.loader}' needs --data DIR (an image folder) or --dataset digits|fashion_mnist"
        if spec.loader in ("dali", "dali-cpu"):
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                return "DALI is not installed (nvidia-dali-cuda130; gpu_suite.sh installs .whl/ wheels)"
            if spec.loader == "dali" and device.type != "cuda":
                return "loader 'dali' decodes on the GPU; this is a CPU run"
    if spec.compile == "compiled" and device.type == "cpu" and args.compile_backend == "inductor":
        import shutil

        if shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile (inductor) on CPU needs a C++ compiler"
    return None


class PairedSynthetic:
    """CS-KD on synthetic data: the synthetic loader's batch plus a fixed partner batch (same labels), as the
    class-pair sampler would put in Batch.extra['partner'] (and a second view when data.extra_view)."""

    def __init__(self, loader: Any, extra_view: bool, memory_format: torch.memory_format):
        from engine.types import Batch

        self.loader = loader
        self.num_samples = loader.num_samples
        images = loader.images
        g = torch.Generator(device=images.device).manual_seed(1)

        def rand() -> torch.Tensor:
            return torch.randn(images.shape, generator=g, device=images.device, dtype=images.dtype).contiguous(
                memory_format=memory_format)

        extra = {"partner": rand()}
        if extra_view:
            extra["view"] = rand()
        self.batch = Batch(loader.images, loader.labels, extra)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for _ in range(len(self.loader)):
            yield self.batch


def _images_in(batch: Any) -> int:
    return batch.images.shape[0] + sum(t.shape[0] for t in batch.extra.values() if t.dim() == 4)


def _small_batch(batch: Any, n: int = 2) -> Any:
    from engine.types import Batch

    return Batch(batch.images[:n].float().contiguous(), batch.labels[:n],
                 {k: v[:n].float().contiguous() for k, v in batch.extra.items()})


def count_step_flops(c: Any, batch: Any) -> dict[str, int]:
    """FLOPs of one training step (objective forward incl. partner/teacher passes + backward) and of one eval
    forward, both per training sample, counted in eager fp32 on 2 samples of `batch`."""
    model, objective = c.model, c.objective
    small = _small_batch(batch)
    n = small.images.shape[0]

    def step() -> None:
        loss, _ = objective(model, small)
        loss.total.backward()

    model.train()
    train = count_flops(step)
    c.optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        fwd = count_flops(model, small.images)
    model.train()
    return {"train_per_sample": train // n, "fwd_per_image": fwd // n}


def _loop_batches(loader: Any):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        any_batch = False
        for b in loader:
            any_batch = True
            yield b
        if not any_batch:
            raise RuntimeError("the loader yields no batch (batch larger than the data?)")
        epoch += 1


def run_one(spec: RunSpec, args: argparse.Namespace, device: torch.device, sampler: NvmlSampler,
            flop_cache: dict) -> dict[str, Any]:
    from engine.config import load_config
    from engine.evaluate import autocast
    from engine.objectives import build_objective
    from engine.setup_run import build_components

    row: dict[str, Any] = {"key": spec.key, **asdict(spec), "batch": args.batch}
    reason = unavailable_reason(spec, args, device)
    if reason:
        return {**row, "status": "unavailable", "reason": reason}
    tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
    try:
        cfg = load_config(args.config, run_overrides(spec, args, tmp.name))
        row["objective"], row["exits"] = cfg.objective.name, list(cfg.exits.stages)
        paired = cfg.data.sampler == "class_pair" and spec.loader == "synthetic"
        # The synthetic loader has no class-pair sampler: build it as a plain one (a plain objective) and add the
        # partners here, then the configured objective.
        c = build_components(replace(cfg, data=replace(cfg.data, sampler="random", extra_view=False),
                                     objective=replace(cfg.objective, name="ce")) if paired else cfg, device.type)
        if paired:
            c.objective = build_objective(cfg, c.model.num_exits, device).to(device)
        model = c.model
        train_model = (torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
                       if spec.compile == "compiled" else model)
        loader = c.data.train
        if paired:
            loader = PairedSynthetic(loader, cfg.data.extra_view, torch.channels_last if cfg.precision.channels_last
                                     else torch.contiguous_format)
        batches = _loop_batches(loader)
        step_no = [0]

        def step(batch: Any) -> torch.Tensor:
            with autocast(device, cfg.precision.amp):
                loss, _ = c.objective(train_model, batch)
            c.optimizer.zero_grad(set_to_none=True)
            c.scaler.scale(loss.total).backward()
            c.scaler.step(c.optimizer)
            c.scaler.update()
            c.objective.after_step(model, step_no[0])
            step_no[0] += 1
            return loss.total.detach()

        first = next(batches)
        fkey = (spec.model, spec.size, spec.variant)
        if fkey not in flop_cache:
            flop_cache[fkey] = count_step_flops(c, first)
        row["flops"] = flop_cache[fkey]
        row["samples_per_step"] = first.images.shape[0]
        row["images_per_step"] = _images_in(first)
        t_compile = time.perf_counter()
        loss = step(first)
        for _ in range(max(0, args.warmup - 1)):
            loss = step(next(batches))
        synchronize(device)
        row["warmup_s"] = round(time.perf_counter() - t_compile, 3)
        walls, computes, waits = [], [], []
        t0 = sampler.mark()
        for _ in range(args.repeats):
            wall, comp, wait = StepTimer(device), StepTimer(device), 0.0
            wall.start()
            for _ in range(args.steps):
                tf = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - tf
                comp.start()
                loss = step(batch)
                comp.stop()
            wall.stop()
            walls.append(wall.seconds()[0])
            computes.append(sum(comp.seconds()))
            waits.append(wait)
        row["nvml"] = sampler.summary(t0, sampler.mark())
        samples = row["samples_per_step"] * args.steps
        images = row["images_per_step"] * args.steps
        row.update(
            status="ok",
            img_s=Stats([samples / w for w in walls]).to_dict(2),
            fwd_img_s=Stats([images / w for w in walls]).to_dict(2),
            compute_img_s=Stats([samples / c_ for c_ in computes]).to_dict(2),
            step_ms=Stats([w * 1e3 / args.steps for w in walls]).to_dict(4),
            compute_ms_per_step=Stats([c_ * 1e3 / args.steps for c_ in computes]).to_dict(4),
            data_wait_ms_per_step=Stats([w * 1e3 / args.steps for w in waits]).to_dict(4),
            gpu_idle_frac=(Stats([max(0.0, 1 - c_ / w) for c_, w in zip(computes, walls)]).to_dict(4)
                           if device.type == "cuda" else None),
            loss_finite=bool(torch.isfinite(loss).item()),
            peak_memory_gib=(round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                             if device.type == "cuda" else None),
        )
        return row
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
        log(f"[bench train] {spec.key}: {type(e).__name__}: {e}")
        return {**row, "status": "error", "reason": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6)}
    finally:
        tmp.cleanup()
        if spec.compile == "compiled":
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------- ratios / targets


def _rate(row: dict) -> Optional[float]:
    return row["img_s"]["mean"] if row.get("status") == "ok" else None


def compute_ratios(rows: list[dict]) -> dict[str, list[dict]]:
    ok = {r["key"]: r for r in rows if r.get("status") == "ok"}
    by_spec = {RunSpec(**{k: r[k] for k in RunSpec.__dataclass_fields__}): r for r in ok.values()}
    overhead, gains, loaders = [], [], []
    for spec, r in by_spec.items():
        if spec.variant != "plain":
            plain = by_spec.get(replace(spec, variant="plain", backend=_plain_backend(spec, by_spec)))
            if plain is not None:
                measured = _rate(plain) / _rate(r)
                predicted = r["flops"]["train_per_sample"] / plain["flops"]["train_per_sample"]
                overhead.append({"model": spec.model, "size": spec.size, "variant": spec.variant,
                                 "setting": spec.axes(), "plain_img_s": _rate(plain), "variant_img_s": _rate(r),
                                 "measured_slowdown": round(measured, 4),
                                 "flop_predicted_slowdown": round(predicted, 4),
                                 "extra_train_flops_pct": round((predicted - 1) * 100, 2),
                                 "extra_fwd_flops_pct": round((r["flops"]["fwd_per_image"] /
                                                               plain["flops"]["fwd_per_image"] - 1) * 100, 2),
                                 "excess_over_flops_pct": round((measured / predicted - 1) * 100, 2)})
        for axis, on in OPTIMISED.items():
            if getattr(spec, axis) != on:
                continue
            for off in AXIS_CHOICES[axis]:
                r2 = by_spec.get(replace(spec, **{axis: off})) if off != on else None
                if r2 is not None:
                    gains.append({"model": spec.model, "size": spec.size, "variant": spec.variant, "axis": axis,
                                  "with": on, "without": off, "setting": spec.axes(),
                                  "gain": round(_rate(r) / _rate(r2), 4)})
        if spec.loader != "synthetic":
            syn = by_spec.get(replace(spec, loader="synthetic"))
            if syn is not None:
                loaders.append({"model": spec.model, "size": spec.size, "variant": spec.variant,
                                "loader": spec.loader, "setting": spec.axes(), "real_img_s": _rate(r),
                                "synthetic_img_s": _rate(syn), "ratio": round(_rate(r) / _rate(syn), 4),
                                "data_wait_ms_per_step": r["data_wait_ms_per_step"]["mean"]})
    return {"multi_exit_overhead": overhead, "optimisation_gains": gains, "loader_vs_synthetic": loaders}


def _plain_backend(spec: RunSpec, by_spec: dict) -> str:
    """The plain model ignores objective.backend and only runs at the base backend; find that run."""
    for other in by_spec:
        if other.variant == "plain" and replace(other, variant=spec.variant, backend=spec.backend) == spec:
            return other.backend
    return spec.backend


def evaluate_targets(rows: list[dict], ratios: dict, device: torch.device) -> list[dict]:
    if device.type != "cuda":
        note = "not evaluated: CPU run (the targets are for one H100; nothing is extrapolated)"
        return [{"target": t, "status": note} for t in
                ("plain RN50 224px bf16 channels-last compiled synthetic >= 3000 img/s",
                 f"BYOT slowdown <= {TARGET_BYOT_EXCESS_PCT:.0f}% beyond the FLOP prediction",
                 f"real loader (DALI) >= {TARGET_LOADER_RATIO:.0%} of synthetic")]
    out = []
    rn50 = [r for r in rows if r.get("status") == "ok" and r["model"] == "resnet50" and r["size"] == 224 and
            r["variant"] == "plain" and r["amp"] == "bf16" and r["layout"] == "channels_last" and
            r["compile"] == "compiled" and r["loader"] == "synthetic"]
    out.append({"target": "plain RN50 224px bf16 channels-last compiled synthetic >= 3000 img/s",
                "measured_img_s": rn50[0]["img_s"]["mean"] if rn50 else None,
                "status": ("pass" if rn50[0]["img_s"]["mean"] >= TARGET_RN50_IMG_S else "fail") if rn50
                else "not measured in this run"})
    byot = [o for o in ratios["multi_exit_overhead"] if o["variant"] == "byot"]
    for o in byot:
        out.append({"target": f"BYOT {o['model']} {o['size']}px slowdown <= {TARGET_BYOT_EXCESS_PCT:.0f}% beyond FLOPs",
                    "setting": o["setting"], "excess_over_flops_pct": o["excess_over_flops_pct"],
                    "status": "pass" if o["excess_over_flops_pct"] <= TARGET_BYOT_EXCESS_PCT else "fail"})
    if not byot:
        out.append({"target": "BYOT slowdown vs FLOP prediction", "status": "not measured in this run"})
    dali = [o for o in ratios["loader_vs_synthetic"] if o["loader"] == "dali"]
    for o in dali:
        out.append({"target": f"DALI loader {o['model']} {o['size']}px {o['variant']} >= 90% of synthetic",
                    "setting": o["setting"], "ratio": o["ratio"],
                    "status": "pass" if o["ratio"] >= TARGET_LOADER_RATIO else "fail"})
    if not dali:
        out.append({"target": "DALI loader >= 90% of synthetic", "status": "not measured in this run"})
    return out


# --------------------------------------------------------------------------------------------- report


def _setting(r: dict) -> str:
    return f"{r['compile']}, {r['amp']}, {r['layout']}, {r['backend']}, {r['loader']}"


def render_markdown(payload: dict) -> str:
    prov, rows, ratios = payload["provenance"], payload["runs"], payload["ratios"]
    s = payload["settings"]
    md = [f"# Training throughput: `selfdistill bench train`\n\n{cpu_note(torch.device(payload['device_type']))}",
          provenance_md(prov),
          f"- batch {s['batch']} samples/step, {s['warmup']} warm-up + {s['repeats']} x {s['steps']} timed steps; "
          f"design {s['design']}; base setting {s['base']}\n- NVML: {payload['nvml']['status']}\n",
          "\n## Runs\n\nimg/s = training samples per second (mean ± std over repeats); compute = the steps alone "
          "(CUDA events / perf_counter); data wait = host time blocked in the loader.\n\n"]
    table = []
    for r in rows:
        if r["status"] == "ok":
            table.append([r["model"], r["size"], r["variant"], _setting(r), "ok",
                          f"{r['img_s']['mean']:.1f} ± {r['img_s']['std']:.1f}",
                          f"{r['compute_img_s']['mean']:.1f}", f"{r['data_wait_ms_per_step']['mean']:.2f}",
                          fmt_num(r["flops"]["train_per_sample"] / 1e9, 3)])
        else:
            table.append([r["model"], r["size"], r["variant"], _setting(r), f"{r['status']}: {r.get('reason', '')}",
                          "", "", "", ""])
    md.append(md_table(["model", "px", "variant", "compile, amp, layout, backend, loader", "status", "img/s",
                        "compute img/s", "data wait ms/step", "train GFLOP/sample"], table))
    md.append("\n## Overhead over the plain model against the FLOP prediction\n\nslowdown = plain img/s / variant "
              "img/s; predicted = train FLOPs per sample (forward + backward, partner/teacher passes included), "
              "variant / plain; excess = slowdown / predicted - 1 (issue target for BYOT: <= 10%).\n\n")
    md.append(md_table(["model", "px", "variant", "setting", "extra fwd FLOPs %", "extra train FLOPs %",
                        "measured slowdown", "FLOP-predicted", "excess %"],
                       [[o["model"], o["size"], o["variant"], ", ".join(o["setting"].values()),
                         o["extra_fwd_flops_pct"], o["extra_train_flops_pct"], o["measured_slowdown"],
                         o["flop_predicted_slowdown"], o["excess_over_flops_pct"]]
                        for o in ratios["multi_exit_overhead"]]) if ratios["multi_exit_overhead"] else
              "(no pair of plain and multi-exit runs completed)\n")
    md.append("\n## Optimisation gains (img/s with / without, everything else equal)\n\n")
    md.append(md_table(["model", "px", "variant", "axis", "with", "without", "gain"],
                       [[g["model"], g["size"], g["variant"], g["axis"], g["with"], g["without"], g["gain"]]
                        for g in ratios["optimisation_gains"]]) if ratios["optimisation_gains"] else
              "(no completed pair differing in one optimisation)\n")
    md.append("\n## Real loader vs synthetic\n\n")
    md.append(md_table(["model", "px", "variant", "loader", "real img/s", "synthetic img/s", "ratio",
                        "data wait ms/step"],
                       [[o["model"], o["size"], o["variant"], o["loader"], o["real_img_s"], o["synthetic_img_s"],
                         o["ratio"], o["data_wait_ms_per_step"]] for o in ratios["loader_vs_synthetic"]])
              if ratios["loader_vs_synthetic"] else "(no real-loader run completed)\n")
    md.append("\n## Targets (issue 7)\n\n")
    md.append(md_table(["target", "status", "value"],
                       [[t["target"], t["status"], t.get("measured_img_s", t.get("excess_over_flops_pct",
                                                                                 t.get("ratio", "")))]
                        for t in payload["targets"]]))
    return "".join(md)


def _figures(payload: dict) -> dict:
    ok = [r for r in payload["runs"] if r["status"] == "ok"]
    figs = {}
    if ok:
        def throughput(fig: Any) -> None:
            fig.set_size_inches(9, max(3, 0.28 * len(ok) + 1))
            ax = fig.add_subplot(111)
            labels = [f"{r['model']} {r['size']}px {r['variant']} | {_setting(r)}" for r in ok]
            ax.barh(range(len(ok)), [r["img_s"]["mean"] for r in ok], xerr=[r["img_s"]["std"] for r in ok],
                    color=["C0" if r["variant"] == "plain" else "C1" for r in ok])
            ax.set_yticks(range(len(ok)), labels, fontsize=6)
            ax.invert_yaxis()
            ax.set_xlabel("training samples / s (mean ± std)")
            ax.set_title(f"bench train on {payload['provenance']['device'].get('name')}", fontsize=9)

        figs["throughput.png"] = throughput
    over = payload["ratios"]["multi_exit_overhead"]
    if over:
        def overhead(fig: Any) -> None:
            ax = fig.add_subplot(111)
            xs = range(len(over))
            ax.bar([x - 0.2 for x in xs], [o["measured_slowdown"] for o in over], 0.4, label="measured")
            ax.bar([x + 0.2 for x in xs], [o["flop_predicted_slowdown"] for o in over], 0.4, label="FLOP-predicted")
            ax.set_xticks(list(xs), [f"{o['model']} {o['size']}\n{o['variant']}" for o in over], fontsize=7)
            ax.axhline(1.0, color="k", lw=0.5)
            ax.set_ylabel("slowdown vs plain (x)")
            ax.legend()

        figs["multi_exit_overhead.png"] = overhead
    return figs


# --------------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, sizes, variants = csv_list(args.models), int_list(args.sizes), csv_list(args.variants)
    check_choices("--models", models, MODELS)
    check_choices("--variants", variants, tuple(VARIANTS))
    lists = _axis_lists(args)
    for n, v in (("--batch", args.batch), ("--steps", args.steps), ("--repeats", args.repeats)):
        if v < 1:
            raise SystemExit(f"{n} must be >= 1")
    runs = plan_runs(models, sizes, variants, lists, args.design, csv_list(args.ablate))
    out_dir = Path(args.out) if args.out else default_out_dir("train", device)
    log(f"[bench train] {len(runs)} runs on {device}; report -> {out_dir}")
    rows, flop_cache = [], {}
    with NvmlSampler(device) as sampler:
        for i, spec in enumerate(runs):
            t = time.perf_counter()
            row = run_one(spec, args, device, sampler, flop_cache)
            rows.append(row)
            rate = f"{row['img_s']['mean']:.1f} img/s" if row["status"] == "ok" else row.get("reason", "")
            log(f"[bench train] {i + 1}/{len(runs)} {spec.key}: {row['status']} {rate} "
                f"({time.perf_counter() - t:.1f} s)")
            if i + 1 < len(runs):  # a run stopped early keeps the runs it finished
                write_report(rows, args, device, lists, sampler, out_dir, final=False)
        files = write_report(rows, args, device, lists, sampler, out_dir, final=not args.no_plots)
    print(f"bench train: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} runs ok; report: {files['markdown']}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def write_report(rows: list[dict], args: argparse.Namespace, device: torch.device, lists: dict,
                 sampler: NvmlSampler, out_dir: Path, final: bool) -> dict:
    nvml = sampler.summary()
    nvml["static"] = sampler.static
    ratios = compute_ratios(rows)
    payload = {"kind": "bench-train", "device_type": device.type,
               "provenance": provenance(device),
               "settings": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                            "design": args.design, "ablate": csv_list(args.ablate),
                            "base": {a: v[0] for a, v in lists.items()}, "axes": lists, "models": csv_list(args.models),
                            "sizes": int_list(args.sizes), "variants": csv_list(args.variants),
                            "compile_backend": args.compile_backend,
                            "compile_mode": args.compile_mode, "data": args.data, "dataset": args.dataset,
                            "overrides": list(args.overrides), "width": args.width, "depths": args.depths},
               "nvml": nvml, "runs": rows, "ratios": ratios,
               "targets": evaluate_targets(rows, ratios, device)}
    report = Report("train", payload, render_markdown(payload), _figures(payload) if final else {})
    return report.write(out_dir)


if __name__ == "__main__":
    raise SystemExit(main())
