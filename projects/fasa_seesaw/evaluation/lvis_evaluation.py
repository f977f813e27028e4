# Copyright (c) fasa_seesaw contributors.
"""
The detectron2 evaluator of this project: detectron2's LVISEvaluator data flow (predictions are
turned into LVIS-format results per image, gathered on the main process, saved as
``lvis_instances_results.json``), evaluated with :mod:`fasa_seesaw.evaluation.report`: LVIS AP
with the fast or the reference engine, optionally AP-Fixed, AP-Pool and TIDE, and per-category AP
as CSV and PNG.

Top-K-per-class mode (``topk_per_class`` > 0, for AP-Fixed/AP-Pool): instead of keeping every
prediction, the evaluator keeps, per class, the K highest-scoring results seen so far (a min-heap
per class), so memory is bounded by K x classes whatever the model outputs; train_net.py runs
inference inside :func:`~fasa_seesaw.evaluation.topk_inference.per_class_score_floor` so that the
model outputs, without a per-image cap, every detection that can still enter its class's top K.
Use it with a low MODEL.ROI_HEADS.SCORE_THRESH_TEST (e.g. 0.0001). The standard AP of that run
is computed from the collected set with the usual per-image cap, which is not the standard
protocol: read AP-Fixed and AP-Pool from it, and the standard AP from a normal run.
"""

import heapq
import itertools
import json
import logging
import os
from collections import OrderedDict, defaultdict
import torch

from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .lvis_engines import lvis_numpy2_compat
from .report import evaluate_report, format_table
from .results import EmptyResultsError, load_lvis_gt

__all__ = ["LongTailLVISEvaluator", "TopKPerClass", "lvis_numpy2_compat"]

logger = logging.getLogger(__name__)


class TopKPerClass:
    """
    The ``k`` highest-scoring results of every class seen so far. Equal scores keep the first
    seen (as a stable sort of the stream would), and :meth:`results` returns them in stream
    order, so the outcome equals ``cap_per_class`` on the full stream.
    """

    def __init__(self, k: int):
        self.k = int(k)
        self._heaps = defaultdict(list)  # category -> [(score, -seq, result)]
        self._seq = 0
        self._floor = {}  # category -> score of its K-th result once it has K

    def add(self, results):
        for r in results:
            self._seq += 1
            item = (r["score"], -self._seq, r)
            cat = r["category_id"]
            heap = self._heaps[cat]
            if len(heap) < self.k:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
            else:
                continue
            if len(heap) == self.k:
                self._floor[cat] = heap[0][0]

    def score_floor(self, num_classes: int) -> torch.Tensor:
        """
        Per class (contiguous ids 0..num_classes-1 as predicted), the score a new result must
        exceed to enter its class's top K (0 while the class has fewer than K): anything below
        cannot change the outcome, so inference may drop it before NMS.
        """
        floor = torch.zeros(num_classes)
        for cat, v in self._floor.items():
            if 0 <= cat < num_classes:
                floor[cat] = v
        return floor

    def merge(self, others):
        """Fold in other collectors (e.g. gathered from other processes), in order."""
        for o in others:
            for heap in o._heaps.values():
                self.add([r for _, _, r in sorted(heap, key=lambda t: -t[1])])

    def results(self):
        items = [it for heap in self._heaps.values() for it in heap]
        items.sort(key=lambda t: -t[1])
        return [r for _, _, r in items]

    def __len__(self):
        return sum(len(h) for h in self._heaps.values())


