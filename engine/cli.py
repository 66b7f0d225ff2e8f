"""`selfdistill` command: thin subcommands that parse, load the config and call one function.

Exit codes: 0 done; 1 an internal error (a bug: traceback); 2 an expected error (config, data, checkpoint, run
directory, disk), one line and no traceback unless `--debug` or SELFDISTILL_DEBUG=1; 3 stopped by SIGTERM or
Ctrl-C, with last.pt saved (continue with `--resume auto`); 4 training diverged (non-finite values), with the last
good checkpoint named. 130: a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import os
import signal
import sys
import traceback
from pathlib import Path

from engine.config import ConfigError, dump_yaml, load_config, refuse_repeated_keys

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130
# OS errors that describe the user's files or disk, not a bug: one line, exit 2.
USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG, errno.EEXIST}


def _quit_while_starting(signum, frame) -> None:
    """Ctrl-C while the command starts (importing torch takes seconds): nothing is written yet, so stop at once.
    A KeyboardInterrupt raised inside a C extension's import gave tracebacks, segfaults and aborts instead."""
    print("interrupted while starting; nothing was written", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def _started() -> None:
    """The imports are done: Ctrl-C raises KeyboardInterrupt again (train's StopFlag takes it over)."""
    if signal.getsignal(signal.SIGINT) is _quit_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.generations is not None:
        overrides.append(f"generations={args.generations}")
    if args.help_config is not None:
        from engine.config_help import describe

        keys = [k for k in describe() if k.startswith(args.help_config)]
        if not keys:
            raise ConfigError(f"--help-config {args.help_config}: no config key starts with it")
        print("\n".join(keys))
        return 0
    if args.list_models:
        return _models(argparse.Namespace(pattern="*"))
    refuse_repeated_keys(overrides)
    cfg = load_config(args.config, overrides)
    from engine.models.registry import check_model_name
    from engine.objectives import check_config  # torch loads with the commands that need it

    check_model_name(cfg.model.name)
    check_config(cfg)  # what the objective needs from the other sections, before anything runs
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    # start-up time: modules that import torch (1.5 s) are imported by the command that needs them, so that
    # `selfdistill --help`, `--print-config` and `data` start at once
    if cfg.generations > 1:
        from engine.generations import train_generations

        _started()
        summary = train_generations(cfg, device=args.device)
    else:
        from engine.train import train

        _started()
        summary = train(cfg, device=args.device)
    if _is_main_rank() or summary.get("interrupted"):  # a stop: one line from every rank, as each exits 3
        _print_summary(summary)
    return EXIT_STOPPED if summary.get("interrupted") else 0


def _print_summary(summary: dict) -> None:
    from engine.evaluate import format_table  # start-up time (torch)

    if summary.get("interrupted"):
        where = f"generation {summary['generation']}, " if "generation" in summary else ""
        rank = "" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else f"rank {os.environ.get('RANK', '0')}: "
        print(f"{rank}stopped at {where}epoch {summary['epoch']} step {summary['step']}; last.pt is saved: "
              f"continue with --resume auto (exit code {EXIT_STOPPED})")
        return
    for key, title in (("test_best", "test, best-validation checkpoint"), ("test_last", "test, last epoch")):
        if key in summary:
            print(f"\n{title}:\n{format_table(summary[key])}")
    skipped = summary.get("skipped_files")
    if skipped:
        print(f"\ndata.skip_corrupt: skipped {len(skipped)} unreadable image file(s), listed in summary.json")
    if "run_dir" in summary:
        print(f"\nrun directory: {summary['run_dir']}")


def _models(args: argparse.Namespace) -> int:
    """The registered backbones matching a shell pattern, then timm's where timm is installed."""
    import fnmatch

    from engine.models.registry import MODELS  # start-up time (torch)
    from engine.models.timm_backbone import import_timm

    names = [n for n in MODELS.names() if fnmatch.fnmatch(n, args.pattern)]
    try:
        timm = import_timm()
        names += [f"timm:{n}" for n in timm.list_models(args.pattern)]
    except ImportError:
        names.append("timm:<name>  (any timm model with forward_intermediates: pip install 'selfdistill[timm]')")
    print("\n".join(names))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from engine.evaluate import format_table  # start-up time (torch)
    from engine.evaluate_cli import evaluate_checkpoint

    _started()
    if args.bins is not None and args.bins < 1:
        raise ConfigError(f"--bins {args.bins}: the ECE needs at least 1 bin")
    res = evaluate_checkpoint(args.checkpoint, args.split, args.overrides, args.bins, args.out, args.device)
    print(format_table(res))
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    """Subcommands owned by other packages, each a `main(argv) -> int` imported only when called."""
    tool = importlib.import_module(module)
    _started()
    return int(tool.main(argv) or 0)


SUBTOOLS = {
    "data": "pipelines.prepare",
    "bench kernels": "bench.kernels",
    "bench host-overhead": "bench.host_overhead",
    "bench loader": "bench.loader",
    "bench train": "bench.train",
    "profile exits": "bench.profile",
    "export": "engine.export",
}


def _first_line(module: str) -> str:
    """The first line of a subtool's module docstring, read without importing it (torch stays unloaded)."""
    spec = importlib.util.find_spec(module)
    text = Path(spec.origin).read_text() if spec and spec.origin else ""
    doc = text.split('"""')[1] if text.count('"""') >= 2 else ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _dispatch(command: str, rest: list[str]) -> int:
    key = command
    if command in ("bench", "profile"):
        choices = sorted(k.split()[1] for k in SUBTOOLS if k.startswith(command + " "))
        if not rest or rest[0] not in choices:
            asked = bool(rest) and rest[0] in ("-h", "--help")
            usage = (f"usage: selfdistill {command} {{{','.join(choices)}}} ...\n" + "".join(
                f"  {c:<8} {_first_line(SUBTOOLS[f'{command} {c}'])}\n" for c in choices)
                + f"`selfdistill {command} <name> --help` shows the options of each.")
            print(usage, file=sys.stdout if asked else sys.stderr)
            return 0 if asked else EXIT_BAD_INPUT
        key, rest = f"{command} {rest[0]}", rest[1:]
    return _delegate(SUBTOOLS[key], rest)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("selfdistill")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"selfdistill {_version()}")
    p.add_argument("--debug", action="store_true", help="show the traceback of expected errors too "
                                                        "(or set SELFDISTILL_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a (multi-exit) model; overrides as key.sub=value")
    t.add_argument("--config", "-c", help="YAML config (configs/*.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 exits.stages=[0,1]")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    t.add_argument("--resume", help="checkpoint to resume, or 'auto' for the run directory's last.pt")
    t.add_argument("--generations", type=int, help="multi-generation self-distillation: number of generations")
    t.add_argument("--device", choices=["cpu", "cuda"], help="force a device (default: cuda if available)")
    t.add_argument("--list-models", action="store_true", help="list the registered model names and exit")
    t.add_argument("--help-config", nargs="?", const="", metavar="PREFIX",
                   help="list the config keys (those under PREFIX, e.g. optim): default, range, meaning")
    m = sub.add_parser("models", help="list the backbones model.name accepts")
    m.add_argument("pattern", nargs="?", default="*", help="a shell pattern, e.g. 'resnet*'")
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


