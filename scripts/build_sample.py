#!/usr/bin/env python
"""Build the small sample bundle shipped inside the package (``src/multichex/sample_data``).

Reads the real public chest X-ray samples in ``shared/data`` (see its README.md and each folder's SOURCE.md) and
writes a small, permissively licensed subset that mimics the shared folder layout, so the same reader code reads
both:

* ``covid-chestxray/``   Hannover Medical School images (CC BY 3.0) from the COVID-19 image data collection that
                         have a V7 Labs lung mask (CC BY 4.0); longest side 256 px. The collection's CC BY-NC-SA
                         metadata is NOT copied: labels are rebuilt from Hannover facts only.
* ``nih-cxr14-bbox/``    about 140 NIH ChestX-ray14 images with official lesion boxes, 256x256, patient-wise.
* ``kermany-pediatric/`` about 100 pediatric images (normal / bacterial / viral), 224x224, patient-wise.
* ``ATTRIBUTION.md`` and ``README.md``.

``covid-chestxray-nc`` (non-commercial) is never read. The output is deterministic for a given seed.

Usage::

    python scripts/build_sample.py [--shared ../shared/data] [--out src/multichex/sample_data] [--seed 20261125]
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

BOX_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltrate",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
]
PATHOGENS = ["normal", "bacteria", "virus"]

COVID_COLUMNS = [
    "image",
    "patientid",
    "hannover_patient_id",
    "finding",
    "covid19",
    "view",
    "license",
    "has_lung_mask",
    "width",
    "height",
]

NIH_TARGET_IMAGES = 140
KERMANY_TARGET_IMAGES = 100
COVID_MAX_SIDE = 256
NIH_SIZE = 256


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n", extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row[c] for c in columns})


def save_png(img: Image.Image, path: Path) -> None:
    """Save an 8-bit grayscale PNG with Pillow's optimiser (deterministic bytes)."""
    if img.mode != "L":
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    path.write_bytes(buf.getvalue())


