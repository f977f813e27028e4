# Copyright (c) fasa_seesaw contributors.
"""
Backbone pretraining on synthetic data with a vocabulary disjoint from the datasets', the way
ImageNet is not LVIS: the study's starting point, as the LVIS configs start from ImageNet.

A ResNet (detectron2's own ``build_resnet_backbone``) learns to name the shape, colour and texture
of one object per 64 px image, drawn by the dataset generator's renderer. The vocabulary (10
shapes, 8 colours, 4 textures) shares none of the datasets' shapes, colours or textures, so no
class of a built-in dataset, rare or not, gets a single example from it. The result is a
detectron2-format checkpoint (``{"model": {"backbone.bottom_up.*": ...}}``) that
``MODEL.WEIGHTS`` loads like an ImageNet one; the BN statistics it holds are what ``FrozenBN``
freezes.

The weights are built on first use and cached under the data root (``default_root()/pretrained``),
keyed by a hash of the recipe, like the generated datasets. A config names them by URL::

    MODEL:
      WEIGHTS: "fasa_seesaw://pretrained/R-18-synth.pth"

and detectron2's checkpointer resolves it through the PathManager handler of
``fasa_seesaw.pretrained_url`` (registered by ``import fasa_seesaw``), training the backbone
(under a file lock, once per machine) if the file does not exist yet::

    python -m fasa_seesaw.pretrain R-18-synth       # build now (or show where it is)
"""

import argparse
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import numpy as np
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple
import torch
import torch.nn.functional as F

from .pretrained_url import PREFIX

logger = logging.getLogger(__name__)

# Bump when a change alters the trained weights of an unchanged recipe (cache key).
PRETRAIN_VERSION = "1"

# The pretraining vocabulary. None of these is a shape, colour or texture of the datasets
# (fasa_seesaw.data.synth.SHAPES / COLOURS / TEXTURES); tests/test_pretrain.py checks it.
PRETRAIN_SHAPES = (
    "semicircle",
    "crescent",
    "trapezoid",
    "parallelogram",
    "kite",
    "chevron",
    "l_shape",
    "t_shape",
    "four_star",
    "octagon",
)
PRETRAIN_COLOURS = {
    "pink": (235, 135, 175),
    "brown": (125, 80, 40),
    "olive": (130, 130, 35),
    "maroon": (125, 25, 50),
    "navy": (25, 35, 105),
    "lime": (165, 225, 45),
    "magenta": (205, 45, 165),
    "white": (240, 240, 240),
}
PRETRAIN_TEXTURES = ("ringed", "grid", "zigzag", "halved")


@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the pretrained weights (equal recipes, equal cache entry).

    Attributes:
        name: the file name under fasa_seesaw://pretrained/ (without ".pth").
        depth: ResNet depth (18 or 34: basic blocks; 50+: bottlenecks).
        res2_out_channels: width of res2 (64 for ResNet-18/34, 256 for 50+).
        image_size: side of the square pretraining images in px.
        num_images: images rendered once and reused every epoch.
        epochs: passes over them.
        batch_size, lr, weight_decay, momentum: SGD with a cosine schedule and 1 warm-up epoch.
        min_object_size, max_object_size: object diameter range in px.
        seed: rendering and initialisation seed.
        threads: torch threads while training (recorded; the cache does not depend on it).
    """

    name: str
    depth: int = 18
    res2_out_channels: int = 64
    image_size: int = 64
    num_images: int = 24000
    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    min_object_size: int = 12
    max_object_size: int = 40
    seed: int = 20241204

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe_hash(self) -> str:
        payload = {
            "version": PRETRAIN_VERSION,
            "recipe": self.to_dict(),
            "vocabulary": [PRETRAIN_SHAPES, PRETRAIN_COLOURS, PRETRAIN_TEXTURES],
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


# The study's starting point (configs/study/Base-Study.yaml).
R18_SYNTH = PretrainRecipe(name="R-18-synth")
# The test suite's: seconds, not minutes.
# 16 steps, so that the BN statistics FrozenBN keeps have settled (momentum 0.1).
R18_SYNTH_TINY = PretrainRecipe(
    name="R-18-synth-tiny", image_size=32, num_images=256, epochs=2, batch_size=32,
    min_object_size=8, max_object_size=20,
)  # fmt: skip

RECIPES: Dict[str, PretrainRecipe] = {r.name: r for r in (R18_SYNTH, R18_SYNTH_TINY)}


class PretrainError(ValueError):
    """An unknown recipe name; printed as one line."""


def recipe_by_name(name: str) -> PretrainRecipe:
    if name not in RECIPES:
        raise PretrainError(
            f"unknown pretrained backbone {name!r}; built-in: {', '.join(RECIPES)} "
            f"(as MODEL.WEIGHTS: {PREFIX}<name>.pth)"
        )
    return RECIPES[name]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def render_images(recipe: PretrainRecipe) -> Tuple[np.ndarray, np.ndarray]:
    """Renders the pretraining set: (N, H, W, 3) uint8 RGB images and (N, 3) labels
    (shape, colour, texture indices). One object per image on the generator's backgrounds."""
    from .data.synth.render import UNIT_SHAPES, _background, _draw, _try_place

    rng = np.random.Generator(np.random.PCG64(recipe.seed))
    size, n = recipe.image_size, recipe.num_images
    colours = np.array(list(PRETRAIN_COLOURS.values()), dtype=np.float64)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.stack(
        [
            rng.integers(0, len(PRETRAIN_SHAPES), n),
            rng.integers(0, len(PRETRAIN_COLOURS), n),
            rng.integers(0, len(PRETRAIN_TEXTURES), n),
        ],
        axis=1,
    )
    max_d = min(recipe.max_object_size, size - 4)
    for i in range(n):
        img = _background(rng, size)
        s, c, t = labels[i]
        placed = None
        while placed is None:
            diameter = rng.uniform(recipe.min_object_size, max_d)
            unit = UNIT_SHAPES[PRETRAIN_SHAPES[s]]
            placed = _try_place(rng, unit, diameter, size, np.zeros((0, 4)))
        poly, angle, _ = placed
        colour = np.clip(colours[c] + rng.integers(-10, 11, size=3), 0, 255)
        _draw(img, poly, angle, diameter, colour, PRETRAIN_TEXTURES[t])
        images[i] = img
    return images, labels


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------


