"""Re-run the MultiCheXNet paper's experiments on ../shared/data (patient-wise splits, several seeds).

    python experiments/multichexnet/run.py --seeds 0 1 2          # ~25 min per seed on 2 CPU cores
    python experiments/multichexnet/make_tables.py                # tables.md + plots from results/

Per seed it runs, through the ``multichex`` command line (so every number comes from a command a user can type):
  1. the staged protocol ``configs/multichexnet.yaml`` (teacher forcing p = 0.9, gate in the loop);
  2. the same protocol with 100 % teacher forcing (its first two phases, identical by construction, are
     reused from run 1 and the protocol resumes from there);
  3. BigBang: the MTL phase alone from random initialisation;
  4. transfer to COVID-19 vs other findings (COVID-19 image collection, both licence folders) from the MTL
     classifier, from the classification-only pre-trained model, and from scratch, at 5/10/20/all shots.
Each run's metrics JSON and its wall time are copied to ``results/seed-N/``; the runs themselves stay in
``runs/experiments/`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run  # noqa: E402  (experiments/common.py, beside this folder)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
PROTOCOL = REPO / "configs" / "multichexnet.yaml"
SHOTS = "5,10,20,all"
TRANSFER_DATA = [f"covid-chestxray={DATA / 'covid-chestxray'}", f"covid-chestxray-nc={DATA / 'covid-chestxray-nc'}"]


def variant(path: Path, out_dir: Path, seed: int, phases: list[dict]) -> Path:
    """The shipped protocol with other phases (same sources and seed, so the same patient split)."""
    data = yaml.safe_load(PROTOCOL.read_text())
    data.update(out_dir=str(out_dir), seed=seed, phases=phases)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def prime_from(source: Path, target: Path, n_phases: int) -> None:
    """Copy the first ``n_phases`` finished phases (and the split) of ``source`` so ``target`` resumes after them."""
    state = json.loads((source / "protocol_state.json").read_text())
    kept = state["completed"][:n_phases]
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "split.json", target / "split.json")
    for folder in sorted((source / "phases").iterdir())[:n_phases]:
        shutil.copytree(folder, target / "phases" / folder.name, dirs_exist_ok=True)
    primed = {"completed": kept, "metrics": {k: state["metrics"][k] for k in kept}, "seconds": {k: state["seconds"][k] for k in kept}}
    (target / "protocol_state.json").write_text(json.dumps(primed, indent=2))


def run_seed(seed: int, runs: Path, results: Path) -> None:
    cli = [sys.executable, "-m", "multichex.cli"]
    out = runs / f"seed-{seed}"
    keep = results / f"seed-{seed}"
    keep.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    phases = yaml.safe_load(PROTOCOL.read_text())["phases"]

    main = out / "multichexnet"
    if not (main / "metrics.json").exists():
        seconds["multichexnet"] = run([*cli, "train", str(PROTOCOL), "--out", str(main), "--seed", str(seed), "--no-progress"], out / "multichexnet.log")
    forced = [dict(p, teacher_forcing={**p["teacher_forcing"], "p": 1.0}) if "teacher_forcing" in p else p for p in phases]
    tf100 = out / "tf100"
    if not (tf100 / "metrics.json").exists():
        prime_from(main, tf100, 2)
        config = variant(out / "tf100.yaml", tf100, seed, forced)
        seconds["tf100"] = run([*cli, "train", str(config), "--resume", "--no-progress"], out / "tf100.log")
    bigbang = out / "bigbang"
    if not (bigbang / "metrics.json").exists():
        mtl = dict(next(p for p in phases if p["name"] == "mtl"), name="bigbang-mtl", init="random")
        config = variant(out / "bigbang.yaml", bigbang, seed, [mtl])
        seconds["bigbang"] = run([*cli, "train", str(config), "--no-progress"], out / "bigbang.log")
    origins = {
        "transfer-from-mtl": str(main / "phases" / "06-mtl" / "best.safetensors"),
        "transfer-from-cls": str(main / "phases" / "01-cls-pretrain" / "best.safetensors"),
        "transfer-from-scratch": "scratch",
    }
    for name, origin in origins.items():
        if not (out / name / "transfer.json").exists():
            seconds[name] = run([*cli, "transfer", *TRANSFER_DATA, "--from", origin, "--classes", "COVID-19", "--shots", SHOTS,
                                 "--epochs", "10", "--steps-per-epoch", "10", "--seed", str(seed), "--out", str(out / name)], out / f"{name}.log")

    for name in ("multichexnet", "tf100", "bigbang"):
        shutil.copyfile(out / name / "metrics.json", keep / f"{name}.json")
        shutil.copyfile(out / name / "protocol_state.json", keep / f"{name}_state.json")
    for name in origins:
        shutil.copyfile(out / name / "transfer.json", keep / f"{name}.json")
    timing_path = keep / "seconds.json"
    previous = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    timing_path.write_text(json.dumps({**previous, **seconds}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "experiments" / "multichexnet")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA}: the shared data folder is needed")
    for seed in args.seeds:
        run_seed(seed, args.runs, args.results)


if __name__ == "__main__":
    main()
