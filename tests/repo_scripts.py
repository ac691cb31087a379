"""The repository's command-line files (``scripts/``, ``evaluation/``) as modules: they are
scripts, not a package, so the tests load them by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """A fresh module of the script at ``relative`` (from the repository root, e.g.
    ``"scripts/benchmark.py"``), registered in ``sys.modules`` under its own name (dataclasses
    look their module up there while they are built)."""
    name = "repo_script_" + relative.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    assert spec is not None and spec.loader is not None, relative
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
