# Copyright (c) fasa_seesaw contributors.
"""Registration of LVIS-format long-tailed datasets with detectron2.

Importing this module registers the built-in synthetic datasets (see the synth package):

    longtail_synth_quickstart_train, longtail_synth_quickstart_val,
    longtail_synth_study_train, longtail_synth_study_val, longtail_synth_study_test,
    longtail_synth_smoke_train, longtail_synth_smoke_val

(a test split only for specs with num_test_images > 0).

Their metadata (thing_classes, class_image_count, thing_frequency) is available right after
import, computed from the spec alone; the images are generated (once, cached under
synth.default_root()) only when a dataset is first loaded. The names deliberately avoid
"v1": detectron2 treats dataset names containing "v1" as the real LVIS and would look up its
built-in metadata.

Users' own LVIS-format data can be registered with register_lvis_json_dataset(), which validates
the fields that LVIS-style evaluation and repeat-factor sampling rely on up front, instead of
failing deep inside training or evaluation.
"""

import functools
import json
import logging
import os
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import ConfigError
from .counts import lvis_frequency
from .synth import (
    SPECS,
    SynthSpec,
    dataset_paths,
    default_root,
    ensure_generated,
    spec_categories,
    spec_splits,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_ARG_HELP",
    "parse_dataset_arg",
    "register_dataset_args",
    "BUILTIN_DATASETS",
    "builtin_dataset_name",
    "validate_lvis_json",
    "load_longtail_json",
    "metadata_from_categories",
    "register_longtail_lvis",
    "register_lvis_json_dataset",
    "register_builtin_longtail_synth",
    "prepare_datasets",
]

_ADD_FREQUENCY_CMD = "python -m fasa_seesaw.data.add_frequency IN.json OUT.json"
_VALID_FREQUENCIES = ("r", "c", "f")

# name -> (spec name, split); filled by register_builtin_longtail_synth().
BUILTIN_DATASETS: Dict[str, tuple] = {}
# name -> callable that makes the dataset's files exist (e.g. generates them).
_PREPARE: Dict[str, Callable[[], object]] = {}


def builtin_dataset_name(spec_name: str, split: str) -> str:
    """Returns the registered name of a built-in synthetic split, e.g. longtail_synth_study_val."""
    return f"longtail_synth_{spec_name}_{split}"


def _first(ids: Sequence, n: int = 5) -> str:
    """Formats the first n ids of a list for error messages."""
    ids = list(ids)
    return str(ids[:n]) + (f" (and {len(ids) - n} more)" if len(ids) > n else "")


