# Copyright (c) fasa_seesaw contributors.
from .checks import check_config, check_datasets, check_output_dir, check_test_datasets
from .fasa_hook import FASAAdaptationHook, cluster_classes, fasa_modules
from .hooks import ProgressHook, RNGStateHook
from .trainer import Trainer
