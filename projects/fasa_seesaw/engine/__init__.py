# Copyright (c) fasa_seesaw contributors.
from .checks import check_config
from .hooks import ProgressHook
