"""The generated suite: deterministic by seed, every reference answer checked independently."""

from __future__ import annotations

import calendar
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable

import pytest

from fedtune.configbase import ConfigError
from fedtune.data import FAMILIES, DataConfig, Record, build_federated_data, generate_suite
from fedtune.data.generated import HELDOUT_FAMILIES


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


def _subtraction(inp: str, out: str) -> bool:
    m = re.fullmatch(r"(\d+) - (\d+)", inp)
    return m is not None and int(m.group(1)) >= int(m.group(2)) and int(out) + int(
        m.group(2)) == int(m.group(1))


def _multiplication(inp: str, out: str) -> bool:
    m = re.fullmatch(r"(\d+) x (\d+)", inp)
    return m is not None and int(out) == sum(int(m.group(1)) for _ in range(int(m.group(2))))


def _word_problem(inp: str, out: str) -> bool:
    m = re.fullmatch(r"(\w+) has (\d+) (\w+) and (gets (\d+) more|gives away (\d+))\. "
                     r"How many (\w+) does (\w+) have now\?", inp)
    if m is None or m.group(1) != m.group(8) or m.group(3) != m.group(7):
        return False
    start = int(m.group(2))
    expected = start + int(m.group(5)) if m.group(5) else start - int(m.group(6))
    return expected >= 0 and out == str(expected)


def _sort_numbers(inp: str, out: str) -> bool:
    given, answer = [int(x) for x in inp.split(" ")], [int(x) for x in out.split(" ")]
    return (Counter(given) == Counter(answer) and len(given) >= 3
            and all(a <= b for a, b in zip(answer, answer[1:], strict=False)))


def _largest_number(inp: str, out: str) -> bool:
    numbers = [int(x) for x in inp.split(", ")]
    return int(out) in numbers and all(int(out) >= n for n in numbers)


def _count_letter(inp: str, out: str) -> bool:
    m = re.fullmatch(r"'([a-z])' in ([a-z]+)", inp)
    return m is not None and int(out) == len(re.findall(m.group(1), m.group(2))) >= 1


def _word_length(inp: str, out: str) -> bool:
    return inp.isalpha() and int(out) == len(list(inp))


def _last_letter(inp: str, out: str) -> bool:
    return inp.isalpha() and len(out) == 1 and inp.endswith(out)


def _remove_vowels(inp: str, out: str) -> bool:
    return inp.isalpha() and out == re.sub(r"[aeiou]", "", inp)


def _count_vowels(inp: str, out: str) -> bool:
    return inp.isalpha() and int(out) == len(re.findall(r"[aeiou]", inp))


def _letter_position(inp: str, out: str) -> bool:
    return len(inp) == 1 and inp.islower() and int(out) == ord(inp) - ord("a") + 1


_FACTORS = {("km", "m"): 1000, ("m", "cm"): 100, ("cm", "mm"): 10, ("kg", "g"): 1000,
            ("h", "min"): 60, ("min", "s"): 60, ("l", "ml"): 1000}


def _unit_conversion(inp: str, out: str) -> bool:
    m = re.fullmatch(r"(\d+) (\w+) to (\w+)", inp)
    o = re.fullmatch(r"(\d+) (\w+)", out)
    if m is None or o is None or o.group(2) != m.group(3):
        return False
    return int(o.group(1)) == int(m.group(1)) * _FACTORS[(m.group(2), m.group(3))]


def _valid_iso(inp: str) -> tuple[int, int, int] | None:
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", inp)
    if m is None:
        return None
    y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
    ok = 1 <= mo <= 12 and 1 <= d <= calendar.monthrange(y, mo)[1]
    return (y, mo, d) if ok else None


def _date_format(inp: str, out: str) -> bool:
    ymd = _valid_iso(inp)
    return ymd is not None and out == f"{ymd[2]:02d}/{ymd[1]:02d}/{ymd[0]:04d}"


def _month_name(inp: str, out: str) -> bool:
    ymd = _valid_iso(inp)
    return ymd is not None and out == calendar.month_name[ymd[1]]


def _extract_fact(inp: str, out: str) -> bool:
    m = re.fullmatch(r"Context: (\w+) is a (\w+) who lives in (\w+) with a (\w+)\.\n"
                     r"Question: (.+)", inp)
    if m is None:
        return False
    name, job, city, pet, question = m.groups()
    answers = {f"Where does {name} live?": city, f"What is {name}'s job?": job,
               f"Which pet does {name} have?": pet}
    return answers.get(question) == out and out in inp


