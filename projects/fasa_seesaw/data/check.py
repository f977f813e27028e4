# Copyright (c) fasa_seesaw contributors.
"""
Every image file of a dataset, opened and decoded before a long run (``train_net.py
--check-data``): a missing or corrupt file otherwise stops training when the sampler first
reaches it, possibly hours in.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog

__all__ = ["check_data", "check_image_files", "format_report"]


def _problem(d: dict):
    from PIL import Image, ImageOps

    path = d["file_name"]
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as im:
            im.load()  # decodes: a truncated file fails here
            size = ImageOps.exif_transpose(im).size  # as detectron2's read_image orients it
    except Exception as e:  # PIL raises many kinds for a bad file
        return f"unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    want = (d.get("width"), d.get("height"))
    if None not in want and tuple(size) != want:  # detectron2's check_image_size refuses it
        return f"{size[0]}x{size[1]} pixels, the json says {want[0]}x{want[1]}"
    return None


def check_image_files(names: Sequence[str], threads: int = 0) -> Dict[str, Tuple[int, List]]:
    """Per dataset: (number of images, [(file, problem), ...]) for every image that is missing,
    does not decode, or has another size than its json entry."""
    threads = threads or os.cpu_count() or 1
    report = {}
    for name in names:
        dicts = DatasetCatalog.get(name)
        with ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
            problems = list(pool.map(_problem, dicts))
        bad = [(d["file_name"], p) for d, p in zip(dicts, problems) if p]
        report[name] = (len(dicts), bad)
    return report


def format_report(report: Dict[str, Tuple[int, List]], shown: int = 10) -> str:
    lines = []
    for name, (total, bad) in report.items():
        lines.append(f"{name}: {total - len(bad)} of {total} images are readable")
        for path, problem in bad[:shown]:
            lines.append(f"  {path}: {problem}")
        if len(bad) > shown:
            lines.append(f"  ... and {len(bad) - shown} more")
    return "\n".join(lines)


def check_data(cfg) -> int:
    """``train_net.py --check-data``: every image of DATASETS.TRAIN and DATASETS.TEST (generated
    first if built in); prints the report, returns 0 when all are good and 1 otherwise."""
    from .datasets import prepare_datasets
    from .heldout import base_dataset

    names = list(dict.fromkeys(base_dataset(n) for n in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST))
    prepare_datasets(names)
    report = check_image_files(names)
    print(format_report(report))
    return 1 if any(bad for _, bad in report.values()) else 0