def fit_longest_side(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = min(1.0, max_side / max(w, h))  # never upsample
    return max(1, round(w * scale)), max(1, round(h * scale))


def fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------------
# covid-chestxray (Hannover CC BY 3.0 images with V7 lung masks)
# ----------------------------------------------------------------------------------------------------------------
def build_covid(shared: Path, out: Path) -> dict:
    src = shared / "covid-chestxray"
    dst = out / "covid-chestxray"
    fresh_dir(dst)
    (dst / "images").mkdir()
    (dst / "masks").mkdir()

    _, rows = read_csv(src / "labels.csv")
    keep = [
        r
        for r in rows
        if r["license"].strip() == "CC BY 3.0"
        and r["hannover_patient_id"].strip()
        and r["has_lung_mask"].strip() == "1"
    ]
    keep.sort(key=lambda r: r["image"])

    # Hannover facts: the index (patient_id, image_id) and the projection of images stored in hannover-covid19.
    _, index_rows = read_csv(shared / "hannover-covid19" / "all_hannover_images_index.csv")
    hannover_patient = {r["image_id"]: r["patient_id"] for r in index_rows}
    _, hannover_rows = read_csv(shared / "hannover-covid19" / "labels.csv")
    hannover_projection = {r["image_id"]: r["projection"].strip().upper() for r in hannover_rows if r["projection"]}

    out_rows = []
    view_source = Counter()
    for r in keep:
        name = r["image"]
        stem = Path(name).stem
        hpid = r["hannover_patient_id"].strip()
        if stem in hannover_patient and hannover_patient[stem] != hpid:
            raise ValueError(f"{name}: Hannover patient id mismatch ({hannover_patient[stem]} vs {hpid})")
        img_path = src / "images" / name
        mask_path = src / "masks" / name
        if not mask_path.is_file():
            raise FileNotFoundError(f"{name}: has_lung_mask == 1 but {mask_path} is missing")

        with Image.open(img_path) as im:
            im = im.convert("L")
            size = fit_longest_side(im.size, COVID_MAX_SIDE)
            small = im.resize(size, Image.Resampling.LANCZOS) if size != im.size else im.copy()
        with Image.open(mask_path) as mk:
            mk = mk.convert("L")
            if mk.size != im.size:
                raise ValueError(f"{name}: mask size {mk.size} != image size {im.size}")
            mk_small = mk.resize(size, Image.Resampling.BILINEAR)
        arr = (np.asarray(mk_small) >= 128).astype(np.uint8) * 255
        save_png(small, dst / "images" / name)
        save_png(Image.fromarray(arr, mode="L"), dst / "masks" / name)

        if stem in hannover_projection:
            view = hannover_projection[stem]
            view_source["hannover projection"] += 1
        else:
            view = r["view"].strip()
            view_source["covid-chestxray view"] += 1

        out_rows.append(
            {
                "image": name,
                "patientid": hpid,
                "hannover_patient_id": hpid,
                "finding": "COVID-19",
                "covid19": 1,
                "view": view,
                "license": "CC BY 3.0",
                "has_lung_mask": 1,
                "width": size[0],
                "height": size[1],
            }
        )

    write_csv(dst / "labels.csv", COVID_COLUMNS, out_rows)
    return {
        "images": len(out_rows),
        "masks": len(out_rows),
        "patients": len({r["patientid"] for r in out_rows}),
        "views": dict(sorted(Counter(r["view"] for r in out_rows).items())),
        "view_source": dict(view_source),
        "bytes": dir_bytes(dst),
    }


# ----------------------------------------------------------------------------------------------------------------
# nih-cxr14-bbox (patient-wise, label-balanced sample, 512 -> 256)
# ----------------------------------------------------------------------------------------------------------------
def build_nih(shared: Path, out: Path, rng: np.random.Generator, target: int = NIH_TARGET_IMAGES) -> dict:
    src = shared / "nih-cxr14-bbox"
    dst = out / "nih-cxr14-bbox"
    fresh_dir(dst)
    (dst / "images").mkdir()

    columns, rows = read_csv(src / "labels.csv")
    box_cols, boxes = read_csv(src / "boxes.csv")
    boxes_by_image: dict[str, list[dict]] = defaultdict(list)
    for b in boxes:
        boxes_by_image[b["image"]].append(b)

    images_by_patient: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        images_by_patient[r["patient_id"]].append(r)
    patient_labels: dict[str, Counter] = {}
    for pid, imgs in images_by_patient.items():
        patient_labels[pid] = Counter(b["label"] for r in imgs for b in boxes_by_image[r["image"]])

    patients = sorted(images_by_patient, key=lambda p: int(p) if p.isdigit() else p)
    order = {p: i for i, p in enumerate(patients)}
    # one fixed random permutation of the patients; candidates are taken in this order
    perm = [patients[i] for i in rng.permutation(len(patients))]

    chosen: list[str] = []
    chosen_set: set[str] = set()
    label_count: Counter = Counter({lab: 0 for lab in BOX_LABELS})
    n_images = 0
    while n_images < target:
        budget = target - n_images
        progress = False
        # label with the fewest boxes so far (ties: fixed label order)
        for lab in sorted(BOX_LABELS, key=lambda lab: (label_count[lab], BOX_LABELS.index(lab))):
            cands = [
                p
                for p in perm
                if p not in chosen_set and patient_labels[p][lab] > 0 and len(images_by_patient[p]) <= budget
            ]
            if not cands:
                continue
            # prefer patients whose boxes are all of this label (keeps the label counts even)
            pure = [p for p in cands if set(patient_labels[p]) == {lab}]
            pick = (pure or cands)[0]
            chosen.append(pick)
            chosen_set.add(pick)
            label_count.update(patient_labels[pick])
            n_images += len(images_by_patient[pick])
            progress = True
            break
        if not progress:
            break

    chosen.sort(key=lambda p: order[p])
    out_rows: list[dict] = []
    out_boxes: list[dict] = []
    scale = NIH_SIZE / 512.0
    for pid in chosen:
        for r in sorted(images_by_patient[pid], key=lambda r: r["image"]):
            name = r["image"]
            with Image.open(src / "images" / name) as im:
                im = im.convert("L")
                if im.size != (512, 512):
                    raise ValueError(f"{name}: expected 512x512, got {im.size}")
                small = im.resize((NIH_SIZE, NIH_SIZE), Image.Resampling.LANCZOS)
            save_png(small, dst / "images" / name)
            row = dict(r)
            row["width"] = NIH_SIZE
            row["height"] = NIH_SIZE
            out_rows.append(row)
            for b in boxes_by_image[name]:
                x, y, w, h = (float(b[k]) * scale for k in ("x", "y", "w", "h"))
                # keep inside the image (source boxes are inside 512x512 already; this guards rounding)
                x = min(max(x, 0.0), NIH_SIZE)
                y = min(max(y, 0.0), NIH_SIZE)
                w = min(w, NIH_SIZE - x)
                h = min(h, NIH_SIZE - y)
                out_boxes.append(
                    {
                        "image": name,
                        "label": b["label"],
                        "x": f"{x:.2f}",
                        "y": f"{y:.2f}",
                        "w": f"{w:.2f}",
                        "h": f"{h:.2f}",
                    }
                )

    write_csv(dst / "labels.csv", columns, out_rows)
    write_csv(dst / "boxes.csv", box_cols, out_boxes)
    return {
        "images": len(out_rows),
        "patients": len(chosen),
        "boxes": len(out_boxes),
        "boxes_per_label": dict(sorted(Counter(b["label"] for b in out_boxes).items())),
        "views": dict(sorted(Counter(r["view"] for r in out_rows).items())),
        "bytes": dir_bytes(dst),
    }


# ----------------------------------------------------------------------------------------------------------------
# kermany-pediatric (patient-wise, balanced normal / bacteria / virus, 224x224 kept)
# ----------------------------------------------------------------------------------------------------------------
def build_kermany(shared: Path, out: Path, rng: np.random.Generator, target: int = KERMANY_TARGET_IMAGES) -> dict:
    src = shared / "kermany-pediatric"
    dst = out / "kermany-pediatric"
    fresh_dir(dst)
    (dst / "images").mkdir()

    columns, rows = read_csv(src / "labels.csv")
    images_by_patient: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        images_by_patient[r["patient_id"]].append(r)
    patient_pathogens = {p: Counter(r["pathogen"] for r in imgs) for p, imgs in images_by_patient.items()}
    patients = sorted(images_by_patient)
    order = {p: i for i, p in enumerate(patients)}
    perm = [patients[i] for i in rng.permutation(len(patients))]

    chosen: list[str] = []
    chosen_set: set[str] = set()
    counts: Counter = Counter({k: 0 for k in PATHOGENS})
    n_images = 0
    while n_images < target:
        budget = target - n_images
        progress = False
        for cls in sorted(PATHOGENS, key=lambda c: (counts[c], PATHOGENS.index(c))):
            # single-pathogen patients only, so every class count stays exact
            cands = [
                p
                for p in perm
                if p not in chosen_set
                and set(patient_pathogens[p]) == {cls}
                and len(images_by_patient[p]) <= budget
            ]
            if not cands:
                continue
            pick = cands[0]
            chosen.append(pick)
            chosen_set.add(pick)
            counts.update(patient_pathogens[pick])
            n_images += len(images_by_patient[pick])
            progress = True
            break
        if not progress:
            break

    chosen.sort(key=lambda p: order[p])
    out_rows = []
    for pid in chosen:
        for r in sorted(images_by_patient[pid], key=lambda r: r["image"]):
            name = r["image"]
            with Image.open(src / "images" / name) as im:
                im = im.convert("L")
                if im.size != (224, 224):
                    raise ValueError(f"{name}: expected 224x224, got {im.size}")
                save_png(im, dst / "images" / name)  # no resampling, re-saved optimised
            out_rows.append(dict(r))

    write_csv(dst / "labels.csv", columns, out_rows)
    return {
        "images": len(out_rows),
        "patients": len(chosen),
        "pathogens": dict(sorted(Counter(r["pathogen"] for r in out_rows).items())),
        "kermany_split": dict(sorted(Counter(r["kermany_split"] for r in out_rows).items())),
        "bytes": dir_bytes(dst),
    }


# ----------------------------------------------------------------------------------------------------------------
# text files
# ----------------------------------------------------------------------------------------------------------------
def attribution_md(stats: dict, seed: int) -> str:
    c, n, k = stats["covid-chestxray"], stats["nih-cxr14-bbox"], stats["kermany-pediatric"]
    return f"""# Attribution — multichex sample data

This bundle is a tiny subset of public chest X-ray data sets, shipped for demonstration, tests and research
only. **It is not for clinical use** and must not be used to claim diagnostic performance.
All images are 8-bit grayscale PNGs. Built by `scripts/build_sample.py` (seed {seed}) from the shared copies
described in each original `SOURCE.md`. Nothing in this bundle is under a non-commercial licence.

## covid-chestxray/

- **Original data sets:**
  - Images: *COVID-19 Image Repository*, Institute for Diagnostic and Interventional Radiology,
    Hannover Medical School (MHH), Germany — https://github.com/ml-workgroup/covid-19-image-repository
    (commit `ad7ab099b425f16e06bba22322336b7d6a732965`); obtained through the *COVID-19 image data collection*
    (Cohen et al.), https://github.com/ieee8023/covid-chestxray-dataset (fork `hida6/covid-chestxray-dataset`,
    commit `584034aa7fbf06496741f11008d72fd791c8e443`).
  - Lung masks: V7 Labs, *COVID-19 X-ray dataset, lung segmentations* — https://github.com/v7labs/covid-19-xray-dataset
    (copy shipped in the PyPI wheel `torchxrayvision==1.5.7`).
- **Cite:**
  - H. B. Winther, H. Laser, S. Gerbel, et al. *COVID-19 Image Repository.* figshare, 2020,
    DOI 10.6084/m9.figshare.12275009.
  - J. P. Cohen, P. Morrison, L. Dao. *COVID-19 image data collection.* arXiv:2003.11597, 2020.
  - J. P. Cohen, P. Morrison, L. Dao, K. Roth, T. Q. Duong, M. Ghassemi. *COVID-19 Image Data Collection:
    Prospective Predictions Are the Future.* arXiv:2006.11988, 2020.
  - Lung masks: V7 Labs, *COVID-19 X-ray dataset, lung segmentations* (github.com/v7labs/covid-19-xray-dataset).
- **Licence:** Hannover images **CC BY 3.0** (https://creativecommons.org/licenses/by/3.0/);
  V7 Labs lung masks **CC BY 4.0** (https://creativecommons.org/licenses/by/4.0/).
- **What was kept:** the {c['images']} images ({c['patients']} patients) whose licence is `CC BY 3.0`, that have a
  Hannover patient id and a V7 lung mask, with their masks.
- **Changes:** converted to 8-bit grayscale and downsampled with Lanczos so that the longest side is
  {COVID_MAX_SIDE} px (aspect ratio kept); masks resized bilinearly to the image size and thresholded at 128
  (values 0/255). The collection's `metadata.csv` (CC BY-NC-SA 4.0) is **not** reproduced: `labels.csv` holds only
  the Hannover patient id (CC BY 3.0), the finding COVID-19 (the Hannover repository describes all its patients as
  COVID-19 cases), the acquisition view (PA / AP / AP Supine), the licence and the stored size.

## nih-cxr14-bbox/

- **Original data set:** NIH Clinical Center ChestX-ray8 / ChestX-ray14 with the official lesion boxes
  (`BBox_List_2017.csv`) — https://nihcc.app.box.com/v/ChestXray-NIHCC
  (images via GitHub `samadon1/radSIM`, commit `e7ae5971e561e35a247826845876bc0258e0f7f9`; labels and boxes from
  NIH's `Data_Entry_2017_v2020.csv` / `BBox_List_2017.csv` in the PyPI wheel `torchxrayvision==1.5.7`).
- **Cite:** X. Wang, Y. Peng, L. Lu, Z. Lu, M. Bagheri, R. M. Summers. *ChestX-ray8: Hospital-scale Chest X-ray
  Database and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases.*
  IEEE CVPR 2017, pp. 3462–3471.
- **Acknowledgement:** the images are provided by the **NIH Clinical Center**.
- **Licence / terms:** NIH Clinical Center releases the images with **no restrictions on use**; it asks users to
  cite the paper above, acknowledge the NIH Clinical Center and link to the download site above.
- **What was kept:** {n['images']} images of {n['patients']} patients (all images of each chosen patient), chosen
  with a seeded generator to cover the 8 box findings about evenly; {n['boxes']} boxes.
- **Changes:** 8-bit grayscale, downsampled 1024 → 512 (shared copy) → **256×256** (Lanczos); boxes rescaled to
  the stored size.

## kermany-pediatric/

- **Original data set:** D. Kermany, K. Zhang, M. Goldbaum. *Labeled Optical Coherence Tomography (OCT) and Chest
  X-Ray Images for Classification.* Mendeley Data, v2, 2018, DOI 10.17632/rscbjbr9sj.2 —
  https://data.mendeley.com/datasets/rscbjbr9sj/2 (images via GitHub `waliatushar/ai-pneumonia-detection`, commit
  `362d6d1be840461d0f26253972ec86bbc8533772`, already resized to 224×224 there).
- **Cite:** D. S. Kermany, M. Goldbaum, W. Cai, et al. *Identifying Medical Diagnoses and Treatable Diseases by
  Image-Based Deep Learning.* Cell 172(5):1122–1131.e9, 2018.
- **Licence:** **CC BY 4.0** (https://creativecommons.org/licenses/by/4.0/). Attribute the authors above.
- **What was kept:** {k['images']} images of {k['patients']} patients (all images of each chosen patient), balanced
  between normal, bacterial and viral pneumonia with a seeded generator.
- **Changes:** 8-bit grayscale PNG (the source JPEGs are R=G=B), kept at 224×224 (no resampling).

Not for clinical use.
"""


def readme_md(stats: dict) -> str:
    c, n, k = stats["covid-chestxray"], stats["nih-cxr14-bbox"], stats["kermany-pediatric"]
    nih_cols = ", ".join(f"`{x}`" for x in stats["_nih_columns"])
    ker_cols = ", ".join(f"`{x}`" for x in stats["_kermany_columns"])
    return f"""# multichex sample data

Tiny, permissively licensed chest X-ray samples for demos and tests (see `ATTRIBUTION.md`; not for clinical use).
Each folder has the same layout and columns as the corresponding folder of the full shared data, so the same reader
code reads both. Images are 8-bit grayscale PNGs; masks are 0/255 at the image size; box coordinates are pixels in
the stored image (x, y = top-left corner, then w, h). Split patient-wise on the patient id column.
Rebuild with `python scripts/build_sample.py`.

| folder | images | patients | targets |
|---|---|---|---|
| `covid-chestxray/` | {c['images']} (longest side {COVID_MAX_SIDE}) | {c['patients']} | COVID-19 (all positive), lung masks |
| `nih-cxr14-bbox/` | {n['images']} (256×256) | {n['patients']} | 14 NIH labels, {n['boxes']} lesion boxes (8 findings) |
| `kermany-pediatric/` | {k['images']} (224×224) | {k['patients']} | NORMAL / PNEUMONIA, bacteria vs virus |

- `covid-chestxray/`: `images/*.png`, `masks/*.png` (lung mask, same name), `labels.csv` with
  {", ".join(f"`{x}`" for x in COVID_COLUMNS)}. `patientid` is the Hannover patient id.
- `nih-cxr14-bbox/`: `images/<NIH Image Index>.png`, `labels.csv` with {nih_cols};
  `boxes.csv` with `image`, `label`, `x`, `y`, `w`, `h` (box label `Infiltrate` = column `Infiltration`).
- `kermany-pediatric/`: `images/*.png`, `labels.csv` with {ker_cols}.
"""


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO_ROOT / ".." / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "src" / "multichex" / "sample_data")
    ap.add_argument("--seed", type=int, default=20261125)
    args = ap.parse_args(argv)

    shared = args.shared.resolve()
    out = args.out if args.out.is_absolute() else (Path.cwd() / args.out)
    out = out.resolve()
    for name in ("covid-chestxray", "nih-cxr14-bbox", "kermany-pediatric", "hannover-covid19"):
        if not (shared / name).is_dir():
            raise SystemExit(f"missing {shared / name}")
    out.mkdir(parents=True, exist_ok=True)

    # independent generators per folder so one folder's choices never shift another's
    ss = np.random.SeedSequence(args.seed)
    rng_nih, rng_ker = (np.random.default_rng(s) for s in ss.spawn(2))

    stats: dict = {}
    stats["covid-chestxray"] = build_covid(shared, out)
    stats["nih-cxr14-bbox"] = build_nih(shared, out, rng_nih)
    stats["kermany-pediatric"] = build_kermany(shared, out, rng_ker)
    stats["_nih_columns"] = read_csv(out / "nih-cxr14-bbox" / "labels.csv")[0]
    stats["_kermany_columns"] = read_csv(out / "kermany-pediatric" / "labels.csv")[0]

    (out / "ATTRIBUTION.md").write_text(attribution_md(stats, args.seed), encoding="utf-8")
    (out / "README.md").write_text(readme_md(stats), encoding="utf-8")

    print(f"sample data written to {out}")
    for name in ("covid-chestxray", "nih-cxr14-bbox", "kermany-pediatric"):
        s = stats[name]
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    total = dir_bytes(out)
    print(f"  total bytes: {total} ({total / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
