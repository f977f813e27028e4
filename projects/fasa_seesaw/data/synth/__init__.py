# Copyright (c) fasa_seesaw contributors.
"""Deterministic generator of a small long-tailed instance-segmentation dataset in LVIS v1 format.

Real LVIS v1 is too large to iterate on quickly, but the methods studied in this project
(Seesaw loss, FASA feature augmentation, repeat-factor sampling) only make sense under a genuine
long tail with LVIS's rare/common/frequent split. This module draws a synthetic dataset whose
per-class TRAINING image counts copy the LVIS v1 long tail (rare and common classes keep their
real LVIS image counts, frequent counts are compressed log-linearly), and writes it in the exact
LVIS v1 json format, so that detectron2's LVIS loader, RFS sampler and LVIS evaluator (APr/APc/APf)
work on it unchanged.

Each class is a (shape, colour, texture) triple. Several classes deliberately share two of the
three attributes or use close hues, so -- as on LVIS -- localisation is easy and classification
of the tail is the hard part. Objects never overlap, so every polygon is exactly its instance
mask.

The package: ``spec`` (classes, sizes, paths), ``render`` (drawing), ``generate`` (splits,
json, the on-disk cache). Typical use::

    from fasa_seesaw.data.synth import QUICKSTART, ensure_generated, default_root
    paths = ensure_generated(QUICKSTART, default_root())
"""

from .generate import ensure_generated, generate, main
from .spec import (
    COLOURS,
    GENERATOR_VERSION,
    QUICKSTART,
    SHAPES,
    SMOKE,
    SPECS,
    STUDY,
    TEXTURES,
    SynthSpec,
    dataset_paths,
    default_root,
    lvis_equivalent_repeat_threshold,
    spec_categories,
    spec_splits,
)

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "QUICKSTART",
    "SHAPES",
    "SMOKE",
    "SPECS",
    "STUDY",
    "TEXTURES",
    "SynthSpec",
    "dataset_paths",
    "default_root",
    "ensure_generated",
    "generate",
    "lvis_equivalent_repeat_threshold",
    "main",
    "spec_categories",
    "spec_splits",
]
