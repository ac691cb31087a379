"""Prompt-RIS: referring image segmentation bridging a prompt-tuned CLIP and a frozen SAM.

The public names are imported on first use (PEP 562), so that ``import prompt_ris.config`` or a
command's ``--help`` does not pay for torch, open_clip and segment_anything.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "Config": "prompt_ris.config",
    "load_config": "prompt_ris.config",
    "Prediction": "prompt_ris.models",
    "PromptRIS": "prompt_ris.models",
    "PromptSwitches": "prompt_ris.prompt_switches",
    "Predictor": "prompt_ris.predictor",
    "evaluate": "prompt_ris.engine.evaluation",
    "EvaluationResults": "prompt_ris.engine.evaluation",
}

if TYPE_CHECKING:
    from prompt_ris.config import Config, load_config
    from prompt_ris.engine.evaluation import EvaluationResults, evaluate
    from prompt_ris.models import Prediction, PromptRIS
    from prompt_ris.predictor import Predictor
    from prompt_ris.prompt_switches import PromptSwitches


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'prompt_ris' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "Config",
    "EvaluationResults",
    "Prediction",
    "Predictor",
    "PromptRIS",
    "PromptSwitches",
    "evaluate",
    "load_config",
    "__version__",
]
