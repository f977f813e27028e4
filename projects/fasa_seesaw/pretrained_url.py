# Copyright (c) fasa_seesaw contributors.
"""
``fasa_seesaw://pretrained/<name>.pth``: MODEL.WEIGHTS URLs of the synthetic-pretrained backbones
(fasa_seesaw.pretrain), resolved by detectron2's PathManager to the cached file, which is built
on first use. ``import fasa_seesaw`` registers the handler; the pretraining code is imported only
when a URL is resolved.
"""

from detectron2.utils.file_io import PathHandler, PathManager

PREFIX = "fasa_seesaw://pretrained/"


class PretrainedHandler(PathHandler):
    """Resolves fasa_seesaw://pretrained/<name>.pth to the cached file, building it if needed."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path, **kwargs):
        from .pretrain import ensure_pretrained, recipe_from_url

        return ensure_pretrained(recipe_from_url(path))

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)

    def _isfile(self, path, **kwargs):
        from .pretrain import recipe_from_url

        return recipe_from_url(path) is not None


def register_handler() -> None:
    """Registers PretrainedHandler with detectron2's PathManager (idempotent)."""
    if PREFIX not in getattr(PathManager, "_path_handlers", {}):
        PathManager.register_handler(PretrainedHandler())
