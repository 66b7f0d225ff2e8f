"""`selfdistill` command: thin subcommands that parse, load the config and call one function."""
from __future__ import annotations

import argparse
import importlib
import sys

from engine.config import ConfigError, dump_yaml, load_config

EXIT_BAD_INPUT = 2


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.generations:
        overrides.append(f"generations={args.generations}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if cfg.generations > 1:
        from engine.generations import train_generations

        summary = train_generations(cfg, device=args.device)
    else:
        from engine.train import train

        summary = train(cfg, device=args.device)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    from engine.evaluate import format_table

    if summary.get("interrupted"):
        print(f"stopped at epoch {summary['epoch']} step {summary['step']}; resume with --resume auto")
        return
    for key, title in (("test_best", "test, best-validation checkpoint"), ("test_last", "test, last epoch")):
        if key in summary:
            print(f"\n{title}:\n{format_table(summary[key])}")
    if "run_dir" in summary:
        print(f"\nrun directory: {summary['run_dir']}")


def _eval(args: argparse.Namespace) -> int:
    from engine.evaluate_cli import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, args.split, args.overrides, args.bins, args.out, args.device)
    from engine.evaluate import format_table

    print(format_table(res))
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    """Subcommands owned by other packages, each a `main(argv) -> int` imported only when called."""
    return int(importlib.import_module(module).main(argv) or 0)


SUBTOOLS = {
    "data": "pipelines.prepare",
    "bench kernels": "bench.kernels",
    "bench loader": "bench.loader",
    "bench train": "bench.train",
    "profile exits": "bench.exits",
    "export": "bench.export",
}


def _dispatch(command: str, rest: list[str]) -> int:
    key = command
    if command in ("bench", "profile"):
        choices = sorted(k.split()[1] for k in SUBTOOLS if k.startswith(command + " "))
        if not rest or rest[0] not in choices:
            print(f"usage: selfdistill {command} {{{','.join(choices)}}} ...", file=sys.stderr)
            return EXIT_BAD_INPUT
        key, rest = f"{command} {rest[0]}", rest[1:]
    return _delegate(SUBTOOLS[key], rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a (multi-exit) model; overrides as key.sub=value")
    t.add_argument("--config", "-c", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 exits.stages=[1,2]")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    t.add_argument("--resume", help="checkpoint to resume, or 'auto' for the run directory's last.pt")
    t.add_argument("--generations", type=int, help="multi-generation self-distillation: number of generations")
    t.add_argument("--device", choices=["cpu", "cuda"], help="force a device (default: cuda if available)")
    e = sub.add_parser("eval", help="per-exit and ensemble metrics of a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--bins", type=int, default=None, help="ECE bins (default: the run's logging.ece_bins)")
    e.add_argument("--out", help="JSON output (default: next to the checkpoint)")
    e.add_argument("--device", choices=["cpu", "cuda"])
    e.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/new/path")
    for name, helptext in (("data", "prepare or check datasets"), ("bench", "benchmarks: kernels, loader, train"),
                           ("profile", "profiling reports: exits"), ("export", "export a truncated model")):
        sp = sub.add_parser(name, help=helptext, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        if argv and argv[0] in ("data", "bench", "profile", "export"):
            # Their own parsers read the rest (argparse.REMAINDER cannot start with an option such as --checkpoint).
            return _dispatch(argv[0], argv[1:])
        args, extra = parser.parse_known_args(argv)
        if extra:  # overrides may come after options too: `train --config X --device cpu optim.lr=0.1`
            if args.command not in ("train", "eval") or any(x.startswith("-") or "=" not in x for x in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = list(args.overrides) + extra
        return _train(args) if args.command == "train" else _eval(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001
        from pipelines.base import DataError

        if isinstance(e, DataError):
            print(f"data error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        from engine.train import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"training stopped: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
