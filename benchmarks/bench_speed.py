"""CPU speed benchmark for MultiCheXNet (training, gated inference, shared vs separate encoders).

Run from the repository root::

    python benchmarks/bench_speed.py                 # full run, writes benchmarks/results/speed.{md,json}
    python benchmarks/bench_speed.py --quick         # smoke run, writes benchmarks/results/speed_quick.{md,json}

Everything runs in one process with ``torch.set_num_threads(--threads)``, channels_last tensors,
warm-up iterations excluded from timing, and medians over the timed repeats. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded from elsewhere

import torch
from bench_common import (
    check_fingerprint,
    guarded,
    log,
    machine_info,
    results_stem,
    wait_for_idle,
    write_results,
)
from speed_data import DEFAULT_ENCODER, LIGHT_ENCODERS
from speed_gated import bench_gated
from speed_report import evaluate_targets, render_markdown
from speed_shared import bench_shared
from speed_training import bench_training

from multichex.models.encoders import list_encoders


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (unchanged since the single-file version)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--image-size", type=int, default=256, help="input size in pixels (multiple of 32, default 256)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder for speed.md / speed.json")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (lite only, 1 timed step); writes speed_quick.*")
    parser.add_argument("--encoders", nargs="*", default=None, help="training backbones (default: all registered)")
    parser.add_argument("--train-batch", type=int, default=16, help="training batch size (default 16)")
    parser.add_argument("--max-wait-idle", type=float, default=None,
                        help="seconds to wait for other processes to go quiet before starting (default 90, 0 with --quick)")
    parser.add_argument("--retry-budget-s", type=float, default=None,
                        help="a section measured while other processes loaded the CPU is redone, until this many seconds "
                             "after the start (default 360, 0 with --quick)")
    parser.add_argument("--check-fingerprint", action="store_true",
                        help="only compare the committed speed.json's model + loss fingerprint with the code's; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.max_wait_idle is None:
        args.max_wait_idle = 0.0 if args.quick else 90.0
    if args.retry_budget_s is None:
        args.retry_budget_s = 0.0 if args.quick else 360.0
    return args


def training_encoders(requested: list[str] | None, quick: bool) -> list[str]:
    """Backbones to train: requested or all registered (``lite`` only for --quick), default first, light before heavy."""
    encoders = requested if requested else list_encoders()
    if quick and not requested:
        encoders = [DEFAULT_ENCODER]
    return sorted(encoders, key=lambda e: (e != DEFAULT_ENCODER, e not in LIGHT_ENCODERS, e))


def main(argv: list[str] | None = None) -> int:
    """Run the three sections and write speed{,_quick}.{md,json}; print the markdown."""
    args = parse_args(argv)
    code = check_fingerprint(args.out / "speed.json", args.check_fingerprint)  # the committed full-run numbers
    if code is not None:
        return code

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    started = time.perf_counter()
    encoders = training_encoders(args.encoders, args.quick)
    machine = machine_info(args.threads)
    log(f"CPU {machine['cpu_model']}, {machine['logical_cores']} cores, torch {machine['torch']}, threads {torch.get_num_threads()}")

    idle = wait_for_idle(args.max_wait_idle)
    # retries for background load stop after this point, so one run stays within ~10 minutes
    deadline = time.perf_counter() + args.retry_budget_s
    training = bench_training(encoders, args.image_size, args.train_batch, args.quick, gen, deadline)
    gated = guarded("gated inference", lambda: bench_gated(args.image_size, args.quick, gen), 2, deadline)
    shared = guarded("shared vs separate", lambda: bench_shared(args.image_size, args.quick, gen), 2, deadline)

    report = {
        "quick": args.quick,
        "image_size": args.image_size,
        "machine": machine,
        "idle_wait": idle,
        "training": training,
        "gated": gated,
        "shared": shared,
        "targets": evaluate_targets(training, gated, shared),
    }
    report["wall_s"] = time.perf_counter() - started

    stem = results_stem("speed", args.quick)
    markdown = render_markdown(report)
    write_results(args.out, stem, report, markdown)
    log(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')} in {report['wall_s']:.0f} s")
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
