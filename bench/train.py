"""`selfdistill bench train`: throughput of the training step over a matrix of settings, side by side.

Axes are comma lists whose FIRST value is the base setting: --models, --sizes (<= 64 px: CIFAR form, 100 classes;
else ImageNet form, 1000), --variants (plain = CE with no exit; byot = the default BYOT exits; cskd = B anchors + B
partners a step; beta = Beta smoothing), --compile, --amp, --layout, --backend (objective.backend), --loaders
(synthetic, or torch / dali / dali-cpu reading --data DIR or --dataset). --design oat: every variant at the base,
and the --ablate variants with one axis changed at a time; --design full: the cartesian product. Config overrides
(`model.width=0.25`, `precision.compile_backend=eager`) apply to every run. Each run builds its parts from the config
as `selfdistill train` does and times `engine.step.train_step` (bench/README.md: what is measured).
"""
from __future__ import annotations

import gc
import itertools
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch

from bench.measure import NvmlSampler, Timer, endless, stats, synchronize
from bench.report import (
    bars,
    base_parser,
    csv_list,
    fail,
    fmt,
    log,
    md_table,
    provenance,
    provenance_md,
    start,
    write_report,
)
from bench.targets import target
from engine.config import load_config
from engine.models.exit_flops import count_flops
from engine.monitor import Window
from engine.setup_run import build_components
from engine.step import StepSettings, train_step
from engine.types import Batch

AXES = ("compile", "amp", "layout", "backend", "loader")
# compiled-ro: torch.compile with mode="reduce-overhead", the whole step one CUDA graph (fused loss inside)
AXIS_CHOICES = {"compile": ("compiled", "eager", "compiled-ro"), "amp": ("bf16", "fp32", "fp16"),
                "layout": ("channels_last", "nchw"), "backend": ("torch", "triton"),
                "loader": ("synthetic", "torch", "dali", "dali-cpu")}
# the value of each axis that counts as the optimisation (gain = img/s with it / img/s without it)
OPTIMISED = {"compile": "compiled", "amp": "bf16", "layout": "channels_last", "backend": "triton"}
VARIANTS = {"plain": ["objective.name=ce", "exits.stages=[]"], "byot": ["objective.name=byot"],
            "cskd": ["objective.name=cskd", "exits.stages=[]", "data.sampler=class_pair"],
            "beta": ["objective.name=beta", "exits.stages=[]"]}
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "preact_resnet18")
TARGET_RN50_IMG_S, TARGET_BYOT_EXCESS_PCT, TARGET_LOADER_RATIO = 3000.0, 10.0, 0.90  # one H100


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


def build_parser():
    p = base_parser("selfdistill bench train", __doc__)
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
    p.add_argument("--dataset", choices=("imagefolder", "digits", "fashion_mnist"),
                   help="dataset of the real loaders (default: imagefolder)")
    p.add_argument("--workers", type=int, default=8, help="data.workers for the real loaders")
    p.add_argument("--batch", type=int, default=256, help="training samples (anchors) per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (absorbs compilation, autotuning)")
    p.add_argument("--config", help="base YAML for every run (the overrides apply on top)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. model.in_chans=1")
    return p


def plan_runs(models: list[str], sizes: list[int], variants: list[str], lists: dict[str, list[str]], design: str,
              ablate: list[str]) -> list[RunSpec]:
    """The runs of the matrix, in order, without duplicates; 'plain' has no backend axis (CE has no fused kernel)."""
    runs: list[RunSpec] = []
    base = {a: v[0] for a, v in lists.items()}
    for model, size, variant in itertools.product(models, sizes, variants):
        if design == "full":
            combos = [dict(zip(AXES, c)) for c in itertools.product(*(lists[a] for a in AXES))]
        else:
            combos = [base] + ([dict(base, **{a: v}) for a in AXES for v in lists[a][1:]] if variant in ablate else [])
        for combo in combos:
            spec = RunSpec(model, size, variant, **combo)
            if not (variant == "plain" and combo["backend"] != base["backend"]) and spec not in runs:
                runs.append(spec)
    return runs