def _classify(e: BaseException) -> tuple[int, str] | None:
    """(exit code, label) for an expected error; None for a bug, which keeps its traceback."""
    # start-up time (torch), as in `_train`
    from engine.checkpoint import CheckpointError
    from engine.distributed import CollectiveTimeout
    from engine.monitor import TrainingDiverged
    from engine.rundir import RunDirError
    from pipelines.batch import DataConfigError, DataError

    if isinstance(e, (ConfigError, DataConfigError)):
        return EXIT_BAD_INPUT, "config error"
    if isinstance(e, DataError):
        return EXIT_BAD_INPUT, "data error"
    if isinstance(e, CheckpointError):
        return EXIT_BAD_INPUT, "checkpoint error"
    if isinstance(e, RunDirError):
        return EXIT_BAD_INPUT, "run directory error"
    if isinstance(e, CollectiveTimeout):
        return EXIT_BAD_INPUT, "distributed error"
    if (isinstance(e, OSError) and e.errno in USER_ERRNOS) or isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return EXIT_BAD_INPUT, "error"
    if isinstance(e, TrainingDiverged):
        return EXIT_DIVERGED, "training diverged"
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("SELFDISTILL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    previous = None
    try:
        previous = signal.signal(signal.SIGINT, _quit_while_starting)
    except ValueError:  # not the main thread
        pass
    try:
        if argv and argv[0] in ("data", "bench", "profile", "export"):
            # Their own parsers read the rest (argparse.REMAINDER cannot start with an option such as --checkpoint).
            return _dispatch(argv[0], argv[1:])
        args, extra = parser.parse_known_args(argv)
        if extra:  # overrides may come after options too: `train --config X --device cpu optim.lr=0.1`
            if args.command not in ("train", "eval") or any(x.startswith("-") or "=" not in x for x in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = list(args.overrides) + extra
        return {"train": _train, "eval": _eval, "models": _models}[args.command](args)
    except BrokenPipeError:  # the reader went away (`selfdistill models | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - sorted into expected errors and bugs
        if "engine.distributed" in sys.modules:  # a process group was set up: a peer may have stopped answering
            e = sys.modules["engine.distributed"].as_collective_timeout(e) or e
        kind = _classify(e)
        if kind is None:
            raise
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).split("\n")) or type(e).__name__
        print(f"{kind[1]}: {message}", file=sys.stderr)
        return kind[0]
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
