"""The statistics behind quality claims: repetition loops, the sign test, paired comparisons,
spread; and the two Rouge-L scorers on known pairs."""

import pytest

from fedtune.eval.metrics import rouge_l, rouge_l_scores
from fedtune.eval.stats import paired, repetition_loop, repetition_share, sign_test, spread


@pytest.mark.parametrize("text", [
    "S-T-I-G-I-T-I-T-I-T-I-T-I-T-I-T-",  # seen on the real model after the old quick start
    "I'm just a little too proud to laugh at my own jokes, I'm just a little too proud to laugh "
    "at my own jokes, I'm just a little too proud to laugh at my own jokes, I'm just",
    "The answer is 5. The answer is 5. The answer is 5.",
    "ha ha ha ha ha ha ha ha ha",  # 9 repeats of "ha " cover 26 characters
    "Sure!\n\n1. apples\n1. apples\n1. apples\n1. apples",  # line breaks do not hide it
])
def test_loops_are_caught(text):
    assert repetition_loop(text)


@pytest.mark.parametrize("text", [
    "",
    "The capital of Peru is Lima.",
    "ha ha ha",  # three repeats but only 8 characters: below the floor
    "1 1 1",
    "Three fruits high in vitamin C are oranges, kiwis and strawberries.",
    "apple banana cherry apple banana cherry",  # twice is not a loop
    "Wait...",
    "          ",  # white space alone is no unit
])
def test_ordinary_answers_are_not_loops(text):
    assert not repetition_loop(text)


def test_repetition_share_counts_looping_answers():
    assert repetition_share([]) == 0.0
    assert repetition_share(["fine", "abcdefgh" * 3, "also fine", "xy" * 10]) == 0.5


def test_sign_test_by_hand():
    # 5 wins, 0 losses: P(X = 0 or X = 5 | Bin(5, 1/2)) = 2 / 32
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    # 8 wins, 2 losses: P(X <= 2) = (1 + 10 + 45) / 1024; two-sided doubles it
    assert sign_test(8, 2) == pytest.approx(2 * 56 / 1024)
    assert sign_test(3, 3) == pytest.approx(1.0)
    assert sign_test(0, 0) == 1.0
    with pytest.raises(ValueError):
        sign_test(-1, 2)


def test_paired_counts_wins_losses_ties():
    a = [0.1, 0.5, 0.5, 0.9, 0.2]
    b = [0.3, 0.5, 0.4, 1.0, 0.7]
    p = paired(a, b)
    assert (p["n"], p["wins"], p["losses"], p["ties"]) == (5, 3, 1, 1)
    assert p["sign_p"] == pytest.approx(sign_test(3, 1)) and p["sign_p"] == pytest.approx(0.625)
    assert p["mean_diff"] == pytest.approx((0.2 + 0 - 0.1 + 0.1 + 0.5) / 5)
    with pytest.raises(ValueError, match="same examples"):
        paired([0.1], [0.1, 0.2])


def test_spread():
    s = spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert spread([4.0])["std"] == 0.0
    with pytest.raises(ValueError):
        spread([])


def test_the_fedkseed_scorer_on_known_pairs():
    # the pltrdy package is case-sensitive and keeps punctuation out by splitting at "."
    refs = ["the cat sat", "The capital of Peru is Lima.", "a b c d", "x"]
    preds = ["the cat sat", "the capital of peru is lima", "a c e", ""]
    fk = rouge_l_scores(preds, refs, "fedkseed")
    assert fk[0] == pytest.approx(1.0, abs=1e-6)
    assert fk[1] == pytest.approx(3 / 6, abs=1e-6)  # "The", "Peru" and "Lima" differ in case
    assert fk[2] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4), abs=1e-6)
    assert fk[3] == 0.0  # an empty answer scores 0, as in the reference code
    # rouge_score lower-cases: the same pairs score differently there
    rs = rouge_l_scores(preds, refs, "rouge-score")
    assert rs[1] == pytest.approx(1.0) and rs[1] > fk[1]
    assert rouge_l(preds, refs, "fedkseed") == pytest.approx(sum(fk) / 4)
    assert rouge_l_scores(["..."], ["a b"], "fedkseed") == [0.0]  # refused by the package: 0


def test_an_unknown_scorer_is_refused():
    with pytest.raises(ValueError, match="unknown Rouge-L scorer"):
        rouge_l_scores(["a"], ["a"], "bleu")
