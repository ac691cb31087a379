"""Prompt-RIS network: prompted CLIP, coarse decoder, frozen SAM with its prompts, text prompter."""

from prompt_ris.models.frozen_sam import PromptSwitches
from prompt_ris.models.prompt_ris import (
    NonFiniteOutputError,
    Prediction,
    PromptRIS,
    PromptRISOutput,
    build_prompt_ris,
)

__all__ = [
    "NonFiniteOutputError",
    "Prediction",
    "PromptRIS",
    "PromptRISOutput",
    "PromptSwitches",
    "build_prompt_ris",
]
