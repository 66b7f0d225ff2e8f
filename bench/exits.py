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

from bench.common import (
    NvmlSampler,
    bars,
    base_parser,
    count_flops,
    count_params,
    csv_list,
    cuda_graph_fn,
    fail,
    fmt,
    lines,
    log,
    md_table,
    provenance,
    provenance_md,
    start,
    stats,
    time_fn,
    write_report,
)
from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.config import config_from_dict, load_config, to_dict
from engine.evaluate import autocast, collect_outputs
from engine.metrics import exit_metrics
from engine.models import create_model
from engine.models.early_exit import EarlyExitModel, TruncatedModel, exit_index_for_threshold, exit_steps
from engine.setup_run import check_data_matches, data_from_config

MODES = ("eager", "compiled", "cudagraph")
SPEEDUP_TOLERANCE = 0.15  # target: measured per-exit speed-ups at batch 256 within 15% of the FLOP ratio
# BYOT's claims (Zhang et al. 2019, as summarised in performance-anchors.md §4), by the stages an exit runs (of 4).
BYOT_CLAIMS = {3: {"speedup": 1.2, "text": "~1.2x average acceleration at the 3/4 classifier (3 of 4 nets beat the "
                                           "baseline)"},
               2: {"speedup": 3.16, "text": "3.16x average acceleration at 2/4 with 3.3% accuracy loss (the anchors' "
                                            "FLOP count says 3.16x fits the 1/4 exit, not 2/4)"}}
# Ideal backbone-only speed-ups (MACs through k stages vs the whole net), performance-anchors.md §4.
ANCHOR_IDEAL = {("resnet18", "cifar"): {1: 3.64, 2: 1.94, 3: 1.32},
                ("resnet18", "imagenet"): {1: 3.13, 2: 1.83, 3: 1.29},
                ("resnet50", "imagenet"): {1: 5.20, 2: 2.25, 3: 1.25}}


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
    p.add_argument("--modes", help="eager,compiled,cudagraph (default: all on GPU, eager,compiled on CPU)")
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
        bundle = data_from_config(dcfg, device)
        check_data_matches(dcfg, bundle)
    except Exception as e:  # noqa: BLE001 - missing data is a report line, not a crash
        return None, f"no data: {type(e).__name__}: {e}"
    split = args.split or ("val" if bundle.val is not None else "test")
    loader = bundle.val if split == "val" else bundle.test
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
    n, n_stages, x1 = model.num_exits, len(model.backbone.stages), make_input(1, cfg, device)
    ideal = ANCHOR_IDEAL.get((cfg.model.name, cfg.model.stem), {})
    exits, h, path = [], x1, 0
    with torch.no_grad():
        for k, step in enumerate(exit_steps(model)):  # exit k's path: every stage and head up to k
            path += count_flops(step, h)
            out = step.stages(step.stem(h))
            trunc = TruncatedModel(model, k).eval()
            depth = len(trunc.body.stages)
            shallow = k < n - 1
            exits.append({"exit": k, "stage": int(model.exit_info[k]["stage"]), "depth": f"{depth}/{n_stages}",
                          "params": count_params(trunc), "head_params": count_params(model.heads[k]) if shallow else 0,
                          "flops_per_image": count_flops(trunc, x1), "early_exit_path_flops_per_image": path,
                          "head_flops_per_image": count_flops(step.head, out) if shallow else 0,
                          "byot_claim": BYOT_CLAIMS.get(depth) if shallow else None,
                          "anchor_ideal_backbone_speedup": ideal.get(depth) if shallow else None, "module": trunc})
            h = out
        all_flops = count_flops(model, x1)
    for e in exits:
        e["backbone_flops_per_image"] = e["flops_per_image"] - e["head_flops_per_image"]
    lat: dict[str, dict[str, dict[int, Any]]] = {}
    nvml: dict[str, Any] = {}
    targets = {f"exit{e['exit']}": e.pop("module") for e in exits} | {"all_exits": AllExits(model)}
    for mode in modes:
        t0 = time.perf_counter()
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
        if mode == "compiled":
            torch._dynamo.reset()
    full = exits[-1]
    for e in exits:
        e["latency"] = lat[f"exit{e['exit']}"]
        e["flop_ratio_vs_full"] = round(full["flops_per_image"] / e["flops_per_image"], 4)
        e["backbone_flop_ratio_vs_full"] = round(full["backbone_flops_per_image"] / e["backbone_flops_per_image"], 4)
    for e in exits:
        e["speedup_vs_full"] = {m: {bs: round(full["latency"][m][bs]["ms"]["mean"] / e["latency"][m][bs]["ms"]["mean"],
                                              4) if "ms" in e["latency"][m][bs] and "ms" in full["latency"][m][bs]
                                    else None for bs in batch_sizes} for m in modes}
    return {"exits": exits, "nvml": nvml, "all_exits": {
        "params": count_params(model), "flops_per_image": all_flops, "latency": lat["all_exits"],
        "extra_flops_over_full_pct": round((all_flops / full["flops_per_image"] - 1) * 100, 3)}}