def backbone_cfg(recipe: PretrainRecipe):
    """The detectron2 config of the ResNet the detector builds (BN, trainable, res5 out)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = recipe.depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = recipe.res2_out_channels
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


class _Classifier(torch.nn.Module):
    """detectron2's ResNet, global average pooling and one linear head per attribute."""

    def __init__(self, recipe: PretrainRecipe):
        super().__init__()
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone import build_resnet_backbone

        self.body = build_resnet_backbone(backbone_cfg(recipe), ShapeSpec(channels=3))
        width = self.body.output_shape()["res5"].channels
        sizes = (len(PRETRAIN_SHAPES), len(PRETRAIN_COLOURS), len(PRETRAIN_TEXTURES))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, k) for k in sizes)

    def forward(self, x):
        f = self.body(x)["res5"].mean(dim=(2, 3))
        return [h(f) for h in self.heads]


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 RGB (N, H, W, 3) -> float BGR (N, 3, H, W) normalised as detectron2's defaults
    (PIXEL_MEAN / PIXEL_STD of the configs, BGR channel order)."""
    x = torch.from_numpy(images[..., ::-1].copy()).permute(0, 3, 1, 2).float()
    mean = torch.tensor([103.530, 116.280, 123.675]).view(1, 3, 1, 1)
    std = torch.tensor([1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    return (x - mean) / std


def pretrain(recipe: PretrainRecipe, log_every: int = 50) -> dict:
    """Trains the backbone; returns {"model": detectron2 state dict, "pretrain": record}."""
    t0 = time.perf_counter()
    images, labels = render_images(recipe)
    held = max(1, len(images) // 20)  # the last 5%: accuracy of the finished backbone
    train_x, train_y = images[:-held], torch.from_numpy(labels[:-held])
    test_x, test_y = images[-held:], torch.from_numpy(labels[-held:])
    render_s = time.perf_counter() - t0

    torch.manual_seed(recipe.seed)
    model = _Classifier(recipe)
    params_bn = [p for n, p in model.named_parameters() if ".norm." in n or "bias" in n]
    params_w = [p for n, p in model.named_parameters() if not (".norm." in n or "bias" in n)]
    opt = torch.optim.SGD(
        [{"params": params_w, "weight_decay": recipe.weight_decay}, {"params": params_bn}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=0.0,
    )
    steps_per_epoch = math.ceil(len(train_x) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warm = min(steps_per_epoch, total)
    gen = torch.Generator().manual_seed(recipe.seed)
    step, t1 = 0, time.perf_counter()
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size].numpy()
            batch = train_x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = _to_input(batch)
            x[flip] = x[flip].flip(-1)
            lr = recipe.lr * (
                (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * step / total))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(x)
            y = train_y[idx]
            loss = sum(F.cross_entropy(z, y[:, k]) for k, z in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if log_every and (step % log_every == 0 or step == total):
                logger.info(
                    "pretrain %s: step %d/%d (epoch %d), loss %.3f, lr %.4f, %.1f s",
                    recipe.name, step, total, epoch + 1, loss.item(), lr,
                    time.perf_counter() - t1,
                )  # fmt: skip
    train_s = time.perf_counter() - t1
    accuracy = evaluate(model, test_x, test_y)
    state = {
        "backbone.bottom_up." + k: v.detach().clone()
        for k, v in model.body.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    record = {
        "recipe": recipe.to_dict(),
        "recipe_hash": recipe.recipe_hash(),
        "vocabulary": {
            "shapes": list(PRETRAIN_SHAPES),
            "colours": list(PRETRAIN_COLOURS),
            "textures": list(PRETRAIN_TEXTURES),
        },
        "heldout_accuracy": accuracy,
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
    return {"model": state, "__author__": "fasa_seesaw.pretrain", "pretrain": record}


@torch.no_grad()
def evaluate(model, images, labels, batch_size=256) -> Dict[str, float]:
    """Held-out accuracy per attribute, with BN in inference mode (as FrozenBN uses it)."""
    model.eval()
    correct = torch.zeros(3)
    for b in range(0, len(images), batch_size):
        logits = model(_to_input(images[b : b + batch_size]))
        y = labels[b : b + batch_size]
        correct += torch.stack([(z.argmax(1) == y[:, k]).sum() for k, z in enumerate(logits)])
    model.train()
    acc = (correct / max(len(images), 1)).tolist()
    return {"shape": round(acc[0], 4), "colour": round(acc[1], 4), "texture": round(acc[2], 4)}


# ---------------------------------------------------------------------------------------------
# The cache and the URL handler
# ---------------------------------------------------------------------------------------------


def cache_dir(root: Optional[str] = None) -> str:
    from .data.synth import default_root

    return os.path.join(default_root() if root is None else root, "pretrained")


def weights_path(recipe: PretrainRecipe, root: Optional[str] = None) -> str:
    return os.path.join(cache_dir(root), f"{recipe.name}-{recipe.recipe_hash()[:12]}.pth")


def ensure_pretrained(recipe: PretrainRecipe, root: Optional[str] = None) -> str:
    """The cached weights of `recipe`, trained first if missing (once: other processes wait on a
    file lock and reuse the file). Returns the path."""
    path = weights_path(recipe, root)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.isfile(path):  # built by another process while this one waited
                return path
            logger.info("Pretraining backbone %s (once; cached at %s)", recipe.name, path)
            ckpt = pretrain(recipe)
            tmp = f"{path}.tmp-{os.getpid()}"
            torch.save(ckpt, tmp)
            os.replace(tmp, path)  # readers never see a half-written file
            with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as f:
                json.dump(ckpt["pretrain"], f, indent=2)
            rec = ckpt["pretrain"]
            logger.info(
                "Pretrained %s in %.0f s (render %.0f s): held-out accuracy %s",
                recipe.name, rec["train_s"] + rec["render_s"], rec["render_s"],
                rec["heldout_accuracy"],
            )  # fmt: skip
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def pretrain_record(recipe: PretrainRecipe, root: Optional[str] = None) -> Optional[dict]:
    """The json record (accuracy, timings) of cached weights, or None if not built yet."""
    path = os.path.splitext(weights_path(recipe, root))[0] + ".json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def recipe_from_url(url: str) -> Optional[PretrainRecipe]:
    """The recipe a fasa_seesaw://pretrained/<name>.pth URL names, or None for other paths."""
    if not url.startswith(PREFIX):
        return None
    name = url[len(PREFIX) :]
    if name.endswith(".pth"):
        name = name[: -len(".pth")]
    return recipe_by_name(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build (once) or locate a pretrained backbone.")
    ap.add_argument("name", nargs="?", default=R18_SYNTH.name, help=", ".join(RECIPES))
    ap.add_argument("--root", default=None, help="data root (default: the datasets')")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        recipe = recipe_by_name(args.name)
    except PretrainError as e:
        raise SystemExit(f"error: {e}") from None
    path = ensure_pretrained(recipe, args.root)
    print(json.dumps({"path": path, **(pretrain_record(recipe, args.root) or {})}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
