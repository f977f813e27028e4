# Copyright (c) fasa_seesaw contributors.
from .fixed_pool import ap_fixed, ap_pool, cap_per_class
from .lvis_engines import (
    ENGINES,
    METRIC_KEYS,
    EmptyResultsError,
    EvaluationInputError,
    evaluate_lvis,
    load_lvis_gt,
    lvis_numpy2_compat,
    prepare_results,
)
from .lvis_evaluation import LongTailLVISEvaluator, TopKPerClass
from .per_category_ap import PerCategoryAPEvaluator, per_category_ap
from .report import evaluate_report
from .tide import tide_errors
