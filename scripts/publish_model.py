"""Publish a trained checkpoint as a shipped model: an fp16 (or float32) copy in the package's zoo, its sha256 in the index.

    python scripts/publish_model.py runs/zoo/multichex-lite-256/best.safetensors --name multichex-lite-256 \
        --summary "..." --card docs/models/multichex-lite-256.md --default

The copy is loaded back as float32 (``multichex.models.checkpoint.load_weights``); this script checks that its
predictions agree with the float32 checkpoint on the bundled sample (class probabilities within ``--tolerance``,
every mask Dice ≥ ``--min-mask-dice``) before it replaces the shipped files and writes the index; a refused copy
leaves the model already shipped untouched. ``--dtype float32`` stores the weights as trained (twice the size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from multichex.data.io import list_images
from multichex.data.sources import bundled_sample_root
from multichex.inference.predictor import prepare_image
from multichex.inference.quantize import agreement
from multichex.models.checkpoint import load_model, read_checkpoint, write_checkpoint
from multichex.models.pretrained import INDEX_NAME, package_zoo, sha256_of

PUBLIC_HEADER = ("gate_threshold", "class_thresholds", "train_config", "trainer")
STORED_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def sample_images(size: int) -> torch.Tensor:
    """The bundled sample's X-rays, read as ``predict`` reads them."""
    return torch.stack([prepare_image(path, size).tensor for path in list_images(bundled_sample_root())])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--summary", required=True)
    parser.add_argument("--card", type=Path, required=True, help="Model card (markdown); copied into the package.")
    parser.add_argument("--split", type=Path, help="The run's split.json, recorded (repo-relative) in the shipped header.")
    parser.add_argument("--metrics", type=Path, help="A metrics JSON whose headline numbers go into the index.")
    parser.add_argument("--default", action="store_true", help="Make this the model commands use without --checkpoint.")
    parser.add_argument("--dtype", choices=sorted(STORED_DTYPES), default="float16",
                        help="Precision of the stored copy (float32: exact, twice the size).")
    parser.add_argument("--tolerance", type=float, default=2e-3, help="Largest allowed class-probability difference between the stored copy and the float32 weights.")
    parser.add_argument("--min-mask-dice", type=float, default=0.995, help="Smallest allowed mask Dice between the stored copy and the float32 weights on any image.")
    args = parser.parse_args()

    header, _ = read_checkpoint(args.checkpoint)
    model, _ = load_model(args.checkpoint)
    zoo = package_zoo()
    target = zoo / f"{args.name}.safetensors"
    candidate = zoo / f".{args.name}.candidate.safetensors"
    extra = {k: header[k] for k in PUBLIC_HEADER if k in header}
    if args.split is not None and "train_config" in extra:
        extra["train_config"] = {**extra["train_config"], "split_file": str(args.split)}
    extra["published_from"] = {"checkpoint": str(args.checkpoint), "sha256": sha256_of(args.checkpoint)}
    write_checkpoint(candidate, model, extra, dtype=STORED_DTYPES[args.dtype])
    copy, _ = load_model(candidate)
    with torch.inference_mode():
        measured = agreement(model, copy, sample_images(model.config.image_size))
    print(json.dumps(measured))
    if measured["max_abs_class_probability"] > args.tolerance or measured["min_mask_dice"] < args.min_mask_dice:
        print(f"{args.dtype} copy disagrees with the float32 weights (class probabilities beyond {args.tolerance} or a "
              f"mask Dice under {args.min_mask_dice}): not published; the shipped files are unchanged", file=sys.stderr)
        candidate.unlink()
        candidate.with_suffix(".json").unlink(missing_ok=True)
        return 1
    candidate.replace(target)
    candidate.with_suffix(".json").replace(target.with_suffix(".json"))
    card = zoo / f"{args.name}.md"
    if not (card.exists() and card.samefile(args.card)):
        shutil.copyfile(args.card, card)
    index_path = zoo / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"models": []}
    entry = {"name": args.name, "file": target.name, "sha256": sha256_of(target), "summary": args.summary,
             "card": f"{args.name}.md", "default": args.default, "image_size": model.config.image_size,
             "encoder": model.config.encoder, "stored_dtype": args.dtype, "copy_agreement": measured}
    if args.metrics is not None:
        entry["metrics"] = json.loads(args.metrics.read_text())
    models = [m for m in index["models"] if m["name"] != args.name]
    if args.default:
        for m in models:
            m["default"] = False
    index["models"] = models + [entry]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    print(f"published {target} ({target.stat().st_size / 2**20:.1f} MiB, sha256 {entry['sha256'][:12]}…)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
