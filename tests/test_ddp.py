"""2-process DDP (gloo, CPU) against a single process stepping on the same global batch, and stopping under DDP.

BatchNorm normalises per process under DDP (SyncBatchNorm needs a GPU), so the single-process reference
forwards each rank's half separately and averages the gradients: exactly the arithmetic DDP performs.
"""
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine.checkpoint import load_checkpoint
from engine.models import create_model
from engine.objectives import build_objective
from engine.optim import build_optimizer, lr_at, set_lr
from engine.setup_run import data_from_config, seed_everything
from tests.helpers import tiny_args, tiny_config

OVERRIDES = ("schedule.epochs=1", "data.limit_train=256", "data.batch_size=32", "data.val_split=0",
             "optim.lr=0.05", "logging.log_every=2")  # 4 steps per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _worker(rank: int, tmp: str, port: int) -> None:
    _env(rank, port)
    from engine.train import train
    train(tiny_config(Path(tmp), *OVERRIDES), device="cpu")


def _cli_worker(rank: int, tmp: str, port: int, argv: list, signalled_rank: int, at_call: int = 0,
                sig: int = signal.SIGTERM) -> None:
    """`selfdistill train` on one rank; `sig` reaches `signalled_rank` alone, during the process's step number
    `at_call` (0: its first)."""
    _env(rank, port)
    import engine.step as engine_step
    from engine.cli import main

    if rank == signalled_rank:
        real, calls = engine_step.lr_at, []

        def lr_at(step, *args):
            if len(calls) == at_call:
                os.kill(os.getpid(), sig)
            calls.append(step)
            return real(step, *args)

        engine_step.lr_at = lr_at
    with open(Path(tmp) / f"rank{rank}.out", "w") as f, contextlib.redirect_stdout(f), \
            open(Path(tmp) / f"rank{rank}.err", "w") as err, contextlib.redirect_stderr(err):
        rc = main(argv)
    (Path(tmp) / f"rank{rank}.rc").write_text(str(rc))


