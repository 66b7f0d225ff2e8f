"""The methods study: every objective on Fashion-MNIST, same network and schedule, several seeds, on CPU.

    python -m bench.methods_study [--seeds 0 1 2] [--jobs 2] [--threads 1] [--report-only]

Each (method, seed) is an ordinary training run in `runs/methods_study/<method>/seed<s>`, trained in a child
process. When it has finished, its best-validation checkpoint is evaluated on the test set (every exit and both
ensembles, ECE with 15 and 20 bins, Recall@1) into `study.json` beside it. Re-running skips runs that have a
`study.json`, resumes interrupted ones from `last.pt`, and rewrites `bench/results/methods_fashion_mnist.*`.

Multi-generation self-distillation follows Zhang & Sabuncu: generation 0 is the `ce` run of the same seed,
generation g >= 1 a fresh model taught by generation g-1's best-validation checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.methods_report_md import write_study_report
from bench.study_runner import generation as study_generation
from bench.study_runner import launch, run_queue
from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.config import Config, load_config
from engine.evaluate import collect_outputs
from engine.metrics import exit_metrics
from engine.setup_run import data_from_config
from engine.train import train

RUNS = Path("runs/methods_study")
BINS = (15, 20)
# One schedule for every method: the demo's network and optimizer, pad-4 crop + flip (CS-KD-E needs two views that
# differ), cosine LR with a short warm-up. The batch divides the training subset, so plain and class-pair runs take
# the same number of steps.
SCHEDULE = {"epochs": 8, "limit_train": 25600, "batch_size": 128}
BASE = ["model.name=resnet18", "model.stem=cifar", "model.num_classes=10", "model.in_chans=1", "model.width=0.25",
        "model.depths=[1,1,1,1]", "exits.stages=[]", "objective.backend=auto", "data.dataset=fashion_mnist",
        "data.image_size=28", "data.augment=crop_flip", "data.eval_batch_size=1000", "data.val_split=5000",
        "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
        "optim.no_decay_bn_bias=true", "schedule.name=cosine", "schedule.warmup_epochs=0.2",
        "precision.channels_last=true", "logging.progress=false", "logging.log_every=50", "logging.ece_bins=15"]
EXITS, PAIRS = ["exits.stages=[0,1,2]"], ["data.sampler=class_pair"]
LS = ["objective.name=label_smoothing", "objective.label_smoothing.epsilon=0.1",
      "objective.label_smoothing.convention="]
# name -> (what it is, overrides, the run whose best checkpoint is the teacher)
METHODS: dict[str, tuple[str, list[str], str | None]] = {
    "ce": ("cross-entropy (plain backbone; generation 0)", ["objective.name=ce"], None),
    "ls_all": ("label smoothing, eps/K on every class (eps 0.1)", [*LS[:2], LS[2] + "all_classes"], None),
    "ls_wrong": ("label smoothing, eps/(K-1) on the wrong classes (eps 0.1)",
                 [*LS[:2], LS[2] + "wrong_classes"], None),
    "max_entropy": ("CE - 0.1 H(p)", ["objective.name=max_entropy", "objective.max_entropy.beta=0.1"], None),
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
    "mixup": ("mixup (alpha 1)", ["objective.name=mixup", "objective.mixup.alpha=1.0"], None),
    "mixup_cskd": ("mixup + CS-KD (same l and permutation for both halves)",
                   [*PAIRS, "objective.name=mixup_cskd", "objective.mixup.alpha=1.0"], None),
}


def run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / method / f"seed{seed}"


def run_config(method: str, seed: int, runs: Path, schedule: dict) -> Config:
    _, over, teacher = METHODS[method]
    extra = [f"objective.teacher.checkpoint={run_dir(runs, teacher, seed) / 'best.pt'}"] if teacher else []
    sched = [f"schedule.epochs={schedule['epochs']}", f"data.limit_train={schedule['limit_train']}",
             f"data.batch_size={schedule['batch_size']}"]
    return load_config(None, [*BASE, *sched, *over, *extra, f"seed={seed}",
                              f"checkpoint.dir={run_dir(runs, method, seed)}", "checkpoint.resume=auto"])


def evaluate_best(cfg: Config) -> dict:
    """Test figures of the run's best-validation checkpoint: every exit and both ensembles, ECE at each of BINS,
    and `overconf` = mean confidence minus accuracy (points), the sign of the miscalibration ECE measures."""
    cpu = torch.device("cpu")
    model, _ = model_from_checkpoint(load_checkpoint(Path(cfg.checkpoint.dir) / "best.pt", cpu))
    logits, feats, labels = collect_outputs(model.to(memory_format=torch.channels_last),
                                            data_from_config(cfg, cpu).test, cpu)
    out: dict[str, dict] = {}
    for bins in BINS:
        res = exit_metrics(logits, labels, bins, feats if bins == BINS[0] else None)
        for name, m in ((k, v) for k, v in res.items() if not k.startswith("_")):
            row = out.setdefault(name, {k: v for k, v in m.items() if k != "ece"})
            row[f"ece{bins}"] = m["ece"]
            r = res["_reliability"][name]
            gap = sum(c * (f - a) for c, f, a in zip(r["count"], r["confidence"], r["accuracy"]))
            row["overconf"] = 100 * gap / sum(r["count"])
    return out


def run_one(method: str, seed: int, runs: Path, schedule: dict) -> None:
    """Train (or resume, or reuse a finished) run in this process and write its study.json."""
    cfg = run_config(method, seed, runs, schedule)
    d = Path(cfg.checkpoint.dir)
    t0, c0 = time.perf_counter(), time.process_time()
    done = d / "summary.json"  # written atomically at the end of training
    summary = json.loads(done.read_text()) if done.is_file() else {"interrupted": True}
    if summary.get("interrupted"):
        summary = train(cfg, device="cpu")
    if summary.get("interrupted"):
        raise SystemExit(f"{d}: training was interrupted")
    result = {"method": method, "seed": seed, "schedule": schedule, "threads": torch.get_num_threads(),
              **{k: summary.get(k) for k in ("best_epoch", "best_val_top1", "steps")},
              "test_best": evaluate_best(cfg),
              "test_last_top1": {k: v["top1"] for k, v in summary.get("test_last", {}).items()
                                 if not k.startswith("_")},
              # the attempt that finished the run: a resumed run does not count its earlier attempts
              "cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1)}
    (d / "study.json").write_text(json.dumps(result, indent=2))


def _launch(job: tuple[str, int], args: argparse.Namespace) -> bool:
    method, seed = job
    cmd = [sys.executable, "-m", "bench.methods_study", "--one", method, str(seed), "--runs", str(args.runs),
           "--threads", str(args.threads), *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SCHEDULE)]
    return launch(cmd, run_dir(args.runs, method, seed) / "study.log", args.threads, f"{method} seed {seed}") == 0


def generation(method: str) -> int:
    """How many teachers stand before the method (ce -> sd_gen1 -> sd_gen2)."""
    return study_generation(method, _teacher)


def _teacher(method: str) -> str | None:
    return METHODS[method][2]


def run_all(args: argparse.Namespace) -> None:
    """Every pending run, `args.jobs` at a time, a teacher before its student (bench.study_runner.run_queue)."""
    done = {(m, s) for m in METHODS for s in args.seeds if (run_dir(args.runs, m, s) / "study.json").is_file()}
    todo = [(m, s) for s in args.seeds for m in args.methods if (m, s) not in done]
    run_queue(todo, done, args.seeds, _teacher, lambda job: _launch(job, args), args.jobs, args.threads, args.runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    for k, v in SCHEDULE.items():  # --epochs, --limit-train, --batch-size
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    schedule = {k: getattr(args, k) for k in SCHEDULE}
    if args.one:
        torch.set_num_threads(args.threads)
        run_one(args.one[0], int(args.one[1]), args.runs, schedule)
        return 0
    if not args.report_only:
        run_all(args)
    print(write_study_report(args.runs, args.out, METHODS, args.methods, args.seeds, schedule)["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
