# Copyright (c) fasa_seesaw contributors.
"""
The training stream resumes exactly with DATALOADER.ASPECT_RATIO_GROUPING and images of both
orientations: detectron2's own batched loader (its AspectRatioGroupedDataset) around the
resumable dataset, stopped after k batches and rebuilt with the grouping replayed, yields the
batches an uninterrupted loader yields from batch k on. Without the replay it does not.
"""

import itertools
import unittest

from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler

from fasa_seesaw.data.resumable import resumable_training_dataset

# 40 images: wide, tall and square ones (square ones go with the tall, as detectron2 groups).
SIZES = [(64, 48), (48, 64), (64, 64), (80, 40), (40, 80)]
DICTS = [
    {"image_id": i, "width": SIZES[i * 7 % 5][0], "height": SIZES[i * 7 % 5][1]} for i in range(40)
]


def mapper(d):
    return {"image_id": d["image_id"], "width": d["width"], "height": d["height"]}


def loader(batch_size, workers, resume_batches=None, replay=True):
    sampler = TrainingSampler(len(DICTS), shuffle=True, seed=3)
    dataset, positions = resumable_training_dataset(DICTS, mapper, sampler, seed=5)
    if resume_batches is not None:
        wide = [d["width"] > d["height"] for d in DICTS] if replay else None
        positions.resume_at_batch(resume_batches, batch_size, wide)
    return build_detection_train_loader(
        dataset=dataset,
        mapper=None,
        sampler=None,
        total_batch_size=batch_size,
        aspect_ratio_grouping=True,
        num_workers=workers,
        seed=0,
    )


def batches(it, n):
    return [tuple(d["image_id"] for d in b) for b in itertools.islice(iter(it), n)]


class TestAspectRatioGroupingResume(unittest.TestCase):
    def test_resume_replays_half_filled_groups(self):
        for batch_size, workers in ((4, 0), (3, 2)):
            with self.subTest(batch_size=batch_size, workers=workers):
                full = batches(loader(batch_size, workers), 30)
                # Both orientations form batches (a group holds images while the other fills).
                wide = {i for i, d in enumerate(DICTS) if d["width"] > d["height"]}
                kinds = {all(i in wide for i in b) for b in full}
                self.assertEqual(kinds, {True, False})
                for stop in (1, 5, 11):
                    resumed = batches(loader(batch_size, workers, resume_batches=stop), 30 - stop)
                    self.assertEqual(resumed, full[stop:], f"stop after {stop} batches")

    def test_without_the_replay_the_stream_differs(self):
        full = batches(loader(4, 0), 20)
        plain = batches(loader(4, 0, resume_batches=5, replay=False), 15)
        self.assertNotEqual(plain, full[5:])


if __name__ == "__main__":
    unittest.main()
