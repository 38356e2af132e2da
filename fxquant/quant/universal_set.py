"""DFSQ's universal set: signed sums of "multi-word additive log-scale values".

The official configuration (zysxmu/DFSQ ``cluster_process.py``, ``gen_universal_set(4)``) has
four words; word ``i`` (1-based) is one of ``{1, 2^-i, 2^-(i+4), 0}``; a value is the sum of
the four words divided by 4, with both signs. That gives 377 distinct values in [-1, 1], all
multiples of 2^-10 (METHODS.md §3.4).

The general form takes any number of words and, per word, the exponents ``e`` of its
non-zero choices ``2^-e`` (0 is always a choice). Values are divided by the largest sum so
the set spans [-1, 1]. Everything is computed exactly with :class:`fractions.Fraction`
before the final conversion to a sorted float tensor (exact in float64 whenever the set is
dyadic, as the official one is).
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from functools import lru_cache
from typing import Sequence

import torch

OFFICIAL_WORDS = 4


def official_exponents(words: int = OFFICIAL_WORDS) -> tuple[tuple[int, ...], ...]:
    """Per-word exponents of the official pattern: word i ∈ {2^0, 2^-i, 2^-(i+words)}."""
    if words < 1:
        raise ValueError(f"a universal set needs at least one word, got {words}")
    return tuple((0, i, i + words) for i in range(1, words + 1))


def _normalise_exponents(words: int, exponents: Sequence[Sequence[int]] | None
                         ) -> tuple[tuple[int, ...], ...]:
    if exponents is None or len(exponents) == 0:
        return official_exponents(words)
    if len(exponents) != words:
        raise ValueError(f"{len(exponents)} exponent lists given for {words} words; give one "
                         "list per word (or none for the official pattern)")
    out = []
    for i, choices in enumerate(exponents):
        if len(choices) == 0:
            raise ValueError(f"word {i + 1} has no non-zero choice; give at least one exponent")
        if any(int(e) != e or e < 0 for e in choices):
            raise ValueError(f"word {i + 1}: exponents must be integers >= 0 (value 2^-e), "
                             f"got {list(choices)}")
        out.append(tuple(sorted(set(int(e) for e in choices))))
    return tuple(out)


@lru_cache(maxsize=64)
def _universal_fractions(words: int, exponents: tuple[tuple[int, ...], ...],
                         signed: bool) -> tuple[Fraction, ...]:
    choices = [[Fraction(0)] + [Fraction(1, 2 ** e) for e in word] for word in exponents]
    top = sum(max(word) for word in choices)
    magnitudes = {sum(combo) / top for combo in itertools.product(*choices)}
    values = magnitudes | ({-v for v in magnitudes} if signed else set())
    return tuple(sorted(values))


def universal_fractions(words: int = OFFICIAL_WORDS,
                        exponents: Sequence[Sequence[int]] | None = None,
                        signed: bool = True) -> tuple[Fraction, ...]:
    """The universal set as exact, sorted, distinct fractions."""
    return _universal_fractions(words, _normalise_exponents(words, exponents), signed)


def universal_set(words: int = OFFICIAL_WORDS, exponents: Sequence[Sequence[int]] | None = None,
                  signed: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sorted float tensor of the universal set (official: 377 values, multiples of 2^-10)."""
    values = universal_fractions(words, exponents, signed)
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(dtype)


def dyadic_exponent(values: Sequence[Fraction]) -> int | None:
    """The smallest ``k`` with every value a multiple of ``2^-k`` (None if not dyadic)."""
    k = 0
    for v in values:
        d = v.denominator
        if d & (d - 1):
            return None
        k = max(k, d.bit_length() - 1)
    return k


def integer_codes(words: int = OFFICIAL_WORDS, exponents: Sequence[Sequence[int]] | None = None,
                  signed: bool = True) -> tuple[torch.Tensor, int]:
    """Exact integer codes ``value · 2^k`` and ``k`` (official: k = 10, codes in -1024..1024)."""
    values = universal_fractions(words, exponents, signed)
    k = dyadic_exponent(values)
    if k is None:
        raise ValueError("this universal set is not dyadic (the divisor is not a power of 2); "
                         "it has no exact integer codes")
    codes = [int(v * 2 ** k) for v in values]
    return torch.tensor(codes, dtype=torch.int64), k
