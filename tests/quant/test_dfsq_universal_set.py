"""DFSQ universal set: the official configuration and the general multi-word form."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.universal_set import (
    integer_codes,
    official_exponents,
    universal_fractions,
    universal_set,
)


def test_official_configuration_has_377_values_on_the_2_pow_minus_10_grid():
    u = universal_set()
    assert u.numel() == 377
    assert float(u.min()) == -1.0 and float(u.max()) == 1.0
    assert torch.equal(u, u.sort().values) and torch.unique(u).numel() == 377
    assert ((u * 1024) == (u * 1024).round()).all()  # multiples of 2^-10
    assert float(u[u > 0].min()) == 2 ** -10
    assert torch.equal(u, -u.flip(0))  # symmetric
    assert int((u >= 0).sum()) == 189 and int((u < 0).sum()) == 188


def test_official_words_and_density_match_the_reference():
    assert official_exponents() == ((0, 1, 5), (0, 2, 6), (0, 3, 7), (0, 4, 8))
    u = universal_set(dtype=torch.float64)
    pos = u[u >= 0]
    edges = [0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4]
    counts = [int(((pos >= lo) & (pos < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    counts.append(int((pos >= 3 / 4).sum()))
    assert counts == [36, 18, 27, 65, 33, 10]  # METHODS.md §3.4


def test_official_set_equals_the_official_generator():
    # gen_universal_set(4): words {1, 2^-i, 2^-(i+4), 0}, summed, /4, both signs
    words = [[1, 2 ** -i, 2 ** -(i + 4), 0] for i in range(1, 5)]
    ref = sorted({s * sign / 4 for combo in itertools.product(*words)
                  for s in [sum(combo)] for sign in (1, -1)})
    assert universal_set(dtype=torch.float64).tolist() == ref


def test_integer_codes_are_exact():
    codes, k = integer_codes()
    assert k == 10
    assert codes.min() == -1024 and codes.max() == 1024
    assert torch.equal(codes.double() / 1024, universal_set(dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=3), min_size=1, max_size=3),
       st.booleans())
def test_general_form_is_every_normalised_word_sum(exponents, signed):
    words = len(exponents)
    values = universal_fractions(words, exponents, signed)
    choices = [[Fraction(0)] + [Fraction(1, 2 ** e) for e in set(w)] for w in exponents]
    top = sum(max(c) for c in choices)
    ref = {sum(combo) / top for combo in itertools.product(*choices)}
    if signed:
        ref |= {-v for v in ref}
    assert list(values) == sorted(ref)
    assert max(values) == 1
    tensor = universal_set(words, exponents, signed, dtype=torch.float64)
    assert tensor.tolist() == [float(v) for v in values]


def test_sizes_grow_with_the_number_of_words():
    sizes = [universal_set(w).numel() for w in (1, 2, 3, 4, 5)]
    assert sizes == [7, 29, 107, 377, 1295]


def test_bad_exponents_are_rejected():
    with pytest.raises(ValueError, match="one list per word"):
        universal_set(2, [[0, 1]])
    with pytest.raises(ValueError, match="integers >= 0"):
        universal_set(1, [[-1]])
    with pytest.raises(ValueError, match="no non-zero choice"):
        universal_set(1, [[]])
