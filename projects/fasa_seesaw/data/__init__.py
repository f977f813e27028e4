# Copyright (c) fasa_seesaw contributors.
"""Long-tailed LVIS-format data: the synthetic generator and detectron2 dataset registration."""

from . import datasets  # noqa: F401  (registers datasets)
from .datasets import (
    BUILTIN_DATASETS,
    DATASET_ARG_HELP,
    builtin_dataset_name,
    load_longtail_json,
    metadata_from_categories,
    prepare_datasets,
    register_longtail_lvis,
    register_dataset_args,
    register_lvis_json_dataset,
    validate_lvis_json,
)
from .counts import lvis_frequency
from .synth import (
    QUICKSTART,
    SPECS,
    STUDY,
    SynthSpec,
    dataset_paths,
    default_root,
    ensure_generated,
    generate,
    lvis_equivalent_repeat_threshold,
    spec_categories,
    spec_splits,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_ARG_HELP",
    "QUICKSTART",
    "SPECS",
    "STUDY",
    "SynthSpec",
    "builtin_dataset_name",
    "dataset_paths",
    "default_root",
    "ensure_generated",
    "generate",
    "load_longtail_json",
    "lvis_equivalent_repeat_threshold",
    "lvis_frequency",
    "metadata_from_categories",
    "prepare_datasets",
    "register_longtail_lvis",
    "register_dataset_args",
    "register_lvis_json_dataset",
    "spec_categories",
    "spec_splits",
    "validate_lvis_json",
]