def _even_or_odd(inp: str, out: str) -> bool:
    return out == ("odd" if inp[-1] in "13579" else "even")


def _word_size_rule(inp: str, out: str) -> bool:
    return inp.isalpha() and out == ("short" if len(inp) <= 4 else "long")


def _compare_numbers(inp: str, out: str) -> bool:
    m = re.fullmatch(r"(\d+) and (\d+)", inp)
    if m is None or m.group(1) == m.group(2):
        return False
    a, b = int(m.group(1)), int(m.group(2))
    return out == ("second" if b > a else "first")


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "addition": _addition,
    "reverse_word": _reverse,
    "uppercase": _uppercase,
    "sort_letters": _sort_letters,
    "count_words": _count_words,
    "next_letter": _next_letter,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "word_problem": _word_problem,
    "sort_numbers": _sort_numbers,
    "largest_number": _largest_number,
    "count_letter": _count_letter,
    "word_length": _word_length,
    "last_letter": _last_letter,
    "remove_vowels": _remove_vowels,
    "count_vowels": _count_vowels,
    "letter_position": _letter_position,
    "unit_conversion": _unit_conversion,
    "date_format": _date_format,
    "month_name": _month_name,
    "extract_fact": _extract_fact,
    "even_or_odd": _even_or_odd,
    "word_size_rule": _word_size_rule,
    "compare_numbers": _compare_numbers,
}


def test_families() -> None:
    assert set(FAMILIES) == set(CHECKS) and len(FAMILIES) >= 20
    assert FAMILIES[:6] == ("addition", "reverse_word", "uppercase", "sort_letters",
                            "count_words", "next_letter")  # the first six keep their place


def test_heldout_families() -> None:
    assert len(HELDOUT_FAMILIES) == 4 and set(HELDOUT_FAMILIES) < set(FAMILIES)
    assert len(set(HELDOUT_FAMILIES)) == len(HELDOUT_FAMILIES)


def test_first_six_families_unchanged() -> None:
    """Adding families leaves the first six's examples as they were (hash of the suite of the
    six-family version, seed 0, 40 per family)."""
    recs = [r for r in generate_suite(40, seed=0) if r.category in FAMILIES[:6]]
    blob = json.dumps([(r.category, r.instruction, r.input, r.output) for r in recs])
    assert hashlib.sha256(blob.encode()).hexdigest() == (
        "53c2032750bb5ef8262ca0da7a9ad63ebc8366abd3ae0868d8cfdfeb36b1ba72")


def test_several_categories_held_out() -> None:
    cfg = DataConfig(num_clients=4, generated_per_family=5,
                     heldout_categories=list(HELDOUT_FAMILIES))
    data = build_federated_data(cfg)
    assert {r.category for r in data.eval} == set(HELDOUT_FAMILIES)
    assert len(data.eval) == 5 * len(HELDOUT_FAMILIES)
    trained = {r.category for c in data.clients for r in c}
    assert trained == set(FAMILIES) - set(HELDOUT_FAMILIES)
    both = DataConfig(num_clients=4, generated_per_family=5, heldout_category="addition",
                      heldout_categories=["subtraction"])
    assert {r.category for r in build_federated_data(both).eval} == {"addition", "subtraction"}


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


@pytest.mark.parametrize("bad", [[""], ["addition", "addition"], "addition", [3]])
def test_heldout_categories_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="heldout_categories"):
        DataConfig(heldout_categories=bad).validate()  # type: ignore[arg-type]


def test_a_chosen_set_of_families_keeps_each_familys_examples():
    from fedtune.config import load_config
    from fedtune.configbase import ConfigError
    from fedtune.data.generated import generate_suite

    every = generate_suite(5, 42)
    two = generate_suite(5, 42, ["month_name", "uppercase"])
    assert [r.category for r in two] == ["uppercase"] * 5 + ["month_name"] * 5
    assert two == [r for r in every if r.category in ("uppercase", "month_name")]
    with pytest.raises(ConfigError, match="generated_families"):
        load_config(None, ['data.generated_families=["uppercase", "nope"]'])
