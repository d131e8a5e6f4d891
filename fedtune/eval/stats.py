"""Statistics of quality claims: repetition loops, paired per-example comparisons, spread.

A quality figure in fedtune is a mean over seeds with its spread, and a paired comparison of the
same eval examples answered by two models (the base and a tuned one, or two tuned arms):

* :func:`repetition_loop` says whether an answer is caught in a loop (a unit of text repeated
  back to back), the failure a damaged small model shows first;
* :func:`paired` counts the examples on which model B scores above, below and level with model A
  and gives the two-sided **sign test** p-value of the wins against the losses (ties dropped):
  under "neither model is better", wins ~ Binomial(wins + losses, 1/2) (the exact binomial test
  of ``scipy.stats.binomtest``);
* :func:`spread` the mean, sample standard deviation, minimum and maximum of a metric over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# a loop: one unit of 1..LOOP_MAX_UNIT characters repeated at least LOOP_MIN_REPEATS times in a
# row, the repeats covering at least LOOP_MIN_CHARS characters
LOOP_MAX_UNIT = 80
LOOP_MIN_REPEATS = 3
LOOP_MIN_CHARS = 16


def repetition_loop(text: str, *, max_unit: int = LOOP_MAX_UNIT,
                    min_repeats: int = LOOP_MIN_REPEATS, min_chars: int = LOOP_MIN_CHARS) -> bool:
    """Whether ``text`` holds a repetition loop: some unit u of 1 to ``max_unit`` characters,
    with at least one that is not white space, occurs ``min_repeats`` or more times back to back
    (u u u ...), and those repeats cover at least ``min_chars`` characters.

    Character units catch both loops seen on the real model: "S-T-I-G-I-T-I-T-I-T-I-T-" (the unit
    "I-T-" six times) and a whole sentence said four times over. The length floor keeps short,
    legitimate repeats ("ha ha ha", "1 1 1", "...") out. White space is normalised first (runs of
    it become one space, and the answer's end counts as one), so line breaks between repeats do
    not hide a loop and a sentence said three times ends its third repeat like the first two.
    """
    s = " ".join(text.split()) + " "
    n = len(s)
    for unit in range(1, min(max_unit, n // min_repeats) + 1):
        for start in range(0, n - unit * min_repeats + 1):
            u = s[start:start + unit]
            if not u.strip():
                continue
            reps, end = 1, start + unit
            while s.startswith(u, end):
                reps, end = reps + 1, end + unit
            if reps >= min_repeats and reps * unit >= min_chars:
                return True
    return False


def repetition_share(texts: Sequence[str]) -> float:
    """The share of ``texts`` caught in a :func:`repetition_loop` (0.0 for none given)."""
    return sum(map(repetition_loop, texts)) / len(texts) if texts else 0.0


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a result at least this lopsided | wins ~ Bin(wins + losses,
    1/2)). 1.0 when there is nothing to compare."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def paired(a: Sequence[float], b: Sequence[float], *, tol: float = 1e-9) -> dict[str, Any]:
    """Per-example comparison of B against A on the same examples: ``wins`` (B above A by more
    than ``tol``), ``losses``, ``ties``, the ``sign_p`` of wins against losses and the
    ``mean_diff`` (B - A)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same examples: {len(a)} against {len(b)}")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    wins = sum(d > tol for d in diffs)
    losses = sum(d < -tol for d in diffs)
    return {"n": len(diffs), "wins": wins, "losses": losses, "ties": len(diffs) - wins - losses,
            "sign_p": sign_test(wins, losses),
            "mean_diff": sum(diffs) / len(diffs) if diffs else math.nan}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of ``values``."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("spread of no values")
    return {"mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}
