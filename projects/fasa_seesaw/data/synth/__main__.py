# Copyright (c) fasa_seesaw contributors.
"""python -m fasa_seesaw.data.synth [--spec NAME] [--root DIR]: generate a built-in dataset."""

from .generate import main

main()
