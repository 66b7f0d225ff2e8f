"""`selfdistill profile exits`: per-exit parameters, FLOPs, latency and accuracy, and the early-exit policy curve.

The model comes from --checkpoint (its config and weights, overrides on top) or is randomly initialised from the
config (accuracy then needs data); its `precision.*` keys say how it runs. Exit k is deployed as
`TruncatedModel(model, k)`; the confidence policy is simulated on the collected logits and measured with
`EarlyExitModel`. bench/README.md says what each figure is.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from bench.measure import NvmlSampler, cuda_graph_fn, stats, time_fn
from bench.profile_report import add_claims, figures, render_markdown, speedup_checks
from bench.report import base_parser, csv_list, fail, log, provenance, start, write_report
from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.config import config_from_dict, load_config, to_dict
from engine.evaluate import collect_outputs, exit_logits
from engine.evaluate_cli import split_loader
from engine.metrics import exit_metrics
from engine.models import create_model
from engine.models.early_exit import EarlyExitModel, TruncatedModel, exit_index_for_threshold, policy_curve
from engine.models.exit_flops import exit_costs
from engine.precision import autocast

MODES = ("eager", "compiled", "cudagraph")


def build_parser():
    p = base_parser("selfdistill profile exits", __doc__)
    p.add_argument("--checkpoint", help="a training checkpoint (last.pt / best.pt); none = random init")
    p.add_argument("--weights", choices=("model", "ema"), default="model")
    p.add_argument("--config", help="YAML config for random-init mode")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.name=resnet50 precision.amp=bf16")
    p.add_argument("--data", help="image folder (root/train|val|test/<class>/...) for accuracy")
    p.add_argument("--split", choices=("val", "test"), help="default: val if present, else test")
    p.add_argument("--limit-eval", type=int, default=0, help="evaluate at most N images (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--modes", help="eager,compiled,cudagraph (default: all on GPU; eager on CPU, where compiling "
                   "each exit at each batch size takes minutes)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed calls per repeat")
    p.add_argument("--thresholds", default="0,0.3,0.5,0.6,0.7,0.8,0.9,0.95,0.99,1.01")
    p.add_argument("--ee-batch-size", type=int, default=1, help="batch size of the measured early-exit latency")
    p.add_argument("--ee-samples", type=int, default=256, help="images run through EarlyExitModel per threshold")
    return p


def load_model(args) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode on CPU, config, where it came from)."""
    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint, "cpu")
        model, cfg = model_from_checkpoint(ck, list(args.overrides), args.weights, str(args.checkpoint))
        return model.eval(), cfg, {"mode": "checkpoint", "checkpoint": str(args.checkpoint), "weights": args.weights,
                                   "class_names": ck.get("class_names")}
    cfg = load_config(args.config, list(args.overrides))
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, cfg.exits).eval(), cfg, {"mode": "random-init", "config": args.config,
                                                            "overrides": list(args.overrides)}