def validate_lvis_json(
    data: Union[dict, str, os.PathLike], json_file: Optional[str] = None
) -> dict:
    """Checks that an LVIS-format json has what LVIS-style training and evaluation need.

    Done up front because the failures otherwise surface late and cryptically: a missing
    "frequency" only breaks the LVIS evaluator after a full training run, and non-contiguous ids
    silently shift classes in detectron2's loader (which maps category_id -> category_id - 1).

    Args:
        data: the loaded json dict, or a path to it.
        json_file: path used in error messages (defaults to `data` when that is a path).

    Returns:
        dict: the loaded json (so callers need not parse it twice).

    Raises:
        ConfigError: (a ValueError) naming the problem and how to fix it.
    """
    if not isinstance(data, dict):
        json_file = json_file or os.fspath(data)
        with open(data, encoding="utf-8") as f:
            data = json.load(f)
    where = f"'{json_file}'" if json_file else "the LVIS json"

    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise ConfigError(f"{where} lacks top-level key(s) {missing}; is it an LVIS/COCO json?")
    categories = data["categories"]
    if not categories:
        raise ConfigError(f"{where} has no categories")

    no_freq = [c.get("id") for c in categories if "frequency" not in c]
    if no_freq:
        raise ConfigError(
            f"{where}: {len(no_freq)} categories have no 'frequency' field (ids "
            f"{_first(no_freq)}). LVIS-style APr/APc/APf and repeat-factor sampling (RFS) need "
            "it. Fix: add 'frequency' r/c/f from the TRAINING image counts (r <= 10, c 11-100, "
            f"f > 100), e.g. with `{_ADD_FREQUENCY_CMD}` (for a val json add "
            "--counts-from TRAIN.json)."
        )
    bad_freq = [c["id"] for c in categories if c["frequency"] not in _VALID_FREQUENCIES]
    if bad_freq:
        raise ConfigError(
            f"{where}: categories {_first(bad_freq)} have a 'frequency' other than 'r'/'c'/'f'. "
            f"Fix: recompute it with `{_ADD_FREQUENCY_CMD} --recompute`."
        )

    ids = [c.get("id") for c in categories]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise ConfigError(
            f"{where}: category ids must be exactly 1..{len(ids)} (contiguous, unique); got "
            f"{_first(sorted(ids, key=str))}. detectron2's LVIS loader and evaluator assume "
            "contiguous ids (contiguous id = category_id - 1). Fix: renumber categories and "
            f"annotations with `{_ADD_FREQUENCY_CMD} --remap-ids`."
        )

    unknown = sorted({a["category_id"] for a in data["annotations"]} - set(ids))
    if unknown:
        raise ConfigError(
            f"{where}: annotations use category ids {_first(unknown)} that are not in "
            "'categories'. Fix the annotations or add the categories."
        )

    no_lists = [
        img.get("id")
        for img in data["images"]
        if "neg_category_ids" not in img or "not_exhaustive_category_ids" not in img
    ]
    if no_lists:
        raise ConfigError(
            f"{where}: images {_first(no_lists)} lack 'neg_category_ids' / "
            "'not_exhaustive_category_ids', which the LVIS evaluator reads. Fix: add them "
            f"(empty lists if unknown) with `{_ADD_FREQUENCY_CMD}`."
        )
    no_path = [img.get("id") for img in data["images"] if not (_file_name(img) or _url(img))]
    if no_path:
        raise ConfigError(
            f"{where}: images {_first(no_path)} have neither 'file_name' nor 'coco_url', so "
            "their files cannot be located. Fix: add 'file_name' relative to the image root."
        )
    return data


def _file_name(img: dict) -> Optional[str]:
    return img.get("file_name") or None


def _url(img: dict) -> Optional[str]:
    # detectron2 splits coco_url into "<split folder>/<file>": it needs at least one "/".
    url = img.get("coco_url") or ""
    return url if "/" in url else None


def _category_counts(data: dict) -> Dict[int, int]:
    """Training image counts per category id, recomputed from the annotations."""
    pairs = {(a["image_id"], a["category_id"]) for a in data["annotations"]}
    counts = {c["id"]: 0 for c in data["categories"]}
    for _, cat in pairs:
        counts[cat] += 1
    return counts


def metadata_from_categories(categories: List[dict]) -> dict:
    """Builds the detectron2 metadata that LVIS-style components read, from category dicts.

    Returns:
        dict with "thing_classes" (names by contiguous id), "class_image_count" (list of
        {"id", "image_count"}, read by detectron2's get_fed_loss_cls_weights) and
        "thing_frequency" ("r"/"c"/"f" per contiguous id).
    """
    cats = sorted(categories, key=lambda c: c["id"])
    return {
        "thing_classes": [c["name"] for c in cats],
        "class_image_count": [{"id": c["id"], "image_count": c["image_count"]} for c in cats],
        "thing_frequency": [c["frequency"] for c in cats],
    }


def _metadata_from_json(data: dict, json_file: str) -> dict:
    """Metadata of a validated json; fills image_count from the annotations if absent."""
    categories = data["categories"]
    if any("image_count" not in c for c in categories):
        logger.warning(
            "%s: categories lack 'image_count'; using counts recomputed from its own annotations "
            "(correct only for a training json)",
            json_file,
        )
        counts = _category_counts(data)
        categories = [
            {**c, "image_count": c.get("image_count", counts[c["id"]])} for c in categories
        ]
    return metadata_from_categories(categories)