def speedup_checks(exits: list[dict], modes: list[str], batch_sizes: list[int]) -> list[dict]:
    """Measured speed-up at batch 256 (else the largest batch) within 15% of the FLOP ratio."""
    bs, out = 256 if 256 in batch_sizes else max(batch_sizes), []
    for e in exits[:-1]:
        for m in modes:
            s = e["speedup_vs_full"][m][bs]
            if s is not None:
                rel = s / e["flop_ratio_vs_full"] - 1
                out.append({"exit": e["exit"], "depth": e["depth"], "mode": m, "batch": bs, "measured_speedup": s,
                            "flop_ratio": e["flop_ratio_vs_full"], "deviation_pct": round(rel * 100, 2),
                            "within_15pct": abs(rel) <= SPEEDUP_TOLERANCE})
    return out


def policy_curve(logits: list[Tensor], labels: Optional[Tensor], thresholds: list[float], exits: list[dict]
                 ) -> list[dict]:
    """The policy simulated on collected logits: exit mix, accuracy and mean FLOPs per image for each threshold."""
    path, full, rows = [e["early_exit_path_flops_per_image"] for e in exits], exits[-1]["flops_per_image"], []
    for thr in thresholds:
        idx = exit_index_for_threshold(logits, thr)
        frac = (torch.bincount(idx, minlength=len(logits)).double() / len(idx)).tolist()
        chosen = torch.stack(logits)[idx, torch.arange(len(idx))]
        mean_flops = sum(f * p for f, p in zip(frac, path))
        rows.append({"threshold": thr, "exit_fraction": [round(f, 6) for f in frac], "mean_flops_per_image": mean_flops,
                     "flop_speedup_vs_full": round(full / mean_flops, 4),
                     "top1": None if labels is None else round(100.0 * (chosen.argmax(1) == labels).double().mean()
                                                                .item(), 4)})
    return rows


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

    with autocast(device, amp):
        ref_logits = [torch.cat([z.float().cpu() for z in zs]) for zs in zip(*[model(b).logits for b in batches])]
    full, _ = run(TruncatedModel(model, -1).eval())
    res: dict[str, Any] = {"status": "ok", "batch_size": bs, "images": len(batches) * bs, "mode": "eager",
                           "full_ms_per_image": full, "per_threshold": []}
    for thr in thresholds:
        st, outs = run(EarlyExitModel(model, thr).eval())
        got = torch.cat([o[1].cpu() for o in outs])
        res["per_threshold"].append({
            "threshold": thr, "ms_per_image": st, "speedup_vs_full": round(full["mean"] / st["mean"], 4),
            "exit_fraction": (torch.bincount(got, minlength=model.num_exits).double() / len(got)).tolist(),
            "agreement_with_simulation": round((got == exit_index_for_threshold(ref_logits, thr)).double().mean()
                                               .item(), 6)})
    return res


