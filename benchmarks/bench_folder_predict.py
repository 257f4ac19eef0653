"""Predict a folder of 1,000 real X-rays, SIGKILL the run part-way, restart it, and check the outputs.

    python benchmarks/bench_folder_predict.py --checkpoint CKPT [--folder ../shared/data/nih-cxr14-sample/images]

Writes benchmarks/results/folder_predict.{md,json}: images per second of each leg, how many outputs the first
leg finished before the kill, and the checks (every image exactly once, predictions.csv complete, no temp files).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling modules, also when loaded from elsewhere

from bench_common import md_table, measured, source_fingerprint, timed, write_results  # noqa: E402


def count_outputs(out: Path) -> int:
    """Prediction JSON files written so far."""
    return len(list(out.glob("*.json"))) if out.is_dir() else 0


def run_and_kill(command: list[str], out: Path, kill_after: int) -> int:
    """Start ``command``, SIGKILL it once ``kill_after`` outputs exist (or it ended); the outputs it left."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while count_outputs(out) < kill_after and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return count_outputs(out)


def render(report: dict, ok: bool) -> str:
    """``folder_predict.md``."""
    checks, before, after = report["checks"], report["killed_after_outputs"], report["checks"]["json_outputs"]
    lines = [f"# Folder prediction: {checks['images_in_folder']} images, killed and restarted ({report['date']})", "",
             (f"`multichex {report['command']}` (2 CPU cores). The first run was SIGKILLed after {before} outputs "
             f"({report['first_leg_s']} s, {report['first_leg_images_per_s']} images/s incl. start-up); the restart "
             f"skipped them and finished the other {after - before} in {report['second_leg_s']} s "
             f"({report['second_leg_images_per_s']} images/s incl. start-up)."), ""]
    lines += md_table(["check", "value"], list(checks.items()))
    lines += ["", f"Result: {'PASS' if ok else 'FAIL'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run, kill, restart, check; 0 when every check passed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--folder", type=Path, default=HERE.parent.parent / "shared" / "data" / "nih-cxr14-sample" / "images")
    parser.add_argument("--kill-after", type=int, default=300, help="SIGKILL the first run once this many outputs exist.")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    images = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".dcm"})
    work = Path(tempfile.mkdtemp(prefix="multichex-folder-"))
    out = work / "predictions"
    command = [sys.executable, "-m", "multichex.cli", "predict", str(args.folder), "--checkpoint", str(args.checkpoint), "--out", str(out)]
    before, first_leg = timed(partial(run_and_kill, command, out, args.kill_after))
    second = measured(partial(subprocess.run, command, capture_output=True, text=True), include_children=True)
    resumed, second_leg = second.result, second.wall_s
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    progress_lines = [line for line in resumed.stderr.splitlines() if "predict:" in line][-1:]
    checks = {
        "images_in_folder": len(images),
        "json_outputs": len(records),
        "distinct_images_in_outputs": len({r["image"] for r in records}),
        "every_image_once": sorted(r["image"] for r in records) == sorted(str(p) for p in images),
        "predictions_csv_rows": len(rows),
        "overlays_present": all((out / r["overlay"]).is_file() for r in records),
        "temp_files_left": len(list(out.glob(".*.tmp"))),
        "restart_exit_code": resumed.returncode,
    }
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(command[3:]), "checkpoint": str(args.checkpoint),
        "code": source_fingerprint(),
        "killed_after_outputs": before, "first_leg_s": round(first_leg, 1), "first_leg_images_per_s": round(before / first_leg, 1),
        "second_leg_s": round(second_leg, 1), "second_leg_images_per_s": round((len(records) - before) / second_leg, 1),
        "second_leg_foreign_cores": second.foreign_cores,
        "progress_bar_last_line": progress_lines[0].strip() if progress_lines else "", "checks": checks,
    }
    ok = checks["every_image_once"] and checks["predictions_csv_rows"] == len(images) and checks["overlays_present"] and resumed.returncode == 0
    markdown = render(report, ok)
    write_results(args.out, "folder_predict", report, markdown)
    print(markdown)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