def run_overrides(spec: RunSpec, args, ckpt_dir: str) -> list[str]:
    cifar = spec.size <= 64
    ov = [f"model.name={spec.model}", f"model.stem={'cifar' if cifar else 'imagenet'}",
          f"model.num_classes={100 if cifar else 1000}", f"objective.backend={spec.backend}",
          f"data.image_size={spec.size}", f"data.batch_size={args.batch}",
          f"data.augment={'crop_flip' if cifar else 'random_resized_crop'}", f"precision.amp={spec.amp}",
          f"precision.channels_last={str(spec.layout == 'channels_last').lower()}",
          f"precision.compile={str(spec.compile.startswith('compiled')).lower()}",
          *(["precision.compile_mode=reduce-overhead"] if spec.compile == "compiled-ro" else []),
          "logging.progress=false", f"checkpoint.dir={ckpt_dir}", *VARIANTS[spec.variant]]
    if spec.loader == "synthetic":
        ov.append("data.dataset=synthetic")
    else:
        ov += [f"data.dataset={args.dataset or 'imagefolder'}", f"data.backend={spec.loader}",
               f"data.workers={args.workers}"] + ([f"data.root={args.data}"] if args.data else [])
    return ov + list(args.overrides)


def unavailable_reason(spec: RunSpec, cfg, args, device: torch.device) -> Optional[str]:
    if spec.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "objective.backend=triton needs a CUDA device, or TRITON_INTERPRET=1 (no speed measure) on CPU"
    if spec.loader != "synthetic" and args.data is None and cfg.data.dataset == "imagefolder":
        return f"loader '{spec.loader}' needs --data DIR (an image folder) or --dataset digits|fashion_mnist"
    if spec.loader.startswith("dali"):
        try:
            import nvidia.dali  # noqa: F401 - optional dependency
        except ImportError:
            return "DALI is not installed (nvidia-dali-cuda130; gpu_suite.sh installs .whl/ wheels)"
        if spec.loader == "dali" and device.type != "cuda":
            return "loader 'dali' decodes on the GPU; this is a CPU run"
    return None


