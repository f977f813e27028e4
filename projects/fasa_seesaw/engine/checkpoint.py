# Copyright (c) fasa_seesaw contributors.
"""
Checkpoints that survive a crash, and loading that says what is wrong.

- :class:`CrashSafeCheckpointer` writes every checkpoint, the final one included, to a temporary
  name and renames it into place, then rewrites ``last_checkpoint`` the same way: a kill at any
  moment leaves the previous complete files, never a truncated one under a name that is read.
- :func:`load_for_eval` refuses weights that do not fit the model (a head of another shape, a
  missing head) or no weights at all, where detectron2 would skip them with a warning and
  evaluate a partly random model.
- :func:`check_resume_files` reads ``last_checkpoint`` before a resume and turns an empty or
  dangling one into a message with the fix.
"""

import errno
import importlib
import logging
import os
import pickle
import re
import tempfile
import zipfile
from typing import List, Optional
from urllib.parse import urlparse
import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..errors import ConfigError

__all__ = [
    "CheckpointError",
    "CrashSafeCheckpointer",
    "check_resume_files",
    "check_weights_file",
    "final_iteration",
    "load_for_eval",
    "training_state_keys",
]

logger = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read, written or used; the message says which and the fix."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(f, write) -> None:
    write(f)
    f.flush()
    os.fsync(f.fileno())


