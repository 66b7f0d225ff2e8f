"""The methods study: every objective on Fashion-MNIST, same network and schedule, several seeds, on CPU.

    python -m bench.methods_study [--seeds 0 1 2] [--jobs 2] [--threads 1]

Each (method, seed) is one ordinary training run in `runs/methods_study/<method>/seed<s>` (config, metrics,
checkpoints), trained in a child process with `--threads` torch threads, `--jobs` children at a time. When a run
has finished, its best-validation checkpoint is evaluated on the test set (every exit and both ensembles, ECE with
15 and 20 bins, Recall@1) into `study.json` next to it. Re-running the command skips runs that have a `study.json`,
resumes interrupted ones from their `last.pt`, and rewrites the report (`bench/methods_report.py`):
`bench/results/methods_fashion_mnist.{json,md,png}`.

The network is the demo's: CIFAR-stem ResNet-18, width 0.25, one block per stage, 28-px grey input; single-exit
methods train the plain backbone (`exits.stages=[]`), DSN and BYOT the same backbone with exits after stages 1-3.
Multi-generation self-distillation follows Zhang & Sabuncu: generation 0 is plain CE (the `ce` run of the same
seed), generation g >= 1 a fresh model taught by generation g-1's best-validation checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

RUNS = Path("runs/methods_study")
BINS = (15, 20)

# One schedule for every method: the demo's network and optimizer, pad-4 crop + flip (CS-KD-E needs two views that
# differ), cosine LR with a short warm-up. The batch size divides the training subset, so a plain run and a
# class-pair run take the same number of steps.
SCHEDULE = {"epochs": 8, "limit_train": 25600, "batch_size": 128}


def base_overrides(epochs: int, limit_train: int, batch_size: int) -> list[str]:
    return ["model.name=resnet18", "model.stem=cifar", "model.num_classes=10", "model.in_chans=1", "model.width=0.25",
            "model.depths=[1,1,1,1]", "exits.stages=[]", "objective.backend=auto",
            "data.dataset=fashion_mnist", "data.image_size=28", "data.augment=crop_flip",
            f"data.batch_size={batch_size}", "data.eval_batch_size=1000", "data.val_split=5000",
            f"data.limit_train={limit_train}", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9",
            "optim.nesterov=true", "optim.weight_decay=5e-4", "optim.no_decay_bn_bias=true",
            "schedule.name=cosine", f"schedule.epochs={epochs}", "schedule.warmup_epochs=0.2",
            "precision.channels_last=true", "logging.progress=false", "logging.log_every=50", "logging.ece_bins=15"]


EXITS = ["exits.stages=[1,2,3]"]
PAIRS = ["data.sampler=class_pair"]
# name -> (what it is, overrides, the run whose best checkpoint is the teacher)
METHODS: dict[str, tuple[str, list[str], str | None]] = {
    "ce": ("cross-entropy (plain backbone; generation 0)", ["objective.name=ce"], None),
    "ls_all": ("label smoothing, eps/K on every class (eps 0.1)",
               ["objective.name=ls_all_classes", "objective.label_smoothing.epsilon=0.1"], None),
    "ls_wrong": ("label smoothing, eps/(K-1) on the wrong classes (eps 0.1)",
                 ["objective.name=ls_wrong_classes", "objective.label_smoothing.epsilon=0.1"], None),
    "max_entropy": ("CE - 0.1 H(p)", ["objective.name=max_entropy", "objective.max_entropy_beta=0.1"], None),
    "dsn": ("deep supervision: CE at every exit", [*EXITS, "objective.name=dsn"], None),
    "byot_iccv": ("BYOT, ICCV settings (bottleneck heads, KL T=3 T^2, alpha 0.1, SSE hint 1e-6)",
                  [*EXITS, "objective.name=byot"], None),
    "byot_journal": ("BYOT, journal code settings (attention+SepConv heads, 0.7 CE + 0.3 soft-CE, L2 hint 0.03)",
                     [*EXITS, "exits.head=journal", "exits.hint_adapter=true", "objective.name=byot",
                      "objective.byot.kd=soft_ce", "objective.byot.t_squared=false", "objective.byot.hint=l2",
                      "objective.byot.hint_exits=[0,1]", "objective.byot.ce_weights=[0.7,0.7,0.7]",
                      "objective.byot.kd_weights=[0.3,0.3,0.3]", "objective.byot.hint_weights=[0.03,0.03,0.03]",
                      "objective.byot.deepest_ce_weight=1.0"], None),
    "cskd": ("CS-KD (lambda 1, T 4)", [*PAIRS, "objective.name=cskd"], None),
    "cskd_e": ("CS-KD-E (CS-KD + sample-wise KL between two crops)",
               [*PAIRS, "objective.name=cskd", "objective.cskd.sample_wise=true", "data.extra_view=true"], None),
    "beta": ("Beta smoothing (alpha 0.6, beta 3, EMA teacher 0.999)", ["objective.name=beta"], None),
    "sd_gen1": ("self-distillation generation 1 (teacher: the ce run; alpha 0.4, T 4)",
                ["objective.name=sd_generation"], "ce"),
    "sd_gen2": ("self-distillation generation 2 (teacher: sd_gen1)", ["objective.name=sd_generation"], "sd_gen1"),
    "mixup": ("mixup (alpha 1)", ["objective.name=mixup", "objective.mixup_alpha=1.0"], None),
    "mixup_cskd": ("mixup + CS-KD (same l and permutation for both halves)",
                   [*PAIRS, "objective.name=mixup_cskd", "objective.mixup_alpha=1.0"], None),
}


def run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / method / f"seed{seed}"


def run_config(method: str, seed: int, runs: Path, schedule: dict):
    from engine.config import load_config

    _, over, teacher = METHODS[method]
    extra = [f"objective.teacher.checkpoint={run_dir(runs, teacher, seed) / 'best.pt'}"] if teacher else []
    return load_config(None, [*base_overrides(**schedule), *over, *extra, f"seed={seed}",
                              f"checkpoint.dir={run_dir(runs, method, seed)}", "checkpoint.resume=auto"])


def _finished_summary(d: Path) -> dict | None:
    try:
        s = json.loads((d / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return None if s.get("interrupted") else s


def evaluate_best(cfg) -> dict:
    """Test figures of the run's best-validation checkpoint: every exit and both ensembles, ECE at each of BINS,
    and `overconf` = mean confidence minus accuracy (points): the sign of the miscalibration ECE measures."""
    import torch

    from engine.checkpoint import load_checkpoint
    from engine.evaluate import collect_outputs
    from engine.evaluate_cli import model_from_checkpoint
    from engine.metrics import exit_metrics
    from pipelines.factory import build_data

    ck = load_checkpoint(Path(cfg.checkpoint.dir) / "best.pt", "cpu")
    model, _ = model_from_checkpoint(ck)
    model = model.to(memory_format=torch.channels_last)
    test = build_data(cfg, torch.device("cpu")).test
    logits, feats, labels = collect_outputs(model, test, torch.device("cpu"))
    out: dict[str, dict] = {}
    for bins in BINS:
        res = exit_metrics(logits, labels, bins, feats if bins == BINS[0] else None)
        for name, m in res.items():
            if name.startswith("_"):
                continue
            row = out.setdefault(name, {k: v for k, v in m.items() if k != "ece"})
            row[f"ece{bins}"] = m["ece"]
            r = res["_reliability"][name]
            n = sum(r["count"])
            row["overconf"] = 100 * sum(c * (f - a) for c, f, a in zip(r["count"], r["confidence"], r["accuracy"])) / n
    return {"test_best": out}


def reevaluate(method: str, seed: int, runs: Path, schedule: dict) -> None:
    """Recompute a finished run's test figures (after a metric was added), keeping its training record."""
    d = run_dir(runs, method, seed)
    result = json.loads((d / "study.json").read_text())
    result.update(evaluate_best(run_config(method, seed, runs, schedule)))
    (d / "study.json").write_text(json.dumps(result, indent=2))