def make_input(batch: int, cfg, device: torch.device, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.model.in_chans, cfg.data.image_size, cfg.data.image_size, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cfg.precision.channels_last else x


def prepare(module: nn.Module, mode: str, precision) -> Callable[..., Any]:
    """What a mode times: the module, or torch.compile of it (static shapes, in a fresh dynamo cache so its batch
    sizes recompile within the cache limit)."""
    if mode != "compiled":
        return module
    torch._dynamo.reset()
    return torch.compile(module, backend=precision.compile_backend, mode=precision.compile_mode, dynamic=False)


def latency(fn: Callable[..., Any], x: Tensor, mode: str, args, device: torch.device, amp: str) -> list[float]:
    """ms per call of fn(x) under no_grad, per repeat; cudagraph: captured once, then replayed."""
    def call() -> Any:
        with torch.no_grad(), autocast(device, amp, cache=False):  # no weight-cast cache inside a graph capture
            return fn(x)

    if mode == "cudagraph":
        call = cuda_graph_fn(call, warmup=max(3, args.warmup))
    return time_fn(call, device, warmup=args.warmup, iters=args.iters, repeats=args.repeats)


def eval_loader(cfg, args, source: dict, device: torch.device) -> tuple[Optional[Any], str]:
    """(loader, description) of the split used for accuracy, or (None, why not)."""
    if args.data is None and source["mode"] != "checkpoint" and args.config is None and not any(
            o.startswith("data.dataset=") for o in args.overrides):
        return None, "no data: random-init mode without --data (accuracy not computed)"
    d = to_dict(cfg)
    if args.data is not None:
        d["data"].update(dataset="imagefolder", root=args.data)
    if d["data"]["dataset"] == "synthetic":
        return None, "no data: data.dataset is synthetic (accuracy not computed)"
    # sampler / extra_view stay as trained: they only shape the training loader
    d["data"].update(eval_batch_size=args.eval_batch_size, limit_eval=args.limit_eval)
    try:
        dcfg = config_from_dict(d)
        loader, split = split_loader(dcfg, args.split, device)
    except Exception as e:  # noqa: BLE001 - missing data is a report line, not a crash
        return None, f"no data: {type(e).__name__}: {e}"
    if loader is None:
        return None, f"no data: the dataset has no {split} split"
    return loader, f"{dcfg.data.dataset} {split} split ({loader.num_samples} images)"


class AllExits(nn.Module):
    """The training-time forward (every exit), as one stacked tensor so compile and graphs see a tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack(self.model(x).logits)


def profile_static(model: nn.Module, cfg, args, device: torch.device, modes: list[str], batch_sizes: list[int],
                   sampler: NvmlSampler) -> dict[str, Any]:
    """Parameters and FLOPs of every exit, and the latency of each alone and of all at once, per mode and batch."""
    exits, all_exits = exit_costs(model, make_input(1, cfg, device))
    add_claims(exits, cfg.model.name, cfg.model.stem)
    lat: dict[str, dict[str, dict[int, Any]]] = {}
    nvml: dict[str, Any] = {}
    targets = {f"exit{e['exit']}": TruncatedModel(model, e["exit"]).eval() for e in exits} | {
        "all_exits": AllExits(model)}
    for mode in modes:
        t0 = time.perf_counter()
        log(f"[profile exits] latency, {mode}: {len(targets)} targets x batch sizes {batch_sizes}")
        for name, module in targets.items():
            fn = prepare(module, mode, cfg.precision)
            for bs in batch_sizes:
                try:
                    ms = stats(latency(fn, make_input(bs, cfg, device, seed=bs), mode, args, device,
                                       cfg.precision.amp), 4)
                    res = {"status": "ok", "ms": ms, "ms_per_image": round(ms["mean"] / bs, 6),
                           "img_s": round(bs * 1e3 / ms["mean"], 2)}
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at batch 256 on a small GPU
                    res = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
                    log(f"[profile exits] {name} {mode} bs{bs}: {res['reason']}")
                lat.setdefault(name, {}).setdefault(mode, {})[bs] = res
        nvml[mode] = sampler.summary(t0, time.perf_counter())
        log(f"[profile exits] latency, {mode}: done in {time.perf_counter() - t0:.1f} s")
        if mode == "compiled":
            torch._dynamo.reset()
    full = lat[f"exit{exits[-1]['exit']}"]
    for e in exits:
        mine = e["latency"] = lat[f"exit{e['exit']}"]
        e["speedup_vs_full"] = {m: {bs: round(full[m][bs]["ms"]["mean"] / mine[m][bs]["ms"]["mean"], 4)
                                    if "ms" in mine[m][bs] and "ms" in full[m][bs] else None for bs in batch_sizes}
                                for m in modes}
    return {"exits": exits, "nvml": nvml, "all_exits": {**all_exits, "latency": lat["all_exits"]}}


@torch.no_grad()
def measure_policy(model: nn.Module, images: Tensor, thresholds: list[float], args, cfg, device: torch.device
                   ) -> dict[str, Any]:
    """EarlyExitModel's eager latency per image over `images` in batches of --ee-batch-size, per threshold, next to
    the deepest exit alone on the same images, and how often its exit choice agrees with the simulated policy."""
    bs, amp = args.ee_batch_size, cfg.precision.amp
    mf = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    batches = [images[i:i + bs].to(device).contiguous(memory_format=mf) for i in range(0, len(images) - bs + 1, bs)]
    if not batches:
        return {"status": f"unavailable: fewer than --ee-batch-size={bs} images"}

    def run(module: nn.Module) -> tuple[dict, list]:
        with autocast(device, amp):
            outs = [module(b) for b in batches]  # also the warm-up
            ms = time_fn(lambda: [module(b) for b in batches], device, 0, 1, args.repeats)
        return stats([t / (len(batches) * bs) for t in ms]), outs

    try:
        policies = {thr: EarlyExitModel(model, thr).eval() for thr in thresholds}
    except NotImplementedError as e:  # a backbone without a stage chain (timm's): simulated policy only
        return {"status": f"unavailable: {e}"}
    ref_logits = exit_logits(model, batches, device, amp)
    full, _ = run(TruncatedModel(model, -1).eval())
    res: dict[str, Any] = {"status": "ok", "batch_size": bs, "images": len(batches) * bs, "mode": "eager",
                           "full_ms_per_image": full, "per_threshold": []}
    for thr in thresholds:
        st, outs = run(policies[thr])
        got = torch.cat([o[1].cpu() for o in outs])
        res["per_threshold"].append({
            "threshold": thr, "ms_per_image": st, "speedup_vs_full": round(full["mean"] / st["mean"], 4),
            "exit_fraction": (torch.bincount(got, minlength=model.num_exits).double() / len(got)).tolist(),
            "agreement_with_simulation": round((got == exit_index_for_threshold(ref_logits, thr)).double().mean()
                                               .item(), 6)})
    return res


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device, out_dir = start(args, "exits")
    modes = csv_list(args.modes, str, MODES, "--modes") if args.modes else (
        list(MODES) if device.type == "cuda" else ["eager"])
    if "cudagraph" in modes and device.type != "cuda":
        log("[profile exits] cudagraph mode needs a CUDA device; skipped on CPU")
        modes.remove("cudagraph")
    batch_sizes, thresholds = csv_list(args.batch_sizes, int, flag="--batch-sizes"), csv_list(args.thresholds, float)
    if not modes or min(batch_sizes) < 1:
        fail("--modes: nothing left to measure on this device" if not modes else
             "--batch-sizes: positive integers, e.g. 1,32,256")
    model, cfg, source = load_model(args)
    mf = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=mf)
    torch.backends.cudnn.benchmark = True
    log(f"[profile exits] {cfg.model.name} {cfg.data.image_size}px, {model.num_exits} exits, modes {modes}, "
        f"batch sizes {batch_sizes} on {device}; report -> {out_dir}")
    t0 = time.perf_counter()
    with NvmlSampler(device) as sampler:
        static = profile_static(model, cfg, args, device, modes, batch_sizes, sampler)
        loader, acc_source = eval_loader(cfg, args, source, device)
        accuracy: dict[str, Any] = {}
        log(f"[profile exits] accuracy and exit logits: {acc_source}")
        if loader is not None:
            logits, _, labels = collect_outputs(model, loader, device, cfg.precision.amp, features=False)
            accuracy = {**exit_metrics(logits, labels, cfg.logging.ece_bins), "_count": {"samples": len(labels)}}
            logits, labels = [z.cpu() for z in logits], labels.cpu()
            kept = []
            for b in loader:  # the first --ee-samples images, for the measured policy
                kept.append(b.images.float().cpu())
                if sum(map(len, kept)) >= args.ee_samples:
                    break
            kept = torch.cat(kept)[: args.ee_samples]
            policy_source = acc_source
        else:
            kept = make_input(args.ee_samples, cfg, torch.device("cpu")).contiguous()
            logits = exit_logits(model, (x.to(device).contiguous(memory_format=mf) for x in kept.split(64)), device,
                                 cfg.precision.amp)
            labels, policy_source = None, f"{len(kept)} random inputs (no labels: exit mix and FLOPs only)"
        exits = static["exits"]
        curve = policy_curve(logits, labels, thresholds, [e["early_exit_path_flops_per_image"] for e in exits],
                             exits[-1]["flops_per_image"])
        log(f"[profile exits] early-exit policy, measured: {len(thresholds)} thresholds x {len(kept)} images "
            f"in batches of {args.ee_batch_size}")
        measured = measure_policy(model, kept, thresholds, args, cfg, device)
    payload = {"kind": "profile-exits", "provenance": provenance(device), "source": source,
               "model": {"name": cfg.model.name, "stem": cfg.model.stem, "image_size": cfg.data.image_size,
                         "in_chans": cfg.model.in_chans, "num_classes": cfg.model.num_classes,
                         "width": cfg.model.width, "depths": cfg.model.depths, "exit_stages": list(cfg.exits.stages),
                         "head": cfg.exits.head, "num_exits": model.num_exits},
               "settings": {"batch_sizes": batch_sizes, "modes": modes, "amp": cfg.precision.amp,
                            "channels_last": cfg.precision.channels_last, "warmup": args.warmup, "iters": args.iters,
                            "repeats": args.repeats, "compile_backend": cfg.precision.compile_backend,
                            "compile_mode": cfg.precision.compile_mode, "thresholds": thresholds,
                            "ee_batch_size": args.ee_batch_size, "ee_samples": args.ee_samples},
               **static, "speedup_checks": speedup_checks(exits, modes, batch_sizes),
               "accuracy_source": acc_source, "accuracy": accuracy, "policy_source": policy_source, "policy": curve,
               "policy_measured": measured, "nvml_status": sampler.status,
               "elapsed_s": round(time.perf_counter() - t0, 2)}
    files = write_report(out_dir, payload, render_markdown(payload), None if args.no_plots else figures(payload))
    print(f"profile exits: report {files['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
