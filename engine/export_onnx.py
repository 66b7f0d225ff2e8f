"""The ONNX format of `selfdistill export`: `torch.onnx.export(dynamo=True)` of the same modules as torch.export
(the early-exit form's `torch.cond` becomes an ONNX `If`), read back with onnxruntime where it is installed, else
checked structurally by `onnx.checker` (the sidecar's verification then says that nothing was run)."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from engine.config import ConfigError

INSTALL = "pip install onnx onnxscript (or 'selfdistill[onnx]'); onnxruntime to verify the result"


def to_onnx(module: nn.Module, example: Tensor, max_batch: int) -> Any:
    """The ONNXProgram of an eval-mode deploy module, batch dimension dynamic; the exporter's chatter is dropped."""
    try:
        import onnx  # noqa: F401  optional dependency: onnx
        import onnxscript  # noqa: F401  optional dependency: onnxscript
    except ImportError:
        raise ConfigError(f"--format onnx needs onnx and onnxscript: {INSTALL}") from None
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False)


def save_onnx(program: Any, path: Path) -> None:
    program.save(str(path))


def load_onnx(path: str | Path) -> Optional[Callable[[Tensor], Any]]:
    """A function images -> outputs (as torch tensors: one, or a tuple) running the file in onnxruntime; None
    where onnxruntime is not installed, after `onnx.checker` has passed the file."""
    import onnx  # optional dependency: onnx

    onnx.checker.check_model(onnx.load(str(path)))
    try:
        import onnxruntime as ort  # optional dependency: onnxruntime
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the exporter leaves unused initialisers that ort warns about
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Any:
        outs = [torch.from_numpy(o) for o in session.run(None, {name: x.detach().cpu().numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run
