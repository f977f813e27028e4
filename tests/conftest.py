# Copyright (c) fasa_seesaw contributors.
"""
Shared set-up of the test suite.

- One data root per session for the built-in synthetic datasets: unless $FASA_SEESAW_DATA is
  set, it points to a fresh directory (removed at the end) before any test module imports
  fasa_seesaw, so in-process tests and the train_net.py / tool subprocesses they start share one
  generated copy of each dataset.
- ``smoke_data``: the paths of the smoke dataset, generated once per session.
- ``load_tool(name)``: a script of tools/ as a module, loaded from its file (tools/ is not a
  package): a fixture, and ``self.load_tool`` in unittest test cases.
- Tiers: tests marked ``slow`` (training, subprocess and multi-process tests) are left out by
  ``-m "not slow"``.
"""

import importlib.util
import os
import shutil
import sys
import tempfile
import unittest
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_created_root = None


def pytest_configure(config):
    global _created_root
    if not os.environ.get("FASA_SEESAW_DATA"):
        _created_root = tempfile.mkdtemp(prefix="fasa_seesaw_test_data_")
        os.environ["FASA_SEESAW_DATA"] = _created_root


def pytest_unconfigure(config):
    if _created_root:
        shutil.rmtree(_created_root, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_data():
    """Paths of the smoke dataset (see ``fasa_seesaw.data.synth.dataset_paths``)."""
    from fasa_seesaw.data.synth import SMOKE, ensure_generated

    return ensure_generated(SMOKE)


def _load_tool(name):
    if name in sys.modules:
        return sys.modules[name]
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:  # the tools import each other by name
        sys.path.insert(0, tools)
    path = os.path.join(tools, f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the tools import each other by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_tool():
    return _load_tool


@pytest.fixture(autouse=True)
def _unittest_load_tool(request):
    if isinstance(request.instance, unittest.TestCase):
        request.instance.load_tool = _load_tool
