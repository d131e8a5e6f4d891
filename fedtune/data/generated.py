"""fedtune's own instruction suite: small task families with short answers, no files needed.

Each family is one fixed instruction and one small function ``rng -> (input, output)`` whose output
is correct by construction; records take Dolly's shape with the family name as ``category`` (and
``source_id``), so Dirichlet partitions, held-out families and by-id partitions all apply. Answers
are a few tokens long, so a tiny model can learn them in a short federated run.

To add a family, write one generator and register it in ``_REGISTRY``; each family draws from its
own generator seeded by ``(seed, family name)``, so adding one leaves the others' examples as they
were.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from fedtune.data.records import Record

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "green", "house", "light", "music", "ocean", "paper",
    "plant", "quiet", "smile", "table", "tiger", "water", "bread", "chair", "dream", "earth",
    "field", "glass", "heart", "lemon", "money", "night", "party", "queen", "radio", "sugar",
    "train", "voice", "world", "bird", "fish", "moon", "star", "tree", "rain", "snow",
)


@dataclass(frozen=True)
class Family:
    """One task family: a fixed instruction and a generator of (input, correct output) pairs."""

    instruction: str
    make: Callable[[random.Random], tuple[str, str]]


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"{a} + {b}", str(a + b)


def _reverse_word(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, word.upper()


def _sort_letters(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
    return " ".join(letters), " ".join(sorted(letters))


def _count_words(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
    return " ".join(words), str(len(words))


def _next_letter(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(string.ascii_lowercase) - 1)  # 'z' has no next letter
    return string.ascii_lowercase[i], string.ascii_lowercase[i + 1]


_REGISTRY: dict[str, Family] = {
    "addition": Family("Add the two numbers.", _addition),
    "reverse_word": Family("Write the word backwards.", _reverse_word),
    "uppercase": Family("Write the word in capital letters.", _uppercase),
    "sort_letters": Family("Sort the letters in alphabetical order.", _sort_letters),
    "count_words": Family("Count the words in the sentence.", _count_words),
    "next_letter": Family("Write the letter that comes after this one in the alphabet.",
                          _next_letter),
}

FAMILIES: tuple[str, ...] = tuple(_REGISTRY)

_DRAWS_PER_EXAMPLE = 50


def generate_family(name: str, n: int, seed: int) -> list[Record]:
    """``n`` examples of family ``name``, distinct inputs first.

    Inputs are drawn until ``n`` distinct ones are found or ``50 * n`` draws are spent; a family
    with fewer possible inputs (next_letter has 25) then repeats draws, so ``n`` is always met.
    """
    family = _REGISTRY[name]
    rng = random.Random(f"{seed}:{name}")  # str seeds hash by SHA-512: stable across runs
    pairs: dict[str, str] = {}
    repeats: list[tuple[str, str]] = []
    for _ in range(_DRAWS_PER_EXAMPLE * n):
        if len(pairs) == n:
            break
        inp, out = family.make(rng)
        pairs.setdefault(inp, out)
    while len(pairs) + len(repeats) < n:
        repeats.append(family.make(rng))
    return [Record(instruction=family.instruction, input=inp, output=out, category=name,
                   source_id=name) for inp, out in list(pairs.items()) + repeats]


def generate_suite(per_family: int, seed: int) -> list[Record]:
    """``per_family`` examples of every family in :data:`FAMILIES`, deterministic by ``seed``."""
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    return [r for name in FAMILIES for r in generate_family(name, per_family, seed)]