def run_one(method: str, seed: int, runs: Path, schedule: dict) -> None:
    """Train (or resume) one run in this process and write its study.json."""
    from engine.train import train

    cfg = run_config(method, seed, runs, schedule)
    d = Path(cfg.checkpoint.dir)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = _finished_summary(d) or train(cfg, device="cpu")
    if summary.get("interrupted"):
        raise SystemExit(f"{d}: training was interrupted")
    result = {"method": method, "seed": seed, "schedule": schedule, "threads": _threads(),
              "best_epoch": summary.get("best_epoch"), "best_val_top1": summary.get("best_val_top1"),
              "steps": summary.get("steps"), **evaluate_best(cfg),
              "test_last_top1": {k: v["top1"] for k, v in summary.get("test_last", {}).items()
                                 if not k.startswith("_")}}
    # the attempt that finished the run (a resumed run does not count its earlier attempts)
    result["cpu_s"] = round(time.process_time() - c0, 1)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (d / "study.json").write_text(json.dumps(result, indent=2))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _launch(method: str, seed: int, args) -> tuple[str, int, int]:
    d = run_dir(args.runs, method, seed)
    d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "bench.methods_study", "--one", method, str(seed), "--runs", str(args.runs),
           "--threads", str(args.threads), "--epochs", str(args.epochs), "--limit-train", str(args.limit_train),
           "--batch-size", str(args.batch_size)]
    t0 = time.strftime("%H:%M:%S")
    with open(d / "study.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[{t0} -> {time.strftime('%H:%M:%S')}] {method} seed {seed}: exit {rc}", flush=True)
    return method, seed, rc


