"""`selfdistill export`: a deployable model from a training checkpoint, truncated at one exit or early-exiting.

--exit K: `TruncatedModel` (stem + stages up to exit K + exit K's head; K = 0 shallowest, -1 = the last = the full
single-exit network); the artefact maps images [B, C, H, W] (float32, normalised like the training data) to
logits [B, num_classes]. --early-exit T: `EarlyExitModel` (per sample: the first exit whose max-softmax >= T); the
artefact returns (logits [B, num_classes] float32, exit_index [B] int64). See engine/models/early_exit.py.

Formats: `export` = torch.export ExportedProgram saved with torch.export.save (load: torch.export.load(FILE)
.module()); `torchscript` = torch.jit.save (load: torch.jit.load(FILE)); `onnx` = torch.onnx.export with dynamo
(load: onnxruntime.InferenceSession(FILE); engine/export_onnx.py). The batch dimension is dynamic; the image
size is the training size (data.image_size). After writing, the artefact is loaded back and compared with the
training model on a fresh random batch (of another batch size); a mismatch fails the command. A sidecar FILE.json
records the exit, threshold, input shape, normalisation, class names and provenance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from engine.config import ConfigError
from engine.export_onnx import load_onnx, save_onnx, to_onnx
from engine.models.early_exit import EarlyExitModel, TruncatedModel, exit_index_for_threshold
from engine.rundir import provenance

FORMATS = ("export", "torchscript", "onnx")
ATOL, RTOL = 1e-4, 1e-4
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0/1; export with 2 and mark the batch dimension dynamic
CHECK_BATCH = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--exit", type=int, help="exit index: 0 = shallowest, -1 = the last (full model)")
    which.add_argument("--early-exit", type=float, metavar="THRESHOLD",
                       help="confidence threshold of the early-exit policy (0 = always exit 0, > 1 = always last)")
    p.add_argument("--format", choices=FORMATS, default="export")
    p.add_argument("--out", required=True, help="artefact file (e.g. model.pt2 for export, model.ts for torchscript, "
                   "model.onnx for onnx)")
    p.add_argument("--weights", choices=("model", "ema"), default="model")
    p.add_argument("--max-batch", type=int, default=4096, help="upper bound of the dynamic batch dimension (export)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the artefact back and comparing")
    p.add_argument("overrides", nargs="*", help="config overrides on top of the checkpoint's config")
    return p


def deploy_module(model: nn.Module, exit_k: Optional[int], threshold: Optional[float]) -> nn.Module:
    model.eval()
    if threshold is not None:
        return EarlyExitModel(model, threshold).eval()
    return TruncatedModel(model, exit_k).eval()


def export_artifact(module: nn.Module, example: Tensor, fmt: str, max_batch: int = 4096) -> Any:
    """The torch.export ExportedProgram or the TorchScript module of an (eval-mode) deploy module."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in recent torch
        if fmt == "export":
            target = module.exportable() if isinstance(module, EarlyExitModel) else module
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            return torch.export.export(target, (example,), dynamic_shapes={"x": {0: batch}})
        if fmt == "onnx":
            return to_onnx(module.exportable() if isinstance(module, EarlyExitModel) else module, example, max_batch)
        if fmt == "torchscript":
            if isinstance(module, EarlyExitModel):
                return module.to_torchscript(example)
            return torch.jit.trace(module, (example,), check_trace=False)
    raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")


def save_artifact(artifact: Any, fmt: str, path: Path) -> None:
    # torch's writers report an unwritable folder as an internal assertion ("inline_container.cc"): check first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--out {path}: cannot create {path.parent}: {e.strerror or e}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {path}: {path.parent} is not writable (permission denied)")
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "export":
        torch.export.save(artifact, str(tmp))
    elif fmt == "onnx":
        save_onnx(artifact, tmp)
    else:
        torch.jit.save(artifact, str(tmp))
    tmp.replace(path)


def load_artifact(path: str | Path, fmt: Optional[str] = None) -> Any:
    """A callable module from an artefact written by this command (format from the sidecar or the content)."""
    path = Path(path)
    if fmt is None:
        side = Path(str(path) + ".json")
        fmt = json.loads(side.read_text())["format"] if side.is_file() else None
    if fmt == "export" or (fmt is None and path.suffix == ".pt2"):
        return torch.export.load(str(path)).module()
    if fmt == "onnx" or (fmt is None and path.suffix == ".onnx"):
        return load_onnx(path)
    return torch.jit.load(str(path))


def reference_outputs(model: nn.Module, x: Tensor, exit_k: Optional[int], threshold: Optional[float]
                      ) -> tuple[Tensor, Optional[Tensor]]:
    """What the training model says: exit K's logits, or the logits of each sample's chosen exit."""
    with torch.no_grad():
        logits = model(x).logits
    if threshold is None:
        return logits[exit_k], None
    idx = exit_index_for_threshold(logits, threshold)
    return torch.stack(logits)[idx, torch.arange(x.shape[0])].float(), idx