def count_step_flops(c, batch: Batch) -> dict[str, int]:
    """FLOPs of one training step (the objective's forward, partner and teacher passes included, and backward) and
    of one eval forward, per training sample, counted in eager fp32 on 2 samples of `batch`."""
    small = Batch(batch.images[:2].float().contiguous(), batch.labels[:2],
                  {k: v[:2].float().contiguous() for k, v in batch.extra.items()})
    c.model.train()
    train = count_flops(lambda: c.objective(c.model, small)[0].total.backward())
    c.optimizer.zero_grad(set_to_none=True)
    c.model.eval()
    with torch.no_grad():
        fwd = count_flops(c.model, small.images)
    return {"train_per_sample": train // 2, "fwd_per_image": fwd // 2}


def measure(cfg, c, args, device: torch.device) -> dict[str, Any]:
    """`--warmup` steps, then `--repeats` x `--steps` timed steps; each repeat's loss and gradient norm are read from
    its logging window after its timer stops, as the loop reads them at a logging boundary."""
    data, per_epoch, params = endless(c.data.train), len(c.data.train), list(c.model.parameters())
    window, step = Window(scaler_skips=c.scaler.is_enabled()), 0
    parts, settings = c.step_parts, StepSettings.from_config(cfg, device, per_epoch)
    c.train_model.train()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        batch = next(data)
        train_step(parts, settings, batch, step, window)
        step += 1
    synchronize(device)
    out: dict[str, Any] = {"warmup_s": round(time.perf_counter() - t0, 3), "loss": [], "grad_norm": [], "problems": []}
    walls, computes, waits = [], [], []
    for _ in range(args.repeats):
        window.reset()
        wall, comp, wait = Timer(device), Timer(device), 0.0
        wall.mark()
        for _ in range(args.steps):
            t = time.perf_counter()
            batch = next(data)
            wait += time.perf_counter() - t
            comp.mark()
            train_step(parts, settings, batch, step, window)
            comp.mark()
            step += 1
        wall.mark()
        walls.append(wall.seconds()[0])
        computes.append(sum(comp.seconds()))
        waits.append(wait)
        reading = window.read(params, c.info, False)
        out["loss"].append(reading.values["loss"])
        out["grad_norm"].append(reading.values["grad_norm"])
        out["problems"] += reading.problems
    samples = batch.images.shape[0]
    images = samples + sum(t.shape[0] for t in batch.extra.values() if t.dim() == 4)
    per_s = lambda n, secs: stats([n * args.steps / s for s in secs], 2)  # noqa: E731
    per_step = lambda secs: stats([s * 1e3 / args.steps for s in secs], 4)  # noqa: E731
    return {**out, "samples_per_step": samples, "images_per_step": images, "img_s": per_s(samples, walls),
            "fwd_img_s": per_s(images, walls), "compute_img_s": per_s(samples, computes), "step_ms": per_step(walls),
            "compute_ms_per_step": per_step(computes), "data_wait_ms_per_step": per_step(waits),
            "gpu_idle_frac": (stats([max(0.0, 1 - c_ / w) for c_, w in zip(computes, walls)], 4)
                              if device.type == "cuda" else None),
            "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                if device.type == "cuda" else None), "last_batch": batch}


def run_one(spec: RunSpec, args, device: torch.device, sampler: NvmlSampler, flop_cache: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"key": spec.key, **asdict(spec), "batch": args.batch}
    tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
    try:
        row["overrides"] = run_overrides(spec, args, tmp.name)
        cfg = load_config(args.config, row["overrides"])
        reason = unavailable_reason(spec, cfg, args, device)
        if reason:
            return {**row, "status": "unavailable", "reason": reason}
        row.update(objective=cfg.objective.name, exits=list(cfg.exits.stages))
        c = build_components(cfg, device.type)
        t0 = time.perf_counter()
        row.update(measure(cfg, c, args, device))
        row["nvml"] = sampler.summary(t0, time.perf_counter())
        last = row.pop("last_batch")
        fkey = (spec.model, spec.size, spec.variant)
        if fkey not in flop_cache:  # after the timed steps, which are then exactly the loop's first steps
            flop_cache[fkey] = count_step_flops(c, last)
        return {**row, "status": "ok", "flops": flop_cache[fkey], "finite": not row["problems"]}
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
        log(f"[bench train] {spec.key}: {type(e).__name__}: {e}")
        return {**row, "status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(6)}
    finally:
        tmp.cleanup()
        if spec.compile.startswith("compiled"):
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def compute_ratios(rows: list[dict]) -> dict[str, list[dict]]:
    by_spec = {RunSpec(**{k: r[k] for k in RunSpec.__dataclass_fields__}): r for r in rows if r["status"] == "ok"}
    rate = {s: r["img_s"]["mean"] for s, r in by_spec.items()}
    overhead, gains, loaders = [], [], []
    for spec, r in by_spec.items():
        head = {"model": spec.model, "size": spec.size, "variant": spec.variant, "setting": spec.axes()}
        # the plain model runs at the base backend only
        plain = next((p for p in by_spec if p.variant == "plain" and replace(p, variant=spec.variant,
                                                                             backend=spec.backend) == spec), None)
        if spec.variant != "plain" and plain is not None:
            measured = rate[plain] / rate[spec]
            pf, f = by_spec[plain]["flops"], r["flops"]
            predicted = f["train_per_sample"] / pf["train_per_sample"]
            overhead.append({**head, "plain_img_s": rate[plain], "variant_img_s": rate[spec],
                             "measured_slowdown": round(measured, 4), "flop_predicted_slowdown": round(predicted, 4),
                             "extra_train_flops_pct": round((predicted - 1) * 100, 2),
                             "extra_fwd_flops_pct": round((f["fwd_per_image"] / pf["fwd_per_image"] - 1) * 100, 2),
                             "excess_over_flops_pct": round((measured / predicted - 1) * 100, 2)})
        for axis, on in OPTIMISED.items():
            for off in AXIS_CHOICES[axis]:
                other = replace(spec, **{axis: off})
                if getattr(spec, axis) == on and off not in (on, "compiled-ro") and other in by_spec:
                    gains.append({**head, "axis": axis, "with": on, "without": off,
                                  "gain": round(rate[spec] / rate[other], 4)})
        graphs = replace(spec, compile="compiled")
        if spec.compile == "compiled-ro" and graphs in by_spec:  # CUDA graphs against the same compiled step
            gains.append({**head, "axis": "compile", "with": "compiled-ro", "without": "compiled",
                          "gain": round(rate[spec] / rate[graphs], 4)})
        syn = replace(spec, loader="synthetic")
        if spec.loader != "synthetic" and syn in by_spec:
            loaders.append({**head, "loader": spec.loader, "real_img_s": rate[spec], "synthetic_img_s": rate[syn],
                            "ratio": round(rate[spec] / rate[syn], 4),
                            "data_wait_ms_per_step": r["data_wait_ms_per_step"]["mean"]})
    return {"multi_exit_overhead": overhead, "optimisation_gains": gains, "loader_vs_synthetic": loaders}


def evaluate_targets(rows: list[dict], ratios: dict, device: torch.device) -> list[dict]:
    rn50 = next((r["img_s"]["mean"] for r in rows if r["status"] == "ok" and r["model"] == "resnet50" and
                 r["size"] == 224 and r["variant"] == "plain" and r["amp"] == "bf16" and r["layout"] ==
                 "channels_last" and r["compile"] == "compiled" and r["loader"] == "synthetic"), None)
    out = [target(f"plain RN50 224px bf16 channels-last compiled synthetic >= {TARGET_RN50_IMG_S:.0f} img/s", rn50,
                  rn50 is not None and rn50 >= TARGET_RN50_IMG_S, device)]
    byot = [o for o in ratios["multi_exit_overhead"] if o["variant"] == "byot"] or [None]
    out += [target(f"BYOT {o['model']} {o['size']}px {', '.join(o['setting'].values())}: slowdown <= "
                   f"{TARGET_BYOT_EXCESS_PCT:.0f}% beyond FLOPs" if o else "BYOT slowdown vs FLOP prediction",
                   o and o["excess_over_flops_pct"], o and o["excess_over_flops_pct"] <= TARGET_BYOT_EXCESS_PCT,
                   device) for o in byot]
    dali = [o for o in ratios["loader_vs_synthetic"] if o["loader"] == "dali"] or [None]
    out += [target(f"DALI loader {o['model']} {o['size']}px {o['variant']} >= {TARGET_LOADER_RATIO:.0%} of synthetic"
                   if o else f"DALI loader >= {TARGET_LOADER_RATIO:.0%} of synthetic", o and o["ratio"],
                   o and o["ratio"] >= TARGET_LOADER_RATIO, device) for o in dali]
    return out


def render_markdown(payload: dict) -> str:
    rows, ratios, s = payload["runs"], payload["ratios"], payload["settings"]
    setting = lambda d: ", ".join(d[a] for a in AXES)  # noqa: E731

    def cells(r: dict) -> list:
        if r["status"] != "ok":
            return [f"{r['status']}: {r['reason']}", "", "", "", "", ""]
        return ["ok", f"{r['img_s']['mean']:.1f} ± {r['img_s']['std']:.1f}", f"{r['compute_img_s']['mean']:.1f}",
                f"{r['data_wait_ms_per_step']['mean']:.2f}", fmt(r["flops"]["train_per_sample"] / 1e9),
                fmt(r["loss"][-1])]

    return "".join([
        "# Training throughput: `selfdistill bench train`\n\n", provenance_md(payload["provenance"]),
        f"- batch {s['batch']} samples/step, {s['warmup']} warm-up + {s['repeats']} x {s['steps']} timed steps; "
        f"design {s['design']}; base setting {s['base']}\n- NVML: {payload['nvml']['status']}\n",
        "\n## Runs\n\nimg/s = training samples per second (mean ± std over repeats); compute = the steps alone; data "
        "wait = host time blocked in the loader; loss = the last repeat's mean.\n\n",
        md_table(["model", "px", "variant", "compile, amp, layout, backend, loader", "status", "img/s",
                  "compute img/s", "data wait ms/step", "train GFLOP/sample", "loss"],
                 [[r["model"], r["size"], r["variant"], setting(r), *cells(r)] for r in rows]),
        "\n## Overhead over the plain model against the FLOP prediction\n\nslowdown = plain img/s / variant img/s; "
        "predicted = train FLOPs per sample (forward + backward, partner and teacher passes included), variant / "
        f"plain; excess = slowdown / predicted - 1 (target for BYOT: <= {TARGET_BYOT_EXCESS_PCT:.0f}%).\n\n",
        md_table(["model", "px", "variant", "setting", "extra fwd FLOPs %", "extra train FLOPs %",
                  "measured slowdown", "FLOP-predicted", "excess %"],
                 [[o["model"], o["size"], o["variant"], setting(o["setting"]), o["extra_fwd_flops_pct"],
                   o["extra_train_flops_pct"], o["measured_slowdown"], o["flop_predicted_slowdown"],
                   o["excess_over_flops_pct"]] for o in ratios["multi_exit_overhead"]],
                 "(no pair of plain and multi-exit runs completed)"),
        "\n## Optimisation gains (img/s with / without, everything else equal)\n\n",
        md_table(["model", "px", "variant", "axis", "with", "without", "gain"],
                 [[g["model"], g["size"], g["variant"], g["axis"], g["with"], g["without"], g["gain"]]
                  for g in ratios["optimisation_gains"]], "(no completed pair differing in one optimisation)"),
        "\n## Real loader vs synthetic\n\n",
        md_table(["model", "px", "variant", "loader", "real img/s", "synthetic img/s", "ratio", "data wait ms/step"],
                 [[o["model"], o["size"], o["variant"], o["loader"], o["real_img_s"], o["synthetic_img_s"],
                   o["ratio"], o["data_wait_ms_per_step"]] for o in ratios["loader_vs_synthetic"]],
                 "(no real-loader run completed)"),
        "\n## Targets\n\n", md_table(["target", "status", "value"],
                                     [[t["target"], t["status"], fmt(t["value"])] for t in payload["targets"]])])


def figures(payload: dict) -> dict:
    ok, over = [r for r in payload["runs"] if r["status"] == "ok"], payload["ratios"]["multi_exit_overhead"]
    label = lambda r: f"{r['model']} {r['size']}px {r['variant']} | {', '.join(r[a] for a in AXES)}"  # noqa: E731
    return {**({"throughput.png": bars([label(r) for r in ok], {"img/s": [r["img_s"]["mean"] for r in ok]},
                                       "training samples / s", payload["provenance"]["device"]["name"])} if ok else {}),
            **({"multi_exit_overhead.png": bars(
                [f"{o['model']} {o['size']} {o['variant']}" for o in over],
                {"measured": [o["measured_slowdown"] for o in over],
                 "FLOP-predicted": [o["flop_predicted_slowdown"] for o in over]}, "slowdown vs plain (x)")}
               if over else {})}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device, out_dir = start(args, "train")
    models, sizes = csv_list(args.models, str, MODELS, "--models"), csv_list(args.sizes, int, flag="--sizes")
    variants = csv_list(args.variants, str, VARIANTS, "--variants")
    lists = {a: csv_list(getattr(args, "loaders" if a == "loader" else a), str, AXIS_CHOICES[a], f"--{a}")
             for a in AXES}
    if min(args.batch, args.steps, args.warmup + 1) < 1:
        fail("--batch and --steps must be >= 1, --warmup >= 0")
    runs = plan_runs(models, sizes, variants, lists, args.design, csv_list(args.ablate))
    log(f"[bench train] {len(runs)} runs on {device}; report -> {out_dir}")
    rows, flop_cache = [], {}
    settings = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                "design": args.design, "ablate": csv_list(args.ablate), "base": {a: v[0] for a, v in lists.items()},
                "axes": lists, "models": models, "sizes": sizes, "variants": variants,
                "config": args.config, "data": args.data, "dataset": args.dataset, "overrides": args.overrides}
    with NvmlSampler(device) as sampler:
        for i, spec in enumerate(runs):
            t = time.perf_counter()
            rows.append(run_one(spec, args, device, sampler, flop_cache))
            rate = f"{rows[-1]['img_s']['mean']:.1f} img/s" if rows[-1]["status"] == "ok" else rows[-1]["reason"]
            log(f"[bench train] {i + 1}/{len(runs)} {spec.key}: {rows[-1]['status']} {rate} "
                f"({time.perf_counter() - t:.1f} s)")
            ratios = compute_ratios(rows)
            payload = {"kind": "bench-train", "provenance": provenance(device), "settings": settings,
                       "nvml": {**sampler.summary(), "static": sampler.static}, "runs": rows, "ratios": ratios,
                       "targets": evaluate_targets(rows, ratios, device)}
            last = i + 1 == len(runs)  # rewritten after every run: a run stopped early keeps the runs it finished
            files = write_report(out_dir, payload, render_markdown(payload),
                                 figures(payload) if last and not args.no_plots else None)
    print(f"bench train: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} runs ok; report: {files['markdown']}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
