"""The methods study v2: the primary family in the memorisation regime, head-matched comparisons declared up front,
paired t-intervals with Holm's correction over seeds.

    python -m bench.methods_study_v2 [--seeds 0 1 2 3 4] [--methods ...] [--stress] [--jobs 2] [--threads 1]
                                     [--report-only | --collect]

The regime is the pilot's (`bench/methods_pilot.py`, committed in `bench/results/methods_pilot.md`): 5,000
class-balanced training images, no augmentation, the demo's width-0.25 ResNet-18, 60 epochs of cosine LR; plain CE
fits the training set and ends over-confident there. Seed s fixes the data (validation carve and training subset,
`data.split_seed`) and the model's initialisation and batch order (`seed`), the same for every method, except the
second generation, whose student starts from a fresh initialisation and order (`seed` = s + 1000) on the same data,
as the official code's new random model does.

`--stress` trains the family without the journal-head pair, 2 seeds, on 25,600 training images with 30 % symmetric
label noise (training labels only; validation and test stay clean), in its own run folder and report section: where
smoothing and self-distillation are known to help, it shows whether the mechanism works.

Each (method, seed) is an ordinary training run under `runs/methods_v2/` trained in a child process; when it ends,
its best-validation checkpoint is evaluated on the test set into `study.json` (every exit and both ensembles).
Re-running skips finished runs (those with a study.json under `runs/`, and those whose results the committed json
already holds, since `runs/` is not committed), resumes interrupted ones, and rewrites
`bench/results/methods_fashion_mnist_v2.*`;
`--collect` refreshes the json from the finished runs without training, `--report-only` the md and png from the json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.methods_pilot import DATA, NET, OPTIM
from bench.methods_report_v2 import STRESS, committed, section
from bench.methods_report_v2_md import STEM, write_report
from bench.methods_study import evaluate_best
from bench.study_runner import launch, run_queue
from engine.config import Config, load_config
from engine.train import train

RUNS = Path("runs/methods_v2")
EPOCHS, TRAIN_IMAGES, BATCH = 60, 5000, 128
# Beta smoothing's EMA teacher: 0.999 in the official code is a horizon of 1,000 steps, 1.28 % of its CIFAR run
# (200 epochs x 391 steps). The same share of this run's steps sets the decay here.
PAPER_EMA_SHARE = 1000 / (200 * 391)
SCHEDULE = ["schedule.name=cosine", "schedule.warmup_epochs=0.2"]
COMMON = [*NET, *DATA, *OPTIM, "model.width=0.25", "model.depths=[1,1,1,1]", "precision.channels_last=true",
          "logging.progress=false", "logging.log_every=50", "logging.ece_bins=15", "objective.backend=auto"]
EXITS = ["exits.stages=[0,1,2]"]
JOURNAL_HEADS = [*EXITS, "exits.head=journal"]
JOURNAL_LOSS = ["exits.hint_adapter=true", "objective.name=byot", "objective.byot.kd=soft_ce",
                "objective.byot.t_squared=false", "objective.byot.hint=l2", "objective.byot.hint_exits=[0,1]",
                "objective.byot.ce_weights=[0.7,0.7,0.7]", "objective.byot.kd_weights=[0.3,0.3,0.3]",
                "objective.byot.hint_weights=[0.03,0.03,0.03]", "objective.byot.deepest_ce_weight=1.0"]
# name -> (what it is, overrides, teacher run)
METHODS: dict[str, tuple[str, list[str], str | None]] = {
    "ce": ("cross-entropy, plain backbone (generation 0)", ["exits.stages=[]", "objective.name=ce"], None),
    "ls": ("label smoothing eps 0.1 (eps/K on every class)",
           ["exits.stages=[]", "objective.name=label_smoothing", "objective.label_smoothing.epsilon=0.1",
            "objective.label_smoothing.convention=all_classes"], None),
    "dsn": ("deep supervision, bottleneck heads (CE at every exit)", [*EXITS, "objective.name=dsn"], None),
    "dsn_journal": ("deep supervision, journal heads (attention + SepConv)", [*JOURNAL_HEADS, "objective.name=dsn"],
                    None),
    "byot_iccv": ("BYOT, ICCV settings, bottleneck heads (KL T=3 T^2, alpha 0.1, SSE hint 1e-6)",
                  [*EXITS, "objective.name=byot"], None),
    "byot_journal": ("BYOT, journal code settings, journal heads (0.7 CE + 0.3 soft-CE, L2 hint 0.03)",
                     [*JOURNAL_HEADS, *JOURNAL_LOSS], None),
    "cskd": ("CS-KD (lambda 1, T 4, class-pair batches)",
             ["exits.stages=[]", "data.sampler=class_pair", "objective.name=cskd"], None),
    "beta": ("Beta smoothing (alpha 0.6, beta 3), EMA horizon rescaled to 1.28 % of the run",
             ["exits.stages=[]", "objective.name=beta"], None),
    "sd_gen1": ("second generation: a fresh model taught by the ce run (alpha 0.4, T 4)",
                ["exits.stages=[]", "objective.name=sd_generation"], "ce"),
}
FRESH_SEED_OFFSET = 1000


def steps_per_epoch(train_images: int) -> int:
    return train_images // BATCH  # the loaders drop the last partial batch


def beta_ema_decay(epochs: int, train_images: int) -> float:
    return round(1 - 1 / (PAPER_EMA_SHARE * epochs * steps_per_epoch(train_images)), 5)


def run_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / method / f"seed{seed}"


def run_config(method: str, seed: int, runs: Path, stress: bool = False) -> Config:
    _, over, teacher = METHODS[method]
    images, epochs = (STRESS["limit_train"], STRESS["epochs"]) if stress else (TRAIN_IMAGES, EPOCHS)
    extra = [f"objective.teacher.checkpoint={run_dir(runs, teacher, seed) / 'best.pt'}"] if teacher else []
    if method == "beta":
        extra.append(f"objective.beta.ema_decay={beta_ema_decay(epochs, images)}")
    if stress:
        extra.append(f"data.label_noise={STRESS['label_noise']}")
    model_seed = seed + FRESH_SEED_OFFSET if teacher else seed
    return load_config(None, [*COMMON, *SCHEDULE, f"schedule.epochs={epochs}", f"data.limit_train={images}",
                              *over, *extra, f"data.split_seed={seed}", f"seed={model_seed}",
                              f"checkpoint.dir={run_dir(runs, method, seed)}", "checkpoint.resume=auto"])


def run_one(method: str, seed: int, runs: Path, stress: bool) -> None:
    """Train (or resume, or reuse a finished) run in this process and write its study.json."""
    cfg = run_config(method, seed, runs, stress)
    d = Path(cfg.checkpoint.dir)
    t0, c0 = time.perf_counter(), time.process_time()
    done = d / "summary.json"
    summary = json.loads(done.read_text()) if done.is_file() else {"interrupted": True}
    if summary.get("interrupted"):
        summary = train(cfg, device="cpu")
    if summary.get("interrupted"):
        raise SystemExit(f"{d}: training was interrupted")
    result = {"method": method, "seed": seed, "model_seed": cfg.seed, "epochs": cfg.schedule.epochs,
              "train_images": cfg.data.limit_train, "label_noise": cfg.data.label_noise,
              "threads": torch.get_num_threads(),
              **{k: summary.get(k) for k in ("best_epoch", "best_val_top1", "steps")},
              "test_best": evaluate_best(cfg),
              "test_last_top1": {k: v["top1"] for k, v in summary.get("test_last", {}).items()
                                 if not k.startswith("_")},
              "cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1)}
    (d / "study.json").write_text(json.dumps(result, indent=2))


def _launch(job: tuple[str, int], args: argparse.Namespace) -> bool:
    method, seed = job
    cmd = [sys.executable, "-m", "bench.methods_study_v2", "--one", method, str(seed), "--runs", str(args.runs),
           "--threads", str(args.threads), *(["--stress"] if args.stress else [])]
    return launch(cmd, run_dir(args.runs, method, seed) / "study.log", args.threads, f"{method} seed {seed}") == 0


def run_all(args: argparse.Namespace, earlier: dict) -> None:
    """Every pending run, `args.jobs` at a time, lower seeds first, a teacher before its student
    (bench.study_runner.run_queue). A run is done when its study.json is in the runs folder or its result is in the
    committed json (`earlier`); a student whose teacher's checkpoint is gone (a new checkout) has its teacher
    trained again first, into the runs folder, without replacing the teacher's committed result."""
    done = {(m, s) for m in METHODS for s in args.seeds
            if (run_dir(args.runs, m, s) / "study.json").is_file() or str(s) in earlier.get(m, {})}
    todo = [(m, s) for s in args.seeds for m in args.methods if (m, s) not in done]
    for m, s in list(todo):
        teacher = METHODS[m][2]
        if teacher and not (run_dir(args.runs, teacher, s) / "best.pt").is_file() and (teacher, s) in done:
            done.discard((teacher, s))
            todo.insert(todo.index((m, s)), (teacher, s))
    run_queue(todo, done, args.seeds, lambda m: METHODS[m][2], lambda job: _launch(job, args), args.jobs,
              args.threads, args.runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", help="default 0-4 (stress: 0 1)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="default all (stress: its declared family)")
    p.add_argument("--stress", action="store_true", help="the label-noise stress test instead of the main study")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--runs", type=Path, default=None, help="default runs/methods_v2 (stress: runs/methods_v2_noise)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--report-only", action="store_true", help="rewrite the md and png from the committed json")
    p.add_argument("--collect", action="store_true", help="train nothing: refresh the json from the finished runs")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = args.runs or (RUNS.with_name(RUNS.name + "_noise") if args.stress else RUNS)
    args.seeds = args.seeds or (STRESS["seeds"] if args.stress else [0, 1, 2, 3, 4])
    args.methods = args.methods or (STRESS["methods"] if args.stress else list(METHODS))
    if args.one:
        torch.set_num_threads(args.threads)
        run_one(args.one[0], int(args.one[1]), args.runs, args.stress)
        return 0
    key = "stress" if args.stress else "main"
    json_path = args.out / f"{STEM}.json"
    earlier = committed(json_path, key)
    if not (args.report_only or args.collect):
        run_all(args, earlier)
    images, epochs = (STRESS["limit_train"], STRESS["epochs"]) if args.stress else (TRAIN_IMAGES, EPOCHS)
    earlier_commit = json.loads(json_path.read_text()).get(key, {}).get("runs_commit") if earlier else None
    family = STRESS["methods"] if args.stress else list(METHODS)
    sec = None if args.report_only else section(args.runs, {m: METHODS[m][0] for m in family}, images,
                                                 epochs, STRESS["label_noise"] if args.stress else 0.0, earlier,
                                                 earlier_commit)
    print(write_report(args.out, key, sec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