def _cli(tmp: Path, argv: list, signalled_rank: int = -1, limit_s: float = 450,
         at_call: int = 0) -> tuple[list[int], list[str]]:
    ctx = mp.spawn(_cli_worker, args=(str(tmp), _free_port(), argv, signalled_rank, at_call), nprocs=2, join=False)
    deadline = time.time() + limit_s
    while not ctx.join(timeout=1):
        if time.time() > deadline:  # a rank that stopped alone leaves the other blocked in a collective
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {limit_s} s")
    return ([int((tmp / f"rank{r}.rc").read_text()) for r in (0, 1)],
            [(tmp / f"rank{r}.out").read_text() for r in (0, 1)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    cfg = tiny_config(tmp_path_factory.mktemp("ref"), *OVERRIDES)
    seed_everything(cfg.seed)
    dev = torch.device("cpu")
    halves = [data_from_config(cfg, dev, rank, 2).train for rank in (0, 1)]
    model = create_model(cfg.model, cfg.exits)
    objective = build_objective(cfg, model.num_exits, dev)
    opt = build_optimizer(model, cfg, dev)
    steps = len(halves[0])
    for step, batches in enumerate(zip(*halves)):
        set_lr(opt, lr_at(step, steps, cfg.optim.lr, cfg.schedule))
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            loss, _ = objective(model, b)
            (loss.total / 2).backward()
            total += loss.total.item() / 2
        STEP_LOSSES.append(total)  # the mean over the two ranks' halves: what DDP's logged loss averages
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


STEP_LOSSES: list[float] = []  # filled by `reference`, one per step


def _assert_matches(ddp: dict, ref: dict) -> None:
    assert ref.keys() <= ddp.keys()
    for name, p in ref.items():
        torch.testing.assert_close(ddp[name], p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.timeout(600)
def test_ddp_matches_single_process(tmp_path, reference):
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    _assert_matches(load_checkpoint(tmp_path / "run" / "last.pt")["model"], reference)
    # every logged loss is the mean over ranks and over the window's steps (log_every=2), not a sum over ranks
    from tests.helpers import records
    logged = [(r["step"], r["loss"]) for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert [s for s, _ in logged] == [2, 4]
    for step, loss in logged:
        assert loss == pytest.approx(sum(STEP_LOSSES[step - 2:step]) / 2, rel=1e-4), step
    cfg = tiny_config(tmp_path / "init", *OVERRIDES)
    seed_everything(cfg.seed)
    init = dict(create_model(cfg.model, cfg.exits).named_parameters())
    assert max((init[n] - p).abs().max().item() for n, p in reference.items()) > 1e-3  # training moved the weights


@pytest.mark.timeout(600)
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, reference):
    argv = ["train", *tiny_args(tmp_path, *OVERRIDES), "--device", "cpu"]
    # SIGTERM reaches rank 1 alone during step 1; the request travels with the all-reduce at step 2.
    codes, outs = _cli(tmp_path, argv, signalled_rank=1)
    assert codes == [3, 3], outs  # both stopped, both resumable
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 2
    assert [o.splitlines() for o in outs] == [[o.strip()] for o in outs]  # one line from each rank, no more
    assert outs[0].startswith("rank 0: stopped at epoch 0 step 2") and outs[1].startswith("rank 1: stopped at")
    # Resumed, SIGTERM now reaches rank 0 alone during step 3: both stop at step 4, and rank 0 saves.
    codes, outs = _cli(tmp_path, [*argv, "--resume", "auto"], signalled_rank=0)
    assert codes == [3, 3], outs
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["state"]["step"] == 4
    assert all(o.count("--resume auto") == 1 and o.startswith(f"rank {r}: ") for r, o in enumerate(outs))
    _assert_matches(ck["model"], reference)  # two interruptions, the same weights as one uninterrupted pass


def test_a_hung_rank_fails_the_others_after_distributed_timeout_s(tmp_path):
    """Rank 1 freezes (SIGSTOP) in its second step: rank 0 gives up at its next collective after
    distributed.timeout_s=5, with one line, rather than after PyTorch's default 30 minutes."""
    argv = ["train", *tiny_args(tmp_path, *OVERRIDES, "distributed.timeout_s=5"), "--device", "cpu"]
    ctx = mp.spawn(_cli_worker, args=(str(tmp_path), _free_port(), argv, 1, 1, signal.SIGSTOP), nprocs=2, join=False)
    rc0, deadline = tmp_path / "rank0.rc", time.time() + 120
    try:
        while not rc0.is_file() and time.time() < deadline and ctx.processes[0].is_alive():
            time.sleep(0.5)
        ctx.processes[0].join(timeout=10)
    finally:
        for p in ctx.processes:
            p.kill()
    assert rc0.is_file(), "rank 0 still waits for the frozen rank"
    err = (tmp_path / "rank0.err").read_text()
    assert int(rc0.read_text()) == 2 and "distributed.timeout_s=5" in err and "Traceback" not in err, err


def test_ddp_wraps_the_model_before_compile(tmp_path, monkeypatch):
    """torch.compile(DDP(model)), never DDP(torch.compile(model)); `model` stays the bare module."""
    from torch import nn

    import engine.precision
    from engine.setup_run import build_components

    class Tag(nn.Module):
        def __init__(self, kind: str, inner: nn.Module):
            super().__init__()
            self.kind, self.inner = kind, inner

    monkeypatch.setattr(engine.precision, "wrap_ddp", lambda m, info, find_unused: Tag("ddp", m))
    monkeypatch.setattr(torch, "compile", lambda m, mode=None, backend=None: Tag("compile", m))
    c = build_components(tiny_config(tmp_path, *OVERRIDES, "precision.compile=true"), "cpu")
    assert c.train_model.kind == "compile" and c.train_model.inner.kind == "ddp"
    assert c.train_model.inner.inner is c.model and not isinstance(c.model, Tag)


@pytest.mark.timeout(600)
def test_resume_after_a_stop_on_an_epochs_last_step_reproduces_the_logs(tmp_path):
    """The stop request travels in the all-reduce at the epoch's end, so last.pt is written on the epoch's last
    step, before its evaluation; the resumed run evaluates on every rank with last.pt's BatchNorm statistics, so
    its records and best.pt's history equal an uninterrupted run's."""
    from tests.helpers import records

    over = ("schedule.epochs=2", "data.limit_train=256", "data.batch_size=32", "data.val_split=64",
            "optim.lr=0.05", "logging.log_every=100", "model.num_classes=10")  # 4 steps per rank and epoch
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    assert _cli(whole, ["train", *tiny_args(whole, *over), "--device", "cpu"])[0] == [0, 0]
    argv = ["train", *tiny_args(cut, *over), "--device", "cpu"]
    codes, _ = _cli(cut, argv, signalled_rank=1, at_call=2)  # during step 3: stops at step 4, the epoch's last
    assert codes == [3, 3] and load_checkpoint(cut / "run" / "last.pt")["state"]["step"] == 4
    assert _cli(cut, [*argv, "--resume", "auto"])[0] == [0, 0]
    assert records(cut / "run") == records(whole / "run")
    hist = [load_checkpoint(d / "run" / "best.pt")["state"]["history"] for d in (whole, cut)]
    assert hist[0] == hist[1]
