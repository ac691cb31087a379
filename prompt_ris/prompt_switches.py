"""Prompt switches: which prompt types reach SAM's mask decoder (the paper's Table 5).

A switch set is written as its prompt types joined by " + " in the order of ``PROMPT_TYPES``
(``"mask + point + text"``, ``"mask + text"``; ``"none"`` for no prompt). The config holds one
such string (``model.prompts.switches``); the model, training, the ``prompt-ris`` command and
evaluation all read it through :class:`PromptSwitches`. Prompt dropout (Sec. 4.2) acts on top
of the switches during training.

Adding a prompt type means adding its name here, making it (``models.frozen_sam``) and passing
it to the decoder (``PromptRIS.decode``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations

PROMPT_TYPES = ("mask", "point", "text")  # every prompt type, in the order names list them
SEPARATOR = " + "
NO_PROMPTS = "none"


class SwitchesError(ValueError):
    """A switch set names a prompt type that does not exist."""


@dataclass(frozen=True)
class PromptSwitches:
    """A set of prompt types switched on (default: all of them).

    Attributes:
        on: the prompt types switched on, a subset of ``PROMPT_TYPES``.
    """

    on: frozenset[str] = field(default=frozenset(PROMPT_TYPES))

    def __post_init__(self) -> None:
        on = frozenset(self.on)
        unknown = sorted(on - set(PROMPT_TYPES))
        if unknown:
            raise SwitchesError(
                f"unknown prompt type {', '.join(map(repr, unknown))}; choose from "
                f"{', '.join(PROMPT_TYPES)}, joined by '{SEPARATOR.strip()}' (e.g. 'mask + text')"
            )
        object.__setattr__(self, "on", on)

    @classmethod
    def parse(cls, text: str) -> PromptSwitches:
        """The switch set a name such as ``"mask + text"`` (or ``"none"``) describes.

        Raises:
            SwitchesError: a part is not a prompt type or is named twice.
        """
        if not isinstance(text, str):
            raise SwitchesError(f"a prompt switch set is a string like 'mask + text', got {text!r}")
        parts = [p.strip() for p in text.split(SEPARATOR.strip())]
        if parts == [NO_PROMPTS]:
            return cls(frozenset())
        if len(set(parts)) != len(parts):
            raise SwitchesError(
                f"prompt switch set '{text}' names a prompt type twice; name each once, e.g. "
                f"'{SEPARATOR.join(PROMPT_TYPES)}'"
            )
        return cls(frozenset(parts))

    @property
    def name(self) -> str:
        """``"mask + point + text"``: the types switched on, in ``PROMPT_TYPES`` order."""
        return SEPARATOR.join(self.types()) or NO_PROMPTS

    def types(self) -> tuple[str, ...]:
        """The prompt types switched on, in ``PROMPT_TYPES`` order."""
        return tuple(t for t in PROMPT_TYPES if t in self.on)

    def __contains__(self, prompt_type: object) -> bool:
        return prompt_type in self.on

    def __iter__(self) -> Iterator[str]:
        return iter(self.types())

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"PromptSwitches({self.name!r})"

    def without(self, *prompt_types: str) -> PromptSwitches:
        """This set with ``prompt_types`` switched off."""
        return PromptSwitches(self.on - set(PromptSwitches(frozenset(prompt_types)).on))

    @classmethod
    def every(cls) -> list[PromptSwitches]:
        """Every switch set, in the order of the paper's Table 5: none, each type alone, each
        pair, all of them."""
        return [
            cls(frozenset(types))
            for size in range(len(PROMPT_TYPES) + 1)
            for types in combinations(PROMPT_TYPES, size)
        ]

    def ablation(self) -> list[PromptSwitches]:
        """This set, then this set with each of its prompt types off in turn (``every`` gives
        all of Table 5's rows)."""
        return [self, *(self.without(t) for t in self.types())]


def parse_switch_sets(items: Iterable[str | PromptSwitches]) -> list[PromptSwitches]:
    """Switch sets from names or sets, duplicates dropped, order kept."""
    out: list[PromptSwitches] = []
    for item in items:
        switches = item if isinstance(item, PromptSwitches) else PromptSwitches.parse(item)
        if switches not in out:
            out.append(switches)
    return out
