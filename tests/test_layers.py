"""The import layers of docs/design.md ("Layers and imports"): no module of the package imports
one above it, not even inside a function, and nothing outside ``prompt_ris/miniature/`` imports the
miniature world."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prompt_ris"

# Module-name prefixes from the top of design.md's list to the bottom; a longer prefix wins.
LAYERS: dict[str, int] = {
    "__init__": 11,  # ``from prompt_ris import ...``: the package's public names
    "cli": 10,
    "app": 10,  # the browser app, a command line of its own
    "engine": 9,
    "predictor": 8,
    "miniature": 8,
    "losses": 7,
    "models": 6,  # models/__init__.py and models/prompt_ris.py
    "models.prompt_ris": 6,
    "models.build": 5,
    "models.cross_modal_prompting": 4,
    "models.coarse_decoder": 4,
    "models.text_prompter": 4,
    "models.frozen_sam": 4,
    "models.fast_attention": 4,
    "models.embedding_cache": 4,
    "models.layers": 3,
    "models.pretrained": 3,
    "models.model_card": 3,
    "models.hub": 4,  # hub ids -> checkpoint folders, above the format it reads
    "data": 2,
    "config": 1,
    "prompt_switches": 0,
    "frames": 0,
    "metrics": 0,
    "overlays": 0,
    "method_picture": 0,
    "weights": 0,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise AssertionError(f"prompt_ris.{module} has no layer in LAYERS: add it (and to design.md)")


def _project_imports(path: Path) -> set[str]:
    """Every ``prompt_ris.*`` module the file imports, at any depth (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package imports absolutely)"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n.removeprefix("prompt_ris.") for n in names if n.startswith("prompt_ris.")}
        found |= {"__init__" for n in names if n == "prompt_ris"}
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def test_no_module_imports_one_above_it() -> None:
    upward = []
    for name, path in _modules().items():
        if name in ("__init__", "__main__"):  # the package's front doors stand above everything
            continue
        for target in _project_imports(path):
            if _layer(target) > _layer(name):
                upward.append(f"prompt_ris.{name} -> prompt_ris.{target}")
    assert not upward, upward


def test_nothing_outside_the_miniature_world_imports_it() -> None:
    inward = [
        f"prompt_ris.{name} -> prompt_ris.{target}"
        for name, path in _modules().items()
        if not name.startswith(("miniature", "app."))  # the app's "new scene" renders one
        for target in _project_imports(path)
        if target.startswith("miniature")
    ]
    assert not inward, inward
    assert any(n.startswith("miniature.") for n in _modules())  # the world is there to guard