def _set_missing_metadata(dataset_name: str, meta: dict) -> None:
    """Sets metadata keys not yet set; warns (instead of asserting) on conflicting values."""
    md = MetadataCatalog.get(dataset_name)
    for key, value in meta.items():
        old = md.get(key)
        if old is None:
            md.set(**{key: value})
        elif old != value:
            logger.warning(
                "Metadata '%s' of dataset '%s' differs from its json (changed since "
                "registration?); keeping the registered value",
                key,
                dataset_name,
            )


def load_longtail_json(
    json_file: str, image_root: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """Loads an LVIS-format json into detectron2 dataset dicts, after validating it.

    Uses detectron2's load_lvis_json without a dataset name (with a name, detectron2 would look up
    the metadata of the real LVIS and fail). Image paths are image_root/<file_name> when an image
    has "file_name"; otherwise detectron2's coco_url-based rule applies (as for real LVIS, where
    image_root is the COCO root with a trailing slash).

    Args:
        json_file: path to the LVIS-format json.
        image_root: directory the images' "file_name" entries are relative to.
        dataset_name: if given, metadata that is not registered yet is set from the json.

    Returns:
        list[dict]: detectron2 dataset dicts, including "neg_category_ids" and
        "not_exhaustive_category_ids".
    """
    from detectron2.data.datasets.lvis import load_lvis_json

    data = validate_lvis_json(json_file)
    if dataset_name is not None:
        _set_missing_metadata(dataset_name, _metadata_from_json(data, json_file))

    images = data["images"]
    if all(_url(img) for img in images):
        dicts = load_lvis_json(json_file, image_root)
    else:
        # detectron2 reads coco_url unconditionally; give it a placeholder via a temporary copy.
        patched = dict(data, images=[dict(img, coco_url=_url(img) or "x/x") for img in images])
        with tempfile.TemporaryDirectory() as tmp:
            tmp_json = os.path.join(tmp, os.path.basename(json_file))
            with open(tmp_json, "w", encoding="utf-8") as f:
                json.dump(patched, f)
            dicts = load_lvis_json(tmp_json, image_root)

    file_names = {img["id"]: _file_name(img) for img in images}
    for record in dicts:
        name = file_names[record["image_id"]]
        if name:
            record["file_name"] = os.path.join(image_root, name)
    return dicts


def _load_registered(
    json_file: str, image_root: str, name: str, prepare: Optional[Callable[[], object]]
) -> List[dict]:
    if prepare is not None:
        prepare()
    return load_longtail_json(json_file, image_root, dataset_name=name)


def register_longtail_lvis(
    name: str,
    json_file: str,
    image_root: str,
    *,
    categories: Optional[List[dict]] = None,
    prepare: Optional[Callable[[], object]] = None,
) -> None:
    """Registers an LVIS-format dataset in DatasetCatalog and MetadataCatalog.

    Metadata is set at registration so that consumers (fed-loss weights, Seesaw/FASA class
    statistics, the LVIS evaluator) can read it without loading the dataset.

    Args:
        name: dataset name; avoid "v1"/"v0.5"/"cocofied", which detectron2 reserves for LVIS.
        json_file: LVIS-format json path (may not exist yet if `prepare` creates it).
        image_root: directory the images' "file_name" entries are relative to.
        categories: category dicts ("id", "name", "frequency", "image_count") to build metadata
            from; if None, they are read from json_file, which must then exist.
        prepare: called before each load, e.g. to generate the data lazily.
    """
    if categories is None:  # read (and validate) the json now
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"Cannot register '{name}': {json_file} does not exist and no categories were given"
            )
        meta = _metadata_from_json(validate_lvis_json(json_file), json_file)
    else:
        meta = metadata_from_categories(categories)
    DatasetCatalog.register(
        name, functools.partial(_load_registered, json_file, image_root, name, prepare)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="lvis", **meta
    )
    if prepare is not None:
        _PREPARE[name] = prepare


def prepare_datasets(dataset_names: Sequence[str]) -> List[str]:
    """Makes the files of lazily generated datasets exist; a no-op for other datasets.

    Call it on one process before building data loaders or evaluators (detectron2's LVIS
    evaluator opens the json at construction), then synchronise the others.

    Returns:
        list[str]: the names that had a preparation step.
    """
    prepared = []
    for name in dataset_names:
        if name in _PREPARE:
            _PREPARE[name]()
            prepared.append(name)
    return prepared