def atomic_write(path: str, write) -> None:
    """
    ``write(f)`` into ``path + ".tmp"``, flushed to disk, then renamed over ``path``: readers
    see the old file or the new one, never part of one. The temporary file is removed on error.
    """
    tmp = path + _TMP_SUFFIX
    try:
        with open(tmp, "wb") as f:
            _write_synced(f, write)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def exclusive_write(path: str, write) -> None:
    """
    ``write(f)`` into a fresh temporary file beside ``path``, flushed to disk, then linked to
    ``path`` only if nothing is there (FileExistsError otherwise): an existing file is never
    replaced, even one created while ``write`` ran. The temporary file is always removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=_TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_synced(f, write)
        os.link(tmp, path)
    finally:
        os.remove(tmp)
    _fsync_dir(folder)


def is_checkpoint_file(path: str) -> bool:
    """Whether ``path`` looks like a checkpoint, without loading it: a zip archive as torch.save
    writes, or a pickle (a legacy torch file or a detectron2 .pkl)."""
    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"
    return zipfile.is_zipfile(path) or pickled


def _is_disk_full(e: Optional[BaseException]) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain: torch.save's zip writer reports a failed write as a
    RuntimeError of its own, and the file's close then raises the OSError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


class CrashSafeCheckpointer(DetectionCheckpointer):
    """
    detectron2's DetectionCheckpointer with atomic saves (see the module docstring), readable
    errors for files that are not checkpoints, and the incompatible keys of the last load kept
    in ``incompatible``.
    """

    incompatible = None

    @classmethod
    def replacing(cls, checkpointer: DetectionCheckpointer) -> "CrashSafeCheckpointer":
        """The same model, folder and checkpointables as ``checkpointer``."""
        return cls(
            checkpointer.model,
            checkpointer.save_dir,
            save_to_disk=checkpointer.save_to_disk,
            **checkpointer.checkpointables,
        )

    def _local(self) -> bool:
        return bool(self.save_dir) and os.path.isdir(self.save_dir)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._local():
            logger.warning("%s is not a local folder: checkpoints are not atomic.", self.save_dir)
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        try:
            atomic_write(path, lambda f: torch.save(data, f))
        except (OSError, RuntimeError) as e:
            if _is_disk_full(e):
                raise CheckpointError(
                    f"could not write {path}: the disk is full. Nothing was overwritten: the "
                    "checkpoints already in OUTPUT_DIR are intact. Free space (or move "
                    "OUTPUT_DIR to a larger disk) and continue with --resume."
                ) from None
            raise CheckpointError(f"could not write {path}: {e}") from None
        try:
            self.tag_last_checkpoint(basename)
        except (OSError, RuntimeError) as e:
            why = "the disk is full" if _is_disk_full(e) else str(e)
            raise CheckpointError(
                f"{path} was written, but last_checkpoint could not be updated ({why}); it still "
                "names the checkpoint before, which is intact. Free space (or move OUTPUT_DIR to "
                "a larger disk) and continue with --resume."
            ) from None

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def load(self, path, *args, **kwargs):
        local = urlparse(path)._replace(query="").geturl() if path else path  # ?matching_...
        if path and "://" not in local and not os.path.isfile(local):
            raise CheckpointError(
                f"the checkpoint {path!r} does not exist. Check MODEL.WEIGHTS (or the file "
                "'last_checkpoint' names, when resuming)."
            )
        return super().load(path, *args, **kwargs)

    def _torch_load(self, f):
        try:
            return super()._torch_load(f)
        except pickle.UnpicklingError as e:
            if _refuses_an_object(e, zipped=zipfile.is_zipfile(f)):
                raise  # a whole checkpoint with objects weights_only refuses: the caller decides
            error = e
        except Exception as e:  # noqa: B902  (EOF, struct, index errors...: a damaged file)
            error = e
        size = os.path.getsize(f) if os.path.isfile(f) else 0
        why = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(
            f"{f!r} ({size} bytes) is not a readable checkpoint: {why}. "
            "It is truncated, damaged or not a .pth file; use a complete checkpoint "
            "(e.g. the previous model_XXXXXXX.pth of the run)."
        )

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _refuses_an_object(e: pickle.UnpicklingError, zipped: bool) -> bool:
    """
    Whether weights_only refused a class or function the file really names (a checkpoint that
    holds Python objects), rather than tripping on a damaged file. A zip checkpoint is read
    whole, so any refused global is real; a legacy (pickle) file cut short names globals that
    do not exist ("torch._utils._reb"). Names without a module are builtins.
    """
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if not found:
        return False
    if zipped:
        return True
    module, _, attr = found.group(1).rpartition(".")
    try:
        return hasattr(importlib.import_module(module or "builtins"), attr)
    except Exception:  # noqa: B902  (not importable: a name cut short)
        return False


def training_state_keys(model: torch.nn.Module) -> List[str]:
    """
    State-dict keys of state that only training reads (FASA's bank and probabilities, the
    classification loss's counts): a checkpoint without them still evaluates correctly.
    """
    from ..modeling.fasa import FASA

    keys = []
    for name, module in model.named_modules():
        if isinstance(module, FASA) or name.endswith("cls_loss"):
            keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys


def _describe_fit(model, incompatible) -> Optional[str]:
    """A message for weights that leave part of the model as it was built, or whose dual-head
    classifier the model has no place for, else None."""
    from ..modeling.dual_head import is_dual_head_key

    dual = [k for k in incompatible.unexpected_keys if is_dual_head_key(k)]
    if dual:
        return (
            f"  the checkpoint holds a dual-head classifier ({dual[0]}, ...) that this model "
            "lacks: evaluate it with MODEL.ROI_BOX_HEAD.DUAL_HEAD.ENABLED True (its "
            "config.yaml), or only its first classifier would be evaluated."
        )
    training = set(training_state_keys(model))
    shapes = [s for s in incompatible.incorrect_shapes if s[0] not in training]
    # fvcore drops the tensors of another shape before loading, so they are "missing" too.
    other_shape = {key for key, _, _ in shapes}
    missing = [k for k in incompatible.missing_keys if k not in training | other_shape]
    if not shapes and not missing:
        return None
    lines = []
    for key, ckpt_shape, model_shape in shapes[:8]:
        lines.append(f"  {key}: checkpoint {tuple(ckpt_shape)}, model {tuple(model_shape)}")
    if len(shapes) > 8:
        lines.append(f"  ... and {len(shapes) - 8} more of another shape")
    if missing:
        shown = ", ".join(missing[:6]) + (
            f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        )
        lines.append(f"  missing from the checkpoint: {shown}")
    return "\n".join(lines)


def _untrained_error() -> CheckpointError:
    return CheckpointError(
        "MODEL.WEIGHTS is empty: evaluation would run an untrained model. Pass the trained "
        "weights (e.g. MODEL.WEIGHTS output/model_final.pth), or --eval-untrained if an "
        "untrained model is meant."
    )


def check_weights_file(weights: str, *, allow_untrained: bool = False) -> None:
    """
    Before any process starts: the weights to evaluate are named, exist and look like a
    checkpoint (a zip archive as torch.save writes, a legacy pickle, or a detectron2 .pkl),
    without loading them. Whether they fit the model is checked when they load.
    """
    if not weights:
        if allow_untrained:
            return
        raise _untrained_error()
    local = urlparse(weights)._replace(query="").geturl()
    if "://" in local:
        return  # a URL: fetched (and checked) when it loads
    if not os.path.isfile(local):
        raise CheckpointError(f"the checkpoint {weights!r} (MODEL.WEIGHTS) does not exist.")
    if not is_checkpoint_file(local):
        raise CheckpointError(
            f"{weights!r} ({os.path.getsize(local)} bytes; MODEL.WEIGHTS) is not a readable "
            "checkpoint: it is truncated, damaged or not a .pth/.pkl file; use a complete one."
        )


def load_for_eval(
    model, weights: str, *, allow_untrained: bool = False, allow_pickle: bool = False
) -> None:
    """
    Load ``weights`` into ``model`` for evaluation, refusing (CheckpointError) weights whose box
    predictor, mask predictor, class count or any other part does not fit the config, and an
    empty ``weights`` unless ``allow_untrained``. ``allow_pickle``: a file torch.load's
    weights_only refuses (older checkpoints of this project kept numpy arrays in their trainer
    state) is read with full unpickling; only for trusted files.
    """
    if not weights:
        if allow_untrained:
            logger.warning("MODEL.WEIGHTS is empty: evaluating an untrained model, as asked.")
            return
        raise _untrained_error()
    checkpointer = CrashSafeCheckpointer(model)
    try:
        checkpointer.load(weights, checkpointables=[])
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise CheckpointError(
                f"{weights!r} holds Python objects that torch.load(weights_only=True) refuses "
                f"({str(e).splitlines()[0]}). Load it only if it comes from a trusted source."
            ) from None
        logger.info("%s needs weights_only=False (numpy in its trainer state)", weights)
        local = checkpointer.path_manager.get_local_path(weights)
        checkpointer._load_model(torch.load(local, map_location="cpu", weights_only=False))
    problem = _describe_fit(model, checkpointer.incompatible)
    if problem:
        raise CheckpointError(
            f"MODEL.WEIGHTS {weights!r} does not fit the model this config builds:\n{problem}\n"
            "Evaluate it with the config it was trained with (its OUTPUT_DIR/config.yaml): the "
            "loss (Seesaw's C + 2 outputs or CE's C + 1), MODEL.ROI_HEADS.NUM_CLASSES, the ROI "
            "head and the mask head must match."
        )


def final_iteration(path: str) -> Optional[int]:
    """The iteration a complete checkpoint at ``path`` was written at; None if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return int(ckpt["trainer"]["iteration"])
    except Exception:  # missing, truncated, not ours: all mean "not a usable final checkpoint"
        return None


def check_resume_files(output_dir: str, clean: bool = True) -> Optional[str]:
    """
    Before a resume: the path ``last_checkpoint`` names, checked to exist (None without a
    ``last_checkpoint``). Leftover temporary files of a save that was killed are removed when
    ``clean`` (the main process does it).
    """
    if not os.path.isdir(output_dir):
        return None
    for name in os.listdir(output_dir) if clean else ():
        if name.endswith(".pth" + _TMP_SUFFIX) or name == "last_checkpoint" + _TMP_SUFFIX:
            logger.info("Removing %s, left by a save that did not finish.", name)
            os.remove(os.path.join(output_dir, name))
    tag = os.path.join(output_dir, "last_checkpoint")
    if not os.path.exists(tag):
        return None
    with open(tag) as f:
        name = f.read().strip()
    found = sorted(n for n in os.listdir(output_dir) if n.endswith(".pth"))
    fix = (
        f"Write the name of a complete checkpoint of this run into {tag} (found: "
        f"{', '.join(found) or 'none'}), or start again in another OUTPUT_DIR."
    )
    if not name:
        raise CheckpointError(f"{tag} is empty, so --resume does not know where to go on. {fix}")
    if not os.path.isfile(os.path.join(output_dir, name)):
        raise CheckpointError(f"{tag} names {name!r}, which is not in {output_dir}. {fix}")
    return os.path.join(output_dir, name)