def pending(args) -> list[tuple[str, int]]:
    todo = [(m, s) for m in args.methods for s in args.seeds
            if not (run_dir(args.runs, m, s) / "study.json").is_file()]
    depth = {m: 0 for m in METHODS}
    for m, (_, _, teacher) in METHODS.items():  # teachers first (the chain is short: ce -> sd_gen1 -> sd_gen2)
        t = teacher
        while t:
            depth[m] += 1
            t = METHODS[t][2]
    return sorted(todo, key=lambda ms: (ms[1], depth[ms[0]]))


def run_all(args) -> None:
    """Train every pending run, `args.jobs` at a time, a teacher before its student; seed by seed, so that an
    interrupted study has whole seeds rather than whole methods."""
    todo = pending(args)
    print(f"{len(todo)} run(s) to do, {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    done = {(m, s) for m in args.methods for s in args.seeds if (run_dir(args.runs, m, s) / "study.json").is_file()}
    failed: set[tuple[str, int]] = set()
    running: dict = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        while todo or running:
            for m, s in list(todo):
                teacher = METHODS[m][2]
                if teacher and (teacher, s) in failed:
                    todo.remove((m, s))
                    failed.add((m, s))
                elif len(running) < args.jobs and (not teacher or (teacher, s) in done):
                    todo.remove((m, s))
                    running[pool.submit(_launch, m, s, args)] = (m, s)
            if not running:
                break  # what is left waits for a teacher outside --methods
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                m, s, rc = fut.result()
                (done if rc == 0 else failed).add(running.pop(fut))
    if failed or todo:
        print(f"not finished: {sorted(failed | set(todo))}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--epochs", type=int, default=SCHEDULE["epochs"])
    p.add_argument("--limit-train", type=int, default=SCHEDULE["limit_train"])
    p.add_argument("--batch-size", type=int, default=SCHEDULE["batch_size"])
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--reevaluate", action="store_true",
                   help="recompute the test figures of finished runs from their best.pt, then rewrite the report")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    schedule = {"epochs": args.epochs, "limit_train": args.limit_train, "batch_size": args.batch_size}
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        run_one(args.one[0], int(args.one[1]), args.runs, schedule)
        return 0
    if args.reevaluate:
        for m in args.methods:
            for s in args.seeds:
                if (run_dir(args.runs, m, s) / "study.json").is_file():
                    reevaluate(m, s, args.runs, schedule)
    elif not args.report_only:
        run_all(args)
    from bench.methods_report import write_report

    paths = write_report(args.runs, args.out, METHODS, args.methods, args.seeds, schedule)
    print("\n".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
