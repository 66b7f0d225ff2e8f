"""The two parts of the GPU check (bench/gpu_suite.sh) that are not another benchmark's command.

    python3 -m bench.gpu_check env --out DIR            step 1: GPU, driver, versions, commit, copy bandwidth
    python3 -m bench.gpu_check summary WORK DEST STEPS  after every step: DEST/summary.json and DEST/summary.md

The summary lists every planned step (comma list STEPS) with its status from WORK/steps.tsv, and embeds each finished
step's own report (report.json, or pytest's junit.xml), so the numbers travel in two small files.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from argparse import Namespace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

NOT_RUN = "not reached (the command stopped before this step, or it is still running)"


def env(out: Path) -> int:
    # torch and the bench only for this step: the summary step runs without them
    import torch

    from bench.kernels_measure import copy_bandwidth
    from bench.report import log, provenance, provenance_md, resolve_device, write_report

    device = resolve_device("auto")
    try:
        smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        smi = None
    out.mkdir(parents=True, exist_ok=True)
    (out / "nvidia-smi.txt").write_text(smi or "nvidia-smi: not available\n")
    driver = re.search(r"Driver Version\s*:\s*(\S+)", smi or "")
    copy = copy_bandwidth(device, Namespace(warmup_ms=25, rep_ms=200, repeats=5, copy_gbps=None))
    prov = provenance(device)
    payload = {"gpu": prov["device"]["name"], "driver": driver and driver.group(1), "torch_cuda": torch.version.cuda,
               "copy_gbps": copy, "copy": "a 256 MiB device tensor copy (CPU: 32 MiB), bytes read + written, "
                                         "do_bench median", "provenance": prov}
    md = (f"# Environment\n\n{provenance_md(prov)}- driver: {payload['driver']}, CUDA (torch): "
          f"{payload['torch_cuda']}\n- copy bandwidth: **{copy:.1f} GB/s** ({payload['copy']})\n")
    write_report(out, payload, md)
    log(f"env: {payload['gpu']}, driver {payload['driver']}, copy {copy:.1f} GB/s, commit {prov['commit']}")
    return 0


def junit_counts(path: Path) -> Optional[dict[str, Any]]:
    """pytest's junit.xml as counts plus the names of failed tests (None before pytest finished)."""
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    skipped = [f"{c.get('name')}: {c.find('skipped').get('message', '')}" for c in suite.iter("testcase")
               if c.find("skipped") is not None]
    return {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed_tests": bad,
            "skipped_tests": skipped, "seconds": float(suite.get("time", 0))}


def _step_report(d: Path) -> tuple[Optional[Any], str]:
    """(numbers, markdown) that a step left in its folder."""
    if (d / "report.json").is_file():
        return json.loads((d / "report.json").read_text()), (d / "report.md").read_text()
    counts = junit_counts(d / "junit.xml")
    if counts is None:
        return None, ""
    lines = [f"pytest: **{counts['passed']} passed**, {counts['failures']} failed, {counts['errors']} errors, "
             f"{counts['skipped']} skipped in {counts['seconds']:.1f} s"]
    lines += [f"- FAILED {t}" for t in counts["failed_tests"]] + [f"- skipped {t}" for t in counts["skipped_tests"]]
    return counts, "\n".join(lines) + "\n"


def summary(work: Path, dest: Path, planned: list[str], meta: dict[str, str]) -> int:
    rows = {}
    tsv = work / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        name, status, rc, seconds, limit, cmd = line.split("\t", 5)
        rows[name] = {"status": status, "exit_code": rc, "seconds": int(seconds), "limit_s": int(limit),
                      "command": cmd}
    steps = []
    for i, name in enumerate(planned, 1):
        st = {"step": i, "name": name, **rows.get(name, {"status": NOT_RUN})}
        st["report"], st["_md"] = _step_report(work / name)
        steps.append(st)
    env_prov = (steps[0]["report"] or {}).get("provenance", {}) if planned and planned[0] == "env" else {}
    head = {"gpu": meta.get("gpu"), "rehearsal": meta.get("rehearse") == "1", "command": meta.get("command"),
            "commit": env_prov.get("commit"), "versions": env_prov.get("versions"),
            "budget_s": int(meta.get("budget", 0)), "gpu_budget_s": int(meta.get("gpu_budget", 0)),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    md = [f"# GPU check: {head['gpu']}, {head['written'][:10]}", ""]
    if head["rehearsal"]:
        md += ["> **CPU rehearsal** at toy sizes (Triton interpreter, tiny models): it proves the plumbing; none "
               "of its figures is a GPU measurement.", ""]
    md += [f"- command: `{head['command']}`", f"- commit: `{head['commit']}`",
           f"- step limits: {head['budget_s']} s in all"
           + (f" (rehearsal limits; on the GPU {head['gpu_budget_s']} s)" if head["rehearsal"] else ""), "",
           "| step | status | seconds | limit s | command |", "|---|---|---|---|---|"]
    md += [f"| {s['step']} {s['name']} | {s['status']} | {s.get('seconds', '')} | {s.get('limit_s', '')} | "
           f"`{s.get('command', '')}` |" for s in steps]
    for s in steps:
        body = re.sub(r"^(#+) ", r"\1## ", s.pop("_md"), flags=re.M)  # a step's headings go one level down
        md += ["", f"## {s['step']} {s['name']}: {s['status']}", "", body or "(no report)"]
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in (("summary.json", json.dumps({"suite": head, "steps": steps}, indent=2) + "\n"),
                       ("summary.md", "\n".join(md) + "\n")):
        (dest / f"{name}.part").write_text(text)
        (dest / f"{name}.part").replace(dest / name)  # a kill mid-write leaves the previous summary whole
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"] and len(argv) == 3 and argv[1] == "--out":
        return env(Path(argv[2]))
    if argv[:1] == ["summary"] and len(argv) >= 4:
        meta = dict(a.split("=", 1) for a in argv[4:])
        return summary(Path(argv[1]), Path(argv[2]), [s for s in argv[3].split(",") if s], meta)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
