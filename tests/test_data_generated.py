"""The generated suite: deterministic by seed, every reference answer checked independently."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import pytest

from fedtune.data import FAMILIES, Record, generate_suite


def _addition(inp: str, out: str) -> bool:
    m = re.fullmatch(r"(\d+) \+ (\d+)", inp)
    return m is not None and int(out) == int(m.group(1)) + int(m.group(2))


def _reverse(inp: str, out: str) -> bool:
    return inp.isalpha() and len(out) == len(inp) and all(
        out[i] == inp[len(inp) - 1 - i] for i in range(len(inp)))


def _uppercase(inp: str, out: str) -> bool:
    return inp.isalpha() and inp.islower() and out == "".join(
        chr(ord(c) - 32) for c in inp)


def _sort_letters(inp: str, out: str) -> bool:
    given, answer = inp.split(" "), out.split(" ")
    return (Counter(given) == Counter(answer) and 3 <= len(given) <= 5
            and all(ord(a) < ord(b) for a, b in zip(answer, answer[1:], strict=False)))


def _count_words(inp: str, out: str) -> bool:
    return int(out) == len(re.findall(r"\S+", inp))


def _next_letter(inp: str, out: str) -> bool:
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    return len(inp) == 1 and inp in alphabet[:-1] and out == alphabet[alphabet.index(inp) + 1]


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "addition": _addition,
    "reverse_word": _reverse,
    "uppercase": _uppercase,
    "sort_letters": _sort_letters,
    "count_words": _count_words,
    "next_letter": _next_letter,
}


def test_families() -> None:
    assert set(FAMILIES) == set(CHECKS) and len(FAMILIES) == 6


def test_deterministic_by_seed() -> None:
    a = generate_suite(30, seed=0)
    assert generate_suite(30, seed=0) == a
    assert generate_suite(30, seed=1) != a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_answer_is_correct(seed: int) -> None:
    recs = generate_suite(40, seed=seed)
    assert Counter(r.category for r in recs) == {f: 40 for f in FAMILIES}
    for r in recs:
        assert isinstance(r, Record)
        assert r.source_id == r.category and r.instruction and r.input and r.output
        assert CHECKS[r.category](r.input, r.output), r
        assert len(r.output) <= 12  # short answers a tiny model can learn


def test_one_instruction_per_family_and_distinct_inputs() -> None:
    recs = generate_suite(20, seed=3)
    for fam in FAMILIES:
        rs = [r for r in recs if r.category == fam]
        assert len({r.instruction for r in rs}) == 1
        assert len({r.input for r in rs}) == 20  # every family has more than 20 inputs


def test_small_input_space_still_yields_the_count() -> None:
    recs = [r for r in generate_suite(40, seed=0) if r.category == "next_letter"]
    assert len(recs) == 40 and len({r.input for r in recs}) == 25


def test_rejects_zero() -> None:
    with pytest.raises(ValueError):
        generate_suite(0, seed=0)