class LongTailLVISEvaluator(LVISEvaluator):
    """
    LVIS evaluation for train_net.py (AP, AP50, AP75, APs/m/l, APr/c/f; optional AP-Fixed,
    AP-Pool, TIDE; per-category CSV and figure in ``output_dir``).

    Args:
        dataset_name: a registered LVIS-format dataset (metadata ``json_file``).
        tasks: ("bbox", "segm") or a subset; default from the predictions.
        distributed, output_dir, max_dets_per_image: as detectron2's LVISEvaluator.
        engine: "hotcoco" (fast, default) or "lvis" (lvis-api).
        extras: any of ("fixed", "pool", "tide").
        fixed_k: K of AP-Fixed / AP-Pool.
        topk_per_class: > 0 keeps only the top K results per class while collecting.
        train_json: training json, for the per-category training image counts.
        figures: write the per-category AP figure.
    """

    def __init__(
        self,
        dataset_name,
        tasks=None,
        distributed=True,
        output_dir=None,
        *,
        max_dets_per_image=300,
        engine="hotcoco",
        extras=(),
        fixed_k=10000,
        topk_per_class=0,
        train_json=None,
        figures=True,
    ):
        self._logger = logging.getLogger(__name__)
        self._tasks = tasks
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets_per_image = 300 if max_dets_per_image is None else max_dets_per_image
        self._cpu_device = torch.device("cpu")
        self._metadata = MetadataCatalog.get(dataset_name)
        self._gt = load_lvis_gt(PathManager.get_local_path(self._metadata.json_file))
        # test-set jsons have no annotations (evaluated on the LVIS server)
        self._do_evaluation = len(self._gt["annotations"]) > 0
        self._engine = engine
        self._extras = tuple(extras)
        self._fixed_k = fixed_k
        self._topk = int(topk_per_class)
        # LVIS jsons (and the built-in ones) carry training image counts in their categories;
        # reading the training json (1 GB for LVIS) is the fallback.
        if all("image_count" in c for c in self._gt["categories"]):
            train_json = None
        self._train_json = train_json
        self._figures = figures
        self._results = OrderedDict()

    @classmethod
    def from_config(cls, cfg, dataset_name, output_dir):
        e = cfg.TEST.LVIS
        train_json = None
        if cfg.DATASETS.TRAIN:
            train_json = getattr(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]), "json_file", None)
        return cls(
            dataset_name,
            output_dir=output_dir,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            engine=e.ENGINE,
            extras=tuple(e.EXTRAS),
            fixed_k=e.FIXED_K,
            topk_per_class=e.TOPK_PER_CLASS,
            train_json=train_json if train_json and os.path.isfile(train_json) else None,
            figures=e.FIGURES,
        )

    def reset(self):
        self._predictions = []
        self._topk_store = TopKPerClass(self._topk) if self._topk > 0 else None

    def process(self, inputs, outputs):
        if self._topk_store is None:
            return super().process(inputs, outputs)
        for inp, out in zip(inputs, outputs):
            if "instances" in out:
                instances = out["instances"].to(self._cpu_device)
                self._topk_store.add(instances_to_coco_json(instances, inp["image_id"]))
        self._predictions.append({"image_id": -1, "instances": []})  # "received something"

    def score_floor(self, num_classes: int) -> torch.Tensor:
        """Per-class score floors for :func:`per_class_score_floor` (zeros unless top-K mode)."""
        if self._topk_store is None:
            return torch.zeros(num_classes)
        return self._topk_store.score_floor(num_classes)

    def evaluate(self):
        if self._topk_store is not None:
            stores = (
                comm.gather(self._topk_store, dst=0) if self._distributed else [self._topk_store]
            )
            if not comm.is_main_process():
                return
            merged = TopKPerClass(self._topk)
            merged.merge(stores)
            self._predictions = [{"image_id": -1, "instances": merged.results()}]
            self._distributed_saved, self._distributed = self._distributed, False
            try:
                return super().evaluate()
            finally:
                self._distributed = self._distributed_saved
        return super().evaluate()

    def _eval_predictions(self, predictions):
        results = list(itertools.chain(*[x["instances"] for x in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(results)
        for r in results:
            r["category_id"] += 1  # contiguous 0..K-1 -> LVIS ids 1..K
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info(f"Saving results to {path}")
            with PathManager.open(path, "w") as f:
                f.write(json.dumps(results))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        self._logger.info(
            f"Evaluating {len(results)} detections ({self._engine} engine; "
            f"extras: {', '.join(self._extras) or 'none'}) ..."
        )
        try:
            res = evaluate_report(
                self._gt,
                results,
                iou_types=sorted(tasks),
                engine=self._engine,
                max_dets=self._max_dets_per_image,
                extras=self._extras,
                fixed_k=self._fixed_k,
                out_dir=self._output_dir,
                train_json=self._train_json,
                figures=self._figures,
            )
        except EmptyResultsError as e:
            self._logger.warning(f"[LongTailLVISEvaluator] {e}")
            return
        self._logger.info("LVIS metrics:\n" + format_table(res))
        self._results.update(res)
