# Copyright (c) fasa_seesaw contributors.
"""The synthetic backbone pretraining: a vocabulary disjoint from the datasets', deterministic
rendering, a detectron2-format checkpoint that MODEL.WEIGHTS loads, built once and cached."""

import hashlib
import numpy as np
import os
import pytest
import torch

from fasa_seesaw import pretrain as pt
from fasa_seesaw.data.synth import COLOURS, SHAPES, STUDY, TEXTURES, spec_categories

TINY = pt.R18_SYNTH_TINY
TINY_URL = pt.PREFIX + TINY.name + ".pth"


def test_vocabulary_shares_nothing_with_the_datasets():
    assert not set(pt.PRETRAIN_SHAPES) & set(SHAPES)
    assert not set(pt.PRETRAIN_COLOURS) & set(COLOURS)
    assert not set(pt.PRETRAIN_TEXTURES) & set(TEXTURES)
    # No pretraining colour is a dataset colour under another name: every RGB pair differs by
    # more than the generator's per-instance jitter (+-10 per channel) allows to overlap.
    for rgb in pt.PRETRAIN_COLOURS.values():
        for other in COLOURS.values():
            assert np.abs(np.subtract(rgb, other)).max() > 20, (rgb, other)
    # Hence no class of the study (rare ones included) can appear in a pretraining image.
    for c in spec_categories(STUDY):
        assert c["shape"] not in pt.PRETRAIN_SHAPES and c["colour"] not in pt.PRETRAIN_COLOURS


def test_the_new_shapes_and_textures_draw_what_they_say():
    from fasa_seesaw.data.synth.render import UNIT_SHAPES, _texture_mask

    for name in pt.PRETRAIN_SHAPES:
        poly = UNIT_SHAPES[name]
        x, y = poly[:, 0], poly[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        assert 0.5 < area < 3.2, name  # a proper, non-degenerate polygon within [-1, 1]^2
        assert np.abs(poly).max() <= 1.0 + 1e-9, name
    u, v = np.meshgrid(np.linspace(-10, 10, 101), np.linspace(-10, 10, 101))
    masks = {t: _texture_mask(t, u, v, period=5.0) for t in pt.PRETRAIN_TEXTURES + TEXTURES}
    for t in pt.PRETRAIN_TEXTURES:
        assert 0.15 < masks[t].mean() < 0.85, t  # two tones, not one
        for other in TEXTURES:
            assert (masks[t] != masks[other]).mean() > 0.1, (t, other)
    # The halved texture splits along the object's own axis.
    assert masks["halved"][:, 51:].all() and not masks["halved"][:, :50].any()


def test_rendering_is_deterministic_and_labels_match_the_recipe():
    a_img, a_lab = pt.render_images(TINY)
    b_img, b_lab = pt.render_images(TINY)
    assert a_img.shape == (TINY.num_images, TINY.image_size, TINY.image_size, 3)
    assert hashlib.sha1(a_img.tobytes()).digest() == hashlib.sha1(b_img.tobytes()).digest()
    assert (a_lab == b_lab).all()
    assert a_lab.max(0).tolist() < [len(pt.PRETRAIN_SHAPES), len(pt.PRETRAIN_COLOURS), 4]
    other = pt.PretrainRecipe(**{**TINY.to_dict(), "seed": TINY.seed + 1})
    assert not np.array_equal(pt.render_images(other)[0], a_img)
    assert other.recipe_hash() != TINY.recipe_hash()


def _study_model(weights):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from fasa_seesaw import add_fasa_seesaw_config
    from fasa_seesaw.config import merge_config

    cfg = get_cfg()
    add_fasa_seesaw_config(cfg)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    merge_config(
        cfg,
        os.path.join(root, "configs", "study", "mask_rcnn_R_18_FPN_ce_study.yaml"),
        ["MODEL.WEIGHTS", weights],
    )
    return cfg, build_model(cfg)


def test_checkpoint_loads_through_model_weights_into_the_study_backbone(monkeypatch):
    from detectron2.checkpoint import DetectionCheckpointer

    cfg, model = _study_model(TINY_URL)
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    path = pt.ensure_pretrained(TINY)
    assert path.startswith(os.environ["FASA_SEESAW_DATA"])
    ckpt = torch.load(path, map_location="cpu")
    state = ckpt["model"]
    bottom_up = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    # Exactly the backbone's tensors, by name and shape (FrozenBN buffers from BN statistics).
    assert set(state) == set(bottom_up)
    for k, v in state.items():
        assert v.shape == bottom_up[k].shape, k

    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    # Nothing else came from the file: the FPN and heads keep their initialisation.
    assert not any(k.startswith(("backbone.fpn", "roi_heads")) for k in state)

    # Built once: a second use reads the cache and trains nothing.
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("trained again"))
    assert pt.ensure_pretrained(TINY) == path
    record = pt.pretrain_record(TINY)
    assert record["recipe_hash"] == TINY.recipe_hash() and record["train_s"] >= 0
    assert set(record["heldout_accuracy"]) == {"shape", "colour", "texture"}


def test_unknown_name_is_one_clear_error():
    from detectron2.utils.file_io import PathManager

    with pytest.raises(pt.PretrainError, match="unknown pretrained backbone 'R-99'.*R-18-synth"):
        PathManager.get_local_path(pt.PREFIX + "R-99.pth")
    with pytest.raises(SystemExit, match="unknown pretrained backbone"):
        pt.main(["R-99"])
