# Copyright (c) fasa_seesaw contributors.
"""
A training data stream that a resumed run can re-enter exactly where it stopped.

detectron2's training loader restarts its sampler and its augmentation RNGs on ``--resume``, so a
resumed run sees other images, in another order, with other flips than the run it continues.
Here the k-th sample of a process's stream is a pure function of (seed, rank, k):

- the image index comes from detectron2's own sampler (TrainingSampler or
  RepeatFactorTrainingSampler), replayed as integers from the start and skipped to the resume
  position (cheap: no image is loaded);
- the augmentation of sample k runs under numpy/python RNGs seeded from (seed, rank, k);
- data-loader workers take positions round-robin (chunks of one), which the loader yields back
  in order, so the stream order does not depend on the number of workers.

Resuming at iteration i then starts at position i * (images per process). With
``DATALOADER.ASPECT_RATIO_GROUPING`` and images of both orientations, the groups are replayed
from the images' sizes in the json (:meth:`PositionedSampler.resume_at_batch`), so the images
that sat in half-filled groups at the stop come first again. This is exact as long as the mapper
accepts every image it is given (detectron2's DatasetMapper does; a mapper that rejects one gets
a deterministic substitute whose orientation the replay does not see).
"""

import contextlib
import numpy as np
import os
import random
from typing import Optional, Sequence
from torch.utils import data as torchdata

from detectron2.data.common import DatasetFromList, ToIterableDataset
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.utils import comm

from ..errors import DataError

__all__ = ["PositionedSampler", "PositionedMapDataset", "resumable_training_dataset"]


class PositionedSampler(torchdata.Sampler):
    """
    Yields (position, index) from a detectron2 training sampler, from position ``start`` on,
    after the earlier positions in ``prefix`` (the images that sat in half-filled aspect-ratio
    groups when the run stopped).
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self.start = 0
        self.prefix = ()

    def __iter__(self):
        pending = frozenset(self.prefix)
        for position, index in enumerate(self.sampler):
            if position >= self.start or position in pending:
                yield position, index

    def resume_at_batch(self, batches: int, batch_size: int, wide: Optional[Sequence[bool]] = None):
        """
        Continue the stream after ``batches`` batches of ``batch_size`` images. Without ``wide``
        every batch took the next images. With ``wide`` (per dataset index: width > height), the
        batches were formed as detectron2's AspectRatioGroupedDataset forms them, one group per
        orientation: the grouping is replayed from the image indices alone (no image is loaded),
        and the images left in half-filled groups are delivered again first, in their order, so
        that the groups fill as they would have.
        """
        self.start, self.prefix = batches * batch_size, ()
        if wide is None or batches == 0:
            return
        groups, done = ([], []), 0
        for position, index in enumerate(self.sampler):
            group = groups[0 if wide[index] else 1]
            group.append(position)
            if len(group) == batch_size:
                del group[:]
                done += 1
                if done == batches:
                    self.start, self.prefix = position + 1, tuple(sorted(groups[0] + groups[1]))
                    return


@contextlib.contextmanager
def _seeded(seed: int):
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class PositionedMapDataset(torchdata.Dataset):
    """Maps (position, index) to ``mapper(dicts[index])`` under RNGs seeded by the position."""

    def __init__(self, dataset_dicts, mapper, seed: int, rank: int, names=()):
        self._dicts = DatasetFromList(dataset_dicts, copy=True)
        self._mapper = mapper
        self._seed = int(seed) % (2**31)
        self._rank = rank
        self._names = tuple(names)

    def __len__(self):
        return len(self._dicts)

    def _sample_seed(self, position: int, attempt: int) -> int:
        return hash((self._seed, self._rank, position, attempt)) % (2**32)

    def __getitem__(self, key):
        position, index = key
        for attempt in range(8):
            # Integer tuples hash deterministically (no PYTHONHASHSEED dependence).
            with _seeded(self._sample_seed(position, attempt)):
                d = self._dicts[index]
                try:
                    out = self._mapper(d)
                except (OSError, SizeMismatchError) as e:  # missing, corrupt or of another size
                    raise unreadable_image_error(self._dicts, d, e, self._names) from None
            if out is not None:
                return out
            # The mapper rejected the sample (e.g. no annotation left): a deterministic substitute.
            index = (index + 1) % len(self._dicts)
        raise RuntimeError(f"The data mapper rejected 8 samples in a row near index {index}.")


def unreadable_image_error(dicts, d: dict, error: Exception, names=()) -> DataError:
    """One message for an image file that training could not read, with the number of the
    dataset's files that are missing (a cheap check of every path)."""
    missing = sum(1 for x in dicts if not os.path.isfile(x["file_name"]))
    where = f"DATASETS.TRAIN {tuple(names)}" if names else "the training data"
    why = (str(error).splitlines() or [type(error).__name__])[0]
    return DataError(
        f"training image '{d['file_name']}' could not be read ({why}). In {where}, {missing} of "
        f"{len(dicts)} image files are missing (corrupt ones are not counted here). Check the "
        "image root (--dataset "
        "NAME=JSON:IMAGE_ROOT, or $DETECTRON2_DATASETS for detectron2's datasets); "
        "`python train_net.py --config-file CONFIG --check-data` lists every bad file."
    )


def resumable_training_dataset(dataset_dicts, mapper, sampler, seed: int, names=()):
    """The iterable dataset for ``build_detection_train_loader`` (with ``sampler=None``), and the
    PositionedSampler whose ``start`` the trainer sets when it resumes. ``names``: the datasets,
    for error messages."""
    positioned = PositionedSampler(sampler)
    dataset = PositionedMapDataset(dataset_dicts, mapper, seed, comm.get_rank(), names)
    return ToIterableDataset(dataset, positioned, shard_chunk_size=1), positioned
