# Copyright (c) fasa_seesaw contributors.
"""
A deterministic held-out split carved from a training dataset, for FASA's adaptation pass.

The reference adapts on LVIS val, the split results are reported on; carving a held-out part of
train avoids that leak. An image's side depends only on (seed, image id), not on load order or
on the number of processes.
"""

import hashlib
import logging

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..errors import ConfigError

__all__ = ["is_heldout", "register_heldout_split", "base_dataset"]

logger = logging.getLogger(__name__)

# split name -> the dataset it was carved from
_BASE = {}


def base_dataset(name: str) -> str:
    """The dataset a split was carved from (itself for any other name)."""
    return _BASE.get(name, name)


def is_heldout(image_id, fraction: float, seed: int) -> bool:
    digest = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _split(name, fraction, seed, keep_heldout):
    dicts = DatasetCatalog.get(name)
    out = [d for d in dicts if is_heldout(d["image_id"], fraction, seed) == keep_heldout]
    if not out:
        side = "held-out" if keep_heldout else "training"
        raise ConfigError(
            f"The {side} part of '{name}' is empty with MODEL.FASA.ADAPT.HELDOUT_FRACTION "
            f"{fraction}; choose a fraction that leaves images on both sides."
        )
    return out


def register_heldout_split(name: str, fraction: float, seed: int):
    """
    Register ``<name>_fasa_fit`` (train minus held-out) and ``<name>_fasa_heldout``; returns
    both names. Metadata (classes, json for evaluation) is copied from ``name``.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"MODEL.FASA.ADAPT.HELDOUT_FRACTION must lie in (0, 1); got {fraction}. "
            "It is the fraction of training images held out for the adaptation pass."
        )
    fit, held = f"{name}_fasa_fit", f"{name}_fasa_heldout"
    for new, keep in ((fit, False), (held, True)):
        _BASE[new] = name
        if new in DatasetCatalog.list():
            continue
        DatasetCatalog.register(
            new, lambda n=name, k=keep: _split(n, fraction, seed, keep_heldout=k)
        )
        meta = {k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k != "name"}
        MetadataCatalog.get(new).set(**meta)
    return fit, held
