# Copyright (c) fasa_seesaw contributors.
from .caps import cap_per_class
from .fixed_pool import ap_fixed, ap_pool
from .lvis_engines import ENGINES, METRIC_KEYS, evaluate_lvis, lvis_numpy2_compat
from .lvis_evaluation import LongTailLVISEvaluator, TopKPerClass
from .per_category_ap import PerCategoryAPEvaluator, per_category_ap
from .report import evaluate_report
from .results import EmptyResultsError, EvaluationInputError, load_lvis_gt, prepare_results
from .tide import tide_errors