def render_markdown(p: dict) -> str:
    s, exits, ae = p["settings"], p["exits"], p["all_exits"]
    m0, bss = "compiled" if "compiled" in s["modes"] else s["modes"][0], s["batch_sizes"]
    acc = {e["exit"]: p["accuracy"].get(f"exit{e['exit']}", {}).get("top1") for e in exits}
    meas = {r["threshold"]: r for r in p["policy_measured"].get("per_threshold", [])}
    ms = lambda r: f"{r['ms']['mean']:.4f} ± {r['ms']['std']:.4f}" if r["status"] == "ok" else r["status"]  # noqa
    md = [f"# Per-exit profile: `selfdistill profile exits`\n\n{provenance_md(p['provenance'])}",
          f"- model: {p['model']['name']} ({p['model']['stem']} stem), {p['model']['image_size']} px, "
          f"{p['model']['num_classes']} classes, exits after stages {p['model']['exit_stages']}, {p['model']['head']} "
          f"heads; source: {p['source']['mode']} {p['source'].get('checkpoint', '')}\n- latency: {s['amp']}, "
          f"{'channels-last' if s['channels_last'] else 'NCHW'}, {s['warmup']} warm-up + {s['repeats']} x "
          f"{s['iters']} timed calls; modes {', '.join(s['modes'])}\n- accuracy: {p['accuracy_source']}\n"
          f"- NVML: {p['nvml_status']}\n", f"\n## Exits (speed-up = full-model latency / exit latency, {m0})\n\n"
          "full = the deepest exit alone (the single-exit network). FLOP ratio = full FLOPs / exit FLOPs (heads "
          "included); backbone-only = without the exit head; anchors = the ideal backbone-only ratio counted in "
          "performance-anchors.md.\n\n",
          md_table(["exit", "depth", "params (M)", "GFLOPs/img", "FLOP ratio", "backbone-only ratio", "anchors",
                    *[f"speed-up bs{b}" for b in bss], "BYOT claim", "top-1"],
                   [[e["exit"], e["depth"], fmt(e["params"] / 1e6), fmt(e["flops_per_image"] / 1e9),
                     e["flop_ratio_vs_full"], e["backbone_flop_ratio_vs_full"], fmt(e["anchor_ideal_backbone_speedup"]),
                     *[fmt(e["speedup_vs_full"][m0][b]) for b in bss],
                     f"{e['byot_claim']['speedup']}x" if e["byot_claim"] else "", fmt(acc[e["exit"]])] for e in exits]),
          "".join(f"\nBYOT claim: {t}.\n" for t in dict.fromkeys(e["byot_claim"]["text"] for e in exits
                                                                   if e["byot_claim"])),
          f"\nAll exits at once (the training forward): {fmt(ae['params'] / 1e6)} M params, "
          f"{fmt(ae['flops_per_image'] / 1e9)} GFLOPs/img, +{ae['extra_flops_over_full_pct']}% FLOPs over the full "
          "model.\n\n## Latency (ms per batch, mean ± std)\n\n",
          md_table(["model", "mode", *[f"bs{b}" for b in bss]],
                   [[name, m, *[ms(lat[m][b]) for b in bss]] for name, lat in
                    [(f"exit{e['exit']} ({e['depth']})", e["latency"]) for e in exits] + [("all exits", ae["latency"])]
                    for m in s["modes"]]),
          f"\n## Speed-up vs FLOP ratio (target: within {SPEEDUP_TOLERANCE:.0%} at batch 256; on a CPU run this "
          "describes this CPU only)\n\n",
          md_table(["exit", "depth", "mode", "batch", "measured", "FLOP ratio", "deviation %", "within 15%"],
                   [list(c.values()) for c in p["speedup_checks"]], "(no shallow exit measured)"),
          "\n## Accuracy (%)\n\n" + md_table(["predictor", "top-1", "top-5", "NLL", "ECE"], [
              [k, fmt(v["top1"]), fmt(v["top5"]), fmt(v["nll"]), fmt(v["ece"])] for k, v in p["accuracy"].items()
              if not k.startswith("_")]) if p["accuracy"] else "",
          f"\n## Early-exit policy (first exit with max-softmax >= threshold)\n\nSimulated on {p['policy_source']}; "
          f"measured with EarlyExitModel (eager) at batch {p['policy_measured'].get('batch_size', 'n/a')}: "
          f"{p['policy_measured']['status']}.\n\n",
          md_table(["threshold", "exit mix % (shallow->deep)", "top-1", "mean GFLOPs/img", "FLOP speed-up",
                    "measured ms/img", "measured speed-up", "agreement"],
                   [[r["threshold"], " / ".join(f"{100 * f:.1f}" for f in r["exit_fraction"]), fmt(r["top1"]),
                     fmt(r["mean_flops_per_image"] / 1e9), fmt(r["flop_speedup_vs_full"]),
                     *([fmt(m["ms_per_image"]["mean"]), fmt(m["speedup_vs_full"]), fmt(m["agreement_with_simulation"])]
                       if (m := meas.get(r["threshold"])) else ["n/a"] * 3)] for r in p["policy"]])]
    if p["policy_measured"]["status"] == "ok":
        md.append(f"\nFull model alone on the same images: {fmt(p['policy_measured']['full_ms_per_image']['mean'])} "
                  "ms/img (eager).\n")
    return "".join(md)


