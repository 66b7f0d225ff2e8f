"""Real timm backbones (installed by `make install-dev`, see the README's timm section) through the engine: BYOT
training steps, truncated exits equal to the training forward, export of a checkpoint, and `profile exits`.
The adapter's logic alone (levels, head_hidden_size, weights file) is tested against a stand-in in
tests/test_timm_adapter.py."""
from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.cli import main as cli_main
from engine.export import main as export_main
from engine.models import create_model
from engine.models.early_exit import EarlyExitModel, TruncatedModel
from engine.models.timm_backbone import import_timm
from engine.objectives import build_objective
from engine.train import train
from engine.types import Batch
from tests.helpers import tiny_config

# (timm name, extra overrides): a hierarchical CNN, one with a hidden head layer after pooling (head_hidden_size
# 1024 against num_features 576), a ConvNeXt, and a plain ViT built for the 32-pixel input.
MODELS = [("resnet18", ()), ("mobilenetv3_small_100", ()), ("convnext_atto", ()),
          ("vit_tiny_patch16_224", ("model.img_size=32",))]


def test_timm_imports_beside_this_torch():
    """No skip anywhere below: timm must import here, whatever torchvision build pip chose."""
    assert hasattr(import_timm(), "create_model")


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def trained(request, tmp_path_factory):
    """A BYOT run of 2 steps on 32-pixel digits: its checkpoint is what export and the exits tests read."""
    name, extra = request.param
    tmp = tmp_path_factory.mktemp(name)
    cfg = tiny_config(tmp, f"model.name=timm:{name}", "data.image_size=32", "data.limit_train=64",
                      "data.batch_size=32", "schedule.epochs=1", "objective.name=byot", "objective.backend=torch",
                      "exits.stages=[0,1,2]", "precision.channels_last=false", *extra)
    summary = train(cfg)
    assert summary["steps"] == 2 and (tmp / "run" / "best.pt").is_file(), summary.keys()
    return name, cfg, tmp / "run"


def test_byot_steps_fit_a_batch_through_every_exit(trained):
    """Forward, backward and 4 SGD steps on one batch: every exit's loss term falls, every head and the backbone
    get a non-zero gradient, and the hint compares each exit with the deepest feature (head_hidden_size wide)."""
    name, cfg, _ = trained
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.exits).train()
    objective = build_objective(cfg, model.num_exits, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        loss, out = objective(model, batch)
        loss.total.backward()
        if step == 0:
            assert len({f.shape[1] for f in out.features}) == 1 and "hint_0" in loss.terms, name
            for k, head in enumerate(model.heads):
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), (name, k)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters()), name
        losses.append({k: float(v.detach()) for k, v in loss.terms.items() if k.startswith("ce_")})
        opt.step()
    assert all(losses[-1][k] < losses[0][k] for k in losses[0]), (name, losses)


def test_truncated_exits_equal_the_training_forward(trained):
    name, cfg, run = trained
    model, _ = model_from_checkpoint(load_checkpoint(run / "best.pt", "cpu"), [], "model", str(run / "best.pt"))
    model.eval()
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
        for k in range(model.num_exits):
            torch.testing.assert_close(TruncatedModel(model, k).eval()(x), full[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="export --exit K"):
        EarlyExitModel(model, 0.5)


@pytest.mark.parametrize("exit_k", ["0", "-1"])
def test_export_of_a_timm_checkpoint_round_trips(trained, exit_k, capsys):
    name, _, run = trained
    out = run.parent / f"exit{exit_k}.pt2"
    assert export_main(["--checkpoint", str(run / "best.pt"), "--exit", exit_k, "--out", str(out)]) == 0
    side = json.loads(out.with_name(out.name + ".json").read_text())
    assert side["exit"] == int(exit_k) % 4 and side["input_shape"] == ["batch", 1, 32, 32], side
    assert side["verification"]["ok"], side
    norm = torch.load(run / "best.pt", map_location="cpu", weights_only=False)["normalisation"]
    assert side["normalisation"]["mean"] == norm["mean"] and side["normalisation"]["std"] == norm["std"]
    assert len(norm["mean"]) == 1 and 0 < norm["mean"][0] < 1 and norm["std"][0] > 0, norm  # digits' own, 1 channel


def test_early_exit_export_of_a_timm_checkpoint_is_one_line(trained, capsys):
    name, _, run = trained
    code = cli_main(["export", "--checkpoint", str(run / "best.pt"), "--early-exit", "0.9", "--out",
                     str(run.parent / "ee.pt2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "export --exit K" in err[0], err