def verify(loaded: Any, model: nn.Module, x: Tensor, exit_k: Optional[int], threshold: Optional[float]
           ) -> dict[str, Any]:
    if loaded is None:  # an ONNX file without onnxruntime: onnx.checker passed it, nothing ran
        return {"batch": int(x.shape[0]), "ok": True, "ran": False,
                "note": "onnx.checker passed; install onnxruntime to compare outputs"}
    with torch.no_grad():
        out = loaded(x)
    ref, ref_idx = reference_outputs(model, x, exit_k, threshold)
    logits, idx = (out if threshold is not None else (out, None))
    res: dict[str, Any] = {"batch": int(x.shape[0]), "max_abs_diff": float((logits - ref).abs().max()),
                           "allclose": bool(torch.allclose(logits, ref, atol=ATOL, rtol=RTOL))}
    if threshold is not None:
        res["exit_index_equal"] = bool(torch.equal(idx, ref_idx))
        res["exit_index"] = idx.tolist()
    res["ok"] = res["allclose"] and res.get("exit_index_equal", True)
    return res


def normalisation(ck: dict, cfg) -> dict[str, Any]:
    """What the training loader applied to uint8 images, (x / 255 - mean) / std per channel: recorded in the
    checkpoint; an older checkpoint has only the config's, null where the loader computed its own."""
    if ck.get("normalisation"):
        return {**ck["normalisation"], "formula": "(x / 255 - mean) / std"}
    return {"mean": cfg.data.mean, "std": cfg.data.std, "formula": "(x / 255 - mean) / std",
            "note": "null: not recorded in this checkpoint (the loader's dataset statistics)"}


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.early_exit is not None and not (math.isfinite(args.early_exit) and args.early_exit >= 0):
        parser.error(f"--early-exit {args.early_exit}: the threshold must be a finite number >= 0 (0 = always "
                     "exit 0, above 1 = always the last exit)")
    ck = load_checkpoint(args.checkpoint, "cpu")
    try:
        model, cfg = model_from_checkpoint(ck, list(args.overrides), args.weights, str(args.checkpoint))
    except ValueError as e:  # a bad override: one line naming the checkpoint, exit 2 (engine.cli)
        raise CheckpointError(f"{args.checkpoint}: {e}") from None
    model.eval()
    if args.exit is not None and not -model.num_exits <= args.exit < model.num_exits:
        parser.error(f"--exit {args.exit}: the model has {model.num_exits} exits (0..{model.num_exits - 1}, "
                     "-1 = the last)")
    exit_k = None if args.exit is None else args.exit % model.num_exits
    try:
        module = deploy_module(model, exit_k, args.early_exit)
    except NotImplementedError as e:  # early exit on a backbone without a stage chain
        raise ConfigError(f"--early-exit: {e}") from None
    shape = (cfg.model.in_chans, cfg.data.image_size, cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=g)
    out = Path(args.out)
    artifact = export_artifact(module, example, args.format, args.max_batch)
    save_artifact(artifact, args.format, out)
    meta: dict[str, Any] = {
        "format": args.format, "kind": "early_exit" if exit_k is None else "truncated", "exit": exit_k,
        "threshold": args.early_exit, "num_exits": model.num_exits,
        "exit_stage": None if exit_k is None else int(model.exit_info[exit_k]["stage"]),
        "exit_stages": [int(i["stage"]) for i in model.exit_info], "input_shape": ["batch", *shape],
        "input_dtype": "float32", "outputs": (["logits [B, C] float32", "exit_index [B] int64"] if exit_k is None
                                              else ["logits [B, C]"]),
        "num_classes": cfg.model.num_classes, "class_names": ck.get("class_names"),
        "normalisation": normalisation(ck, cfg),
        "model": {"name": cfg.model.name, "stem": cfg.model.stem, "width": cfg.model.width,
                  "depths": cfg.model.depths, "head": cfg.exits.head},
        "checkpoint": str(args.checkpoint), "weights": args.weights,
        "load": {"export": "torch.export.load(FILE).module()", "torchscript": "torch.jit.load(FILE)",
                 "onnx": "onnxruntime.InferenceSession(FILE)"}[args.format],
        "provenance": provenance(),
    }
    if not args.no_verify:
        x = torch.randn(CHECK_BATCH, *shape, generator=g)
        meta["verification"] = verify(load_artifact(out, args.format), model, x, exit_k, args.early_exit)
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    v = meta.get("verification")
    if v is not None and not v["ok"]:
        print(f"export: MISMATCH between {out} and the training model: {v}")
        return 1
    print(f"export: wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)"
          + (f"; verified on batch {v['batch']}, max |diff| {v['max_abs_diff']:.2e}" if v and v.get("ran", True)
             else f"; {v['note']}" if v else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