def register_lvis_json_dataset(name: str, json_file: str, image_root: str) -> None:
    """Registers users' own LVIS-format data; the json must exist and is validated first.

    Validation at registration turns a missing 'frequency' or non-contiguous ids into a clear
    error before any training starts (see validate_lvis_json for the checks and their fixes).
    """
    # register_longtail_lvis validates when it reads the categories from the json.
    register_longtail_lvis(name, json_file, image_root)


DATASET_ARG_HELP = (
    "register an LVIS-format dataset before the config is read: NAME=JSON:IMAGE_ROOT, e.g. "
    "my_train=data/train.json:data/images (repeatable; then use NAME in DATASETS.TRAIN/TEST)"
)


def parse_dataset_arg(spec: str):
    """``NAME=JSON:IMAGE_ROOT`` -> (name, json_file, image_root), with a clear error if bad. The
    json path ends at the first ':' (so it cannot contain one)."""
    name, eq, rest = spec.partition("=")
    json_file, colon, image_root = rest.partition(":")
    if not (eq and colon and name and json_file and image_root):
        raise ConfigError(
            f"--dataset {spec!r} is not NAME=JSON:IMAGE_ROOT (e.g. "
            "my_train=data/train.json:data/images)."
        )
    if not os.path.isfile(json_file):
        raise ConfigError(f"--dataset {name}: the json '{json_file}' does not exist.")
    if not os.path.isdir(image_root):
        raise ConfigError(f"--dataset {name}: the image root '{image_root}' is not a directory.")
    return name, json_file, image_root


def register_dataset_args(specs: Sequence[str]) -> List[str]:
    """Registers each ``NAME=JSON:IMAGE_ROOT`` (validated as :func:`register_lvis_json_dataset`
    does); a name registered before with the same files is left as it is. Returns the names."""
    names = []
    for spec in specs or ():
        name, json_file, image_root = parse_dataset_arg(spec)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            same = (meta.get("json_file", None), meta.get("image_root", None)) == (
                json_file,
                image_root,
            )
            if not same:
                raise ConfigError(
                    f"--dataset {name}: a dataset of that name is already registered with other "
                    "files; choose another name."
                )
        else:
            try:
                register_lvis_json_dataset(name, json_file, image_root)
            except ConfigError as e:
                raise ConfigError(f"--dataset {name}: {e}") from None
            except (ValueError, KeyError, TypeError) as e:  # e.g. not json, a missing field
                raise ConfigError(
                    f"--dataset {name}: '{json_file}' is not a readable LVIS-format json "
                    f"({type(e).__name__}: {e})."
                ) from None
        names.append(name)
    return names


def _spec_metadata_categories(spec: SynthSpec) -> List[dict]:
    """Categories of a built-in spec with the fields metadata needs (exact, see spec_categories)."""
    cats = spec_categories(spec)
    # Guard the invariant that makes pre-generation metadata exact.
    assert all(lvis_frequency(c["image_count"]) == c["frequency"] for c in cats)
    return cats


def register_builtin_longtail_synth(root: Optional[str] = None) -> None:
    """Registers the built-in synthetic datasets under `root` (default: default_root()).

    Nothing is generated here; loading a dataset calls ensure_generated() first. The root is
    resolved now, so set $FASA_SEESAW_DATA before importing fasa_seesaw to relocate the data.
    """
    root = default_root() if root is None else root
    for spec_name, spec in SPECS.items():
        paths = dataset_paths(spec, root)
        categories = None
        for split in spec_splits(spec):
            name = builtin_dataset_name(spec_name, split)
            if name in DatasetCatalog:
                continue  # e.g. module reloaded
            categories = categories or _spec_metadata_categories(spec)
            register_longtail_lvis(
                name,
                paths[f"{split}_json"],
                paths[f"{split}_image_root"],
                categories=categories,
                prepare=functools.partial(ensure_generated, spec, root),
            )
            MetadataCatalog.get(name).set(synth_spec=spec_name, synth_spec_hash=spec.spec_hash())
            BUILTIN_DATASETS[name] = (spec_name, split)


register_builtin_longtail_synth()
