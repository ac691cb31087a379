"""Expressions to CLIP tokens at a fixed length, and word masking for filler expressions."""

from __future__ import annotations

import functools
import random
import warnings

import torch
from open_clip.tokenizer import SimpleTokenizer

SOT_TOKEN = 49406  # CLIP BPE [SOS]
EOT_TOKEN = 49407  # CLIP BPE [EOS]; the highest id, so argmax finds it


class EmptyExpressionError(ValueError):
    """An expression is empty or whitespace only."""


def expression_list(expressions: object) -> list[str]:
    """One expression or a sequence of them, as a list of strings (what ``predict`` takes).

    Raises:
        TypeError: ``expressions`` (or one of its items) is not a string, naming what it is.
        ValueError: the list is empty.
    """
    if isinstance(expressions, str):
        return [expressions]
    if expressions is None or isinstance(expressions, (bytes, dict)) or not hasattr(
        expressions, "__iter__"
    ):
        raise TypeError(
            f"expressions must be a string or a list of strings, got {expressions!r} "
            f"({type(expressions).__name__})"
        )
    texts = list(expressions)  # type: ignore[call-overload]
    if not texts:
        raise ValueError("no expression given; pass a string or a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"expression {i} is {text!r} ({type(text).__name__}); expressions are strings"
            )
    return texts


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    # The BPE vocabulary ships inside the open_clip package: nothing is downloaded.
    return SimpleTokenizer()


def tokenize(texts: str | list[str], length: int, warn_truncated: bool = False) -> torch.Tensor:
    """CLIP BPE tokens ``[SOS] words [EOS] 0 ...`` at a fixed length.

    A fixed length (not the longest in the batch) keeps a prediction independent of the other
    expressions in its batch. Longer expressions are cut with [EOS] kept last.

    Args:
        texts: one expression or a list.
        length: tokens per expression including [SOS] and [EOS].
        warn_truncated: emit a warning naming each expression that was cut.

    Returns:
        (B, length) long tensor.
    """
    if isinstance(texts, str):
        texts = [texts]
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise EmptyExpressionError(
                f"expression {i} is empty ({text!r}); give a non-empty description of the object"
            )
    tok = _tokenizer()
    if warn_truncated:
        for text in texts:
            n = len(tok.encode(text)) + 2
            if n > length:
                warnings.warn(
                    f"expression {text!r} has {n} tokens and was cut to {length} "
                    f"(set model.clip.text_length to keep more)",
                    stacklevel=2,
                )
    return tok(texts, context_length=length)


def mask_words(text: str, prob: float, rng: random.Random) -> str:
    """Mask out (drop) a random share ``prob`` of the words; at least one word always stays."""
    words = text.split()
    if len(words) < 2 or prob <= 0:
        return text
    k = min(len(words) - 1, max(1, round(prob * len(words))))
    dropped = set(rng.sample(range(len(words)), k))
    return " ".join(w for i, w in enumerate(words) if i not in dropped)
