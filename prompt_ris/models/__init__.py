"""Prompt-RIS network: prompted CLIP, coarse decoder, SAM prompts and the SAM bridge."""

from prompt_ris.models.build import build_prompt_ris
from prompt_ris.models.prompt_ris import PromptRIS, PromptRISOutput, PromptSwitches

__all__ = ["PromptRIS", "PromptRISOutput", "PromptSwitches", "build_prompt_ris"]
