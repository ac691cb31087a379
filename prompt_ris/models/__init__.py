"""Prompt-RIS network: prompted CLIP, coarse decoder, frozen SAM with its prompts, text prompter."""

from prompt_ris.models.prompt_ris import (
    EncodedBatch,
    FrameLogits,
    NonFiniteOutputError,
    Prediction,
    PromptRIS,
    PromptRISOutput,
)

__all__ = [
    "EncodedBatch",
    "FrameLogits",
    "NonFiniteOutputError",
    "Prediction",
    "PromptRIS",
    "PromptRISOutput",
]
