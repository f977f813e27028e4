# Copyright (c) fasa_seesaw contributors.
from .lvis_evaluation import LongTailLVISEvaluator, lvis_numpy2_compat
from .per_category_ap import PerCategoryAPEvaluator, per_category_ap