def figures(p: dict) -> dict[str, Callable]:
    modes, bss, exits, policy = p["settings"]["modes"], p["settings"]["batch_sizes"], p["exits"], p["policy"]
    m0, shallow = "compiled" if "compiled" in modes else modes[0], exits[:-1]
    bs = 256 if 256 in bss else max(bss)
    figs = {"latency.png": lines({f"exit{e['exit']} ({e['depth']})": [
        (b, e["latency"][m0][b]["ms_per_image"]) for b in bss if e["latency"][m0][b]["status"] == "ok"] for e in exits},
        "batch size", f"ms per image ({m0})", log="xy")}
    if shallow:
        figs["speedup.png"] = bars([f"exit{e['exit']} ({e['depth']})" for e in shallow], {
            f"measured ({m0}, bs{bs})": [e["speedup_vs_full"][m0][bs] or 0 for e in shallow],
            "FLOP ratio": [e["flop_ratio_vs_full"] for e in shallow],
            "BYOT claim": [(e["byot_claim"] or {}).get("speedup", 0) for e in shallow]}, "speed-up over the full model")
    if policy[0]["top1"] is not None:
        figs["early_exit.png"] = lines({"confidence early exit": [(r["mean_flops_per_image"] / 1e9, r["top1"])
                                                                  for r in policy]}, "mean GFLOPs / image", "top-1 (%)")
    else:
        figs["early_exit.png"] = lines({f"exit{k}": [(r["threshold"], r["exit_fraction"][k]) for r in policy]
                                        for k in range(len(exits))}, "threshold", "fraction exiting (no labels)")
    return figs


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device, out_dir = start(args, "exits")
    modes = csv_list(args.modes, str, MODES, "--modes") if args.modes else (
        list(MODES) if device.type == "cuda" else ["eager", "compiled"])
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
            with torch.no_grad(), autocast(device, cfg.precision.amp):
                outs = [model(x.to(device).contiguous(memory_format=mf)).logits for x in kept.split(64)]
            logits = [torch.cat([z.float().cpu() for z in zs]) for zs in zip(*outs)]
            labels, policy_source = None, f"{len(kept)} random inputs (no labels: exit mix and FLOPs only)"
        curve = policy_curve(logits, labels, thresholds, static["exits"])
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
               **static, "speedup_checks": speedup_checks(static["exits"], modes, batch_sizes),
               "accuracy_source": acc_source, "accuracy": accuracy, "policy_source": policy_source, "policy": curve,
               "policy_measured": measured, "nvml_status": sampler.status,
               "elapsed_s": round(time.perf_counter() - t0, 2)}
    files = write_report(out_dir, payload, render_markdown(payload), None if args.no_plots else figures(payload))
    print(f"profile exits: report {files['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
