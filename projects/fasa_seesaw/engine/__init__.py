# Copyright (c) fasa_seesaw contributors.
from .checks import check_config
from .fasa_hook import FASAAdaptationHook, cluster_classes, fasa_predictors
from .hooks import ProgressHook, RNGStateHook
