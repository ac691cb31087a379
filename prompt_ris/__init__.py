"""Prompt-RIS: referring image segmentation bridging a prompt-tuned CLIP and a frozen SAM."""

__version__ = "0.1.0"

from prompt_ris.config import Config, load_config  # noqa: E402
from prompt_ris.models import Prediction, PromptRIS, PromptSwitches, build_prompt_ris  # noqa: E402
from prompt_ris.predictor import Predictor  # noqa: E402

__all__ = [
    "Config",
    "Prediction",
    "Predictor",
    "PromptRIS",
    "PromptSwitches",
    "build_prompt_ris",
    "load_config",
    "__version__",
]
