"""The methods study's pilot: is plain CE in the memorisation regime, where the papers' effects can appear?

    python -m bench.methods_pilot [--pilots NAME ...] [--jobs 2] [--threads 1] [--report-only]

Each pilot is one CE run (seed 0) of a candidate regime, trained in a child process under `runs/methods_pilot/`.
The regime passes when (1) the last checkpoint fits the training subset (top-1 >= 99.5 %), (2) the
best-validation checkpoint's test ECE is at least 3 % and (3) the best validation epoch comes at least 10 % of
the run before the last epoch. Re-running resumes unfinished pilots and rewrites `bench/results/methods_pilot.*`;
the study (`bench.methods_study_v2`) trains in the passing regime with the fewest epochs (the cheapest).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.report import commit
from bench.study_runner import launch
from engine.checkpoint import load_checkpoint, model_from_checkpoint
from engine.config import Config, load_config
from engine.evaluate import collect_outputs
from engine.metrics import exit_metrics
from engine.setup_run import data_from_config
from engine.train import train
from pipelines.base import LoaderSpec
from pipelines.torch_loader import TensorLoader

RUNS = Path("runs/methods_pilot")
# Every pilot: the demo's network (width 0.25, one block per stage), 5,000 class-balanced training images without
# augmentation, 5,000 validation images carved from the rest of train, SGD as in the papers.
NET = ["model.name=resnet18", "model.stem=cifar", "model.num_classes=10", "model.in_chans=1"]
DATA = ["data.dataset=fashion_mnist", "data.image_size=28", "data.augment=none", "data.batch_size=128",
        "data.eval_batch_size=1000", "data.val_split=5000", "data.limit_train=5000", "data.balanced_subset=true"]
OPTIM = ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
         "optim.no_decay_bn_bias=true"]
RUN = ["precision.channels_last=true", "logging.progress=false", "logging.log_every=50", "logging.ece_bins=15",
       "exits.stages=[]", "objective.name=ce", "seed=0", "checkpoint.resume=auto"]
# name -> (what it is, overrides)
PILOTS: dict[str, tuple[str, list[str]]] = {
    "w025_step100": ("width 0.25, 100 epochs, LR /10 at 50 and 75 (the papers' 200-epoch steps, halved)",
                     ["model.width=0.25", "model.depths=[1,1,1,1]", "schedule.name=multistep",
                      "schedule.epochs=100", "schedule.milestones=[50,75]", "schedule.gamma=0.1"]),
    "w025_cos60": ("width 0.25, 60 epochs, cosine LR",
                   ["model.width=0.25", "model.depths=[1,1,1,1]", "schedule.name=cosine", "schedule.epochs=60",
                    "schedule.warmup_epochs=0.2"]),
}
CRITERIA = {"train_top1_min": 99.5, "test_ece_min": 3.0, "best_before_last_min": 0.10}


def pilot_overrides(name: str) -> list[str]:
    return [*NET, *DATA, *OPTIM, *RUN, *PILOTS[name][1]]


def pilot_config(name: str, runs: Path = RUNS) -> Config:
    return load_config(None, [*pilot_overrides(name), f"checkpoint.dir={runs / name}"])


def _accuracy_and_calibration(cfg: Config, ckpt: Path, split: str) -> dict:
    cpu = torch.device("cpu")
    model, _ = model_from_checkpoint(load_checkpoint(ckpt, cpu))
    model = model.to(memory_format=torch.channels_last)
    data = data_from_config(cfg, cpu)
    loader = data.test
    if split == "train":  # the training subset in order, without augmentation
        t = data.train
        spec = LoaderSpec(cfg.data.eval_batch_size, False, "none", cfg.data.image_size, tuple(t.mean.tolist()),
                          tuple(t.std.tolist()), torch.channels_last)
        loader = TensorLoader(t.images, t.labels, spec, cpu)
    logits, _, labels = collect_outputs(model, loader, cpu, features=False)
    m = exit_metrics(logits, labels, cfg.logging.ece_bins)["exit0"]
    conf = torch.softmax(logits[-1], 1).amax(1).mean().item() * 100
    return {"top1": m["top1"], "nll": m["nll"], "ece": m["ece"], "conf_minus_acc": conf - m["top1"]}


def verdict(row: dict) -> dict:
    """Which of the three criteria the pilot `row` meets."""
    early = 1 - row["best_epoch"] / row["epochs"]
    return {"train_fit": row["train_last"]["top1"] >= CRITERIA["train_top1_min"],
            "overconfident": row["test_best"]["ece"] >= CRITERIA["test_ece_min"],
            "best_before_last": early >= CRITERIA["best_before_last_min"]}


def run_one(name: str, runs: Path) -> None:
    cfg = pilot_config(name, runs)
    d = Path(cfg.checkpoint.dir)
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    if not summary or summary.get("interrupted"):
        summary = train(cfg, device="cpu")
    val = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    row = {"pilot": name, "what": PILOTS[name][0], "overrides": pilot_overrides(name), "epochs": cfg.schedule.epochs,
           "best_epoch": summary["best_epoch"], "best_val_top1": summary["best_val_top1"],
           "val_top1_by_epoch": [r["select"]["exit0"]["top1"] for r in val],
           "val_nll_by_epoch": [round(r["select"]["exit0"]["nll"], 4) for r in val],
           "train_last": _accuracy_and_calibration(cfg, d / "last.pt", "train"),
           "test_best": _accuracy_and_calibration(cfg, d / "best.pt", "test"),
           "test_last": _accuracy_and_calibration(cfg, d / "last.pt", "test")}
    row["criteria"] = verdict(row)
    row["passes"] = all(row["criteria"].values())
    (d / "pilot.json").write_text(json.dumps(row, indent=2))


def _launch(name: str, args: argparse.Namespace) -> int:
    cmd = [sys.executable, "-m", "bench.methods_pilot", "--one", name, "--runs", str(args.runs),
           "--threads", str(args.threads)]
    return launch(cmd, args.runs / name / "pilot.log", args.threads, name)


def measure_jobs(name: str, runs: Path, epochs: int = 3) -> dict:
    """Wall time of `epochs` epochs of pilot `name` trained as one 2-thread job against two 1-thread jobs at once
    (the same work twice): whether the study should run one job or two on the 2-core machine."""
    def launch(tag: str, threads: int) -> subprocess.Popen:
        over = [o for o in pilot_overrides(name) if not o.startswith("checkpoint.resume")]
        over += [f"schedule.epochs={epochs}", f"checkpoint.dir={runs / '_jobs' / tag}", "checkpoint.overwrite=true"]
        return subprocess.Popen([sys.executable, "-m", "engine.cli", "train", *over, "--device", "cpu"],
                                stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    out = {}
    for arrangement, procs in (("one_job_2_threads", [("a", 2)]), ("two_jobs_1_thread", [("b", 1), ("c", 1)])):
        t0 = time.perf_counter()
        rcs = [p.wait() for p in [launch(tag, th) for tag, th in procs]]
        out[arrangement] = {"wall_s": round(time.perf_counter() - t0, 1), "runs": len(procs), "exit_codes": rcs}
    one, two = out["one_job_2_threads"], out["two_jobs_1_thread"]
    out["runs_per_hour"] = {"one_job_2_threads": round(3600 / one["wall_s"], 2),
                            "two_jobs_1_thread": round(2 * 3600 / two["wall_s"], 2)}
    out["epochs"], out["pilot"] = epochs, name
    return out


def write_report(runs: Path, out: Path) -> str:
    rows = [json.loads(p.read_text()) for n in PILOTS if (p := runs / n / "pilot.json").is_file()]
    out.mkdir(parents=True, exist_ok=True)
    jobs = json.loads((runs / "jobs.json").read_text()) if (runs / "jobs.json").is_file() else None
    doc = {"criteria": CRITERIA, "commit": commit(), "pilots": rows, "jobs": jobs,
           "chosen": min((r for r in rows if r["passes"]), key=lambda r: r["epochs"], default={}).get("pilot")}
    (out / "methods_pilot.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Methods study v2: pilot (CE, seed 0)", "",
             "Command: `python -m bench.methods_pilot` (reruns only what is missing; `--report-only` rewrites this "
             "file from `methods_pilot.json`'s runs). Criteria: training top-1 of the last checkpoint >= "
             f"{CRITERIA['train_top1_min']} %, test ECE (15 bins) of the best-validation checkpoint >= "
             f"{CRITERIA['test_ece_min']} %, best validation epoch at least "
             f"{CRITERIA['best_before_last_min']:.0%} of the run before the last.", "",
             "| pilot | what | train top-1 (last) | test top-1 best / last | test ECE best / last | conf - acc best "
             "| best epoch / epochs | passes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tb, tl = r["test_best"], r["test_last"]
        failed = ", ".join(k for k, ok in r["criteria"].items() if not ok)
        lines.append(f"| `{r['pilot']}` | {r['what']} | {r['train_last']['top1']:.2f} | {tb['top1']:.2f} / "
                     f"{tl['top1']:.2f} | {tb['ece']:.2f} / {tl['ece']:.2f} | {tb['conf_minus_acc']:+.2f} | "
                     f"{r['best_epoch']} / {r['epochs']} | {'yes' if r['passes'] else 'no: ' + failed} |")
    lines += ["", f"Chosen regime: `{doc['chosen']}`, the passing pilot with the fewest epochs (the cheapest for a "
              "study of many runs)." if doc["chosen"] else "No pilot passes yet.", "",
              "Two pilots ran at once, one thread each, on the 2-core machine.", ""]
    if jobs:
        r = jobs["runs_per_hour"]
        lines += [f"**One job or two?** `python -m bench.methods_pilot --measure-jobs` trained {jobs['epochs']} epochs "
                  f"of `{jobs['pilot']}` as one 2-thread job ({jobs['one_job_2_threads']['wall_s']} s) and as two "
                  f"1-thread jobs at once ({jobs['two_jobs_1_thread']['wall_s']} s for both): "
                  f"{r['one_job_2_threads']} against {r['two_jobs_1_thread']} such runs per hour, so the study "
                  f"runs {'two jobs' if r['two_jobs_1_thread'] > r['one_job_2_threads'] else 'one job'} at once.",
                  ""]
    (out / "methods_pilot.md").write_text("\n".join(lines))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pilots", nargs="+", default=list(PILOTS), choices=list(PILOTS))
    p.add_argument("--jobs", type=int, default=2, help="pilots trained at the same time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per pilot")
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--measure-jobs", action="store_true", help="time one 2-thread job against two 1-thread jobs")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        torch.set_num_threads(args.threads)
        run_one(args.one, args.runs)
        return 0
    if args.measure_jobs:
        chosen = json.loads((args.out / "methods_pilot.json").read_text())["chosen"]
        (args.runs / "jobs.json").write_text(json.dumps(measure_jobs(chosen, args.runs), indent=2))
    elif not args.report_only:
        todo = [n for n in args.pilots if not (args.runs / n / "pilot.json").is_file()]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(_launch, todo, [args] * len(todo)))
    print(write_report(args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
