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

import datetime
import random
import string
from collections.abc import Callable, Sequence
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


# Families added after the first six (each draws from its own generator, so the first six's
# examples are unchanged for a given seed).

NAMES: tuple[str, ...] = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Ida", "Jack", "Lena",
    "Marco", "Nina", "Oscar", "Paula", "Sam",
)
ITEMS: tuple[str, ...] = (
    "apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells", "cookies",
    "stickers",
)
CITIES: tuple[str, ...] = (
    "Paris", "London", "Madrid", "Berlin", "Rome", "Vienna", "Lisbon", "Dublin", "Oslo", "Prague",
    "Athens", "Cairo", "Tokyo", "Lima",
)
JOBS: tuple[str, ...] = (
    "teacher", "doctor", "baker", "farmer", "pilot", "nurse", "painter", "driver", "writer",
    "singer",
)
PETS: tuple[str, ...] = ("cat", "dog", "parrot", "rabbit", "horse", "goat", "turtle")
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
VOWELS = "aeiou"
# (from unit, to unit, factor): whole-number conversions only
UNIT_CONVERSIONS: tuple[tuple[str, str, int], ...] = (
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000),
    ("h", "min", 60), ("min", "s", 60), ("l", "ml", 1000),
)


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return f"{a} - {b}", str(a - b)


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{a} x {b}", str(a * b)


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(2, 30)
    if rng.random() < 0.5:
        b = rng.randint(1, 30)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return text, str(a + b)
    b = rng.randint(1, a)
    text = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have now?"
    return text, str(a - b)


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(100), rng.randint(3, 4))
    return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


def _largest_number(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1000), rng.randint(2, 5))
    return ", ".join(map(str, numbers)), str(max(numbers))


def _count_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    return f"'{letter}' in {word}", str(word.count(letter))


def _word_length(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, str(len(word))


def _last_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, word[-1]


def _remove_vowels(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, "".join(c for c in word if c not in VOWELS)


def _count_vowels(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, str(sum(c in VOWELS for c in word))


def _letter_position(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(string.ascii_lowercase))
    return string.ascii_lowercase[i], str(i + 1)


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(UNIT_CONVERSIONS)
    amount = rng.randint(1, 12)
    return f"{amount} {src} to {dst}", f"{amount * factor} {dst}"


def _date_format(rng: random.Random) -> tuple[str, str]:
    day = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 30))
    return day.isoformat(), day.strftime("%d/%m/%Y")


def _month_name(rng: random.Random) -> tuple[str, str]:
    day = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 30))
    return day.isoformat(), MONTHS[day.month - 1]


def _extract_fact(rng: random.Random) -> tuple[str, str]:
    name, city, job, pet = (rng.choice(NAMES), rng.choice(CITIES), rng.choice(JOBS),
                            rng.choice(PETS))
    context = f"{name} is a {job} who lives in {city} with a {pet}."
    question, answer = rng.choice((
        (f"Where does {name} live?", city),
        (f"What is {name}'s job?", job),
        (f"Which pet does {name} have?", pet),
    ))
    return f"Context: {context}\nQuestion: {question}", answer


def _even_or_odd(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return str(n), "even" if n % 2 == 0 else "odd"


def _word_size_rule(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return word, "long" if len(word) > 4 else "short"


def _compare_numbers(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(1000), 2)
    return f"{a} and {b}", "first" if a > b else "second"


_REGISTRY: dict[str, Family] = {
    "addition": Family("Add the two numbers.", _addition),
    "reverse_word": Family("Write the word backwards.", _reverse_word),
    "uppercase": Family("Write the word in capital letters.", _uppercase),
    "sort_letters": Family("Sort the letters in alphabetical order.", _sort_letters),
    "count_words": Family("Count the words in the sentence.", _count_words),
    "next_letter": Family("Write the letter that comes after this one in the alphabet.",
                          _next_letter),
    "subtraction": Family("Subtract the second number from the first.", _subtraction),
    "multiplication": Family("Multiply the two numbers.", _multiplication),
    "word_problem": Family("Solve the word problem. Answer with a number.", _word_problem),
    "sort_numbers": Family("Sort the numbers from smallest to largest.", _sort_numbers),
    "largest_number": Family("Write the largest of the numbers.", _largest_number),
    "count_letter": Family("Count how many times the letter occurs in the word.", _count_letter),
    "word_length": Family("How many letters does the word have?", _word_length),
    "last_letter": Family("Write the last letter of the word.", _last_letter),
    "remove_vowels": Family("Remove the vowels (a, e, i, o, u) from the word.", _remove_vowels),
    "count_vowels": Family("Count the vowels (a, e, i, o, u) in the word.", _count_vowels),
    "letter_position": Family("Write the position of the letter in the alphabet (a is 1).",
                              _letter_position),
    "unit_conversion": Family("Convert the quantity to the unit asked for.", _unit_conversion),
    "date_format": Family("Rewrite the date (year-month-day) as day/month/year.", _date_format),
    "month_name": Family("Write the name of the month of the date.", _month_name),
    "extract_fact": Family("Answer the question with a word from the context.", _extract_fact),
    "even_or_odd": Family("Classify the number: answer 'even' if it is divisible by 2, "
                          "otherwise 'odd'.", _even_or_odd),
    "word_size_rule": Family("Classify the word: answer 'long' if it has more than 4 letters, "
                             "otherwise 'short'.", _word_size_rule),
    "compare_numbers": Family("Which number is larger? Answer 'first' or 'second'.",
                              _compare_numbers),
}

FAMILIES: tuple[str, ...] = tuple(_REGISTRY)

# Families held out whole for evaluation (unseen tasks, as FedKSeed and FedIT hold out tasks):
# each has relatives among the training families (addition, first/next letter, counting).
HELDOUT_FAMILIES: tuple[str, ...] = ("subtraction", "last_letter", "unit_conversion",
                                     "even_or_odd")

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


def generate_suite(per_family: int, seed: int,
                   families: Sequence[str] | None = None) -> list[Record]:
    """``per_family`` examples of every family in ``families`` (default :data:`FAMILIES`, in
    its order), deterministic by ``seed``."""
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    chosen = set(families or FAMILIES)
    unknown = chosen - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; known: {list(FAMILIES)}")
    return [r for name in FAMILIES if name in chosen
            for r in generate_family(name, per_family, seed)]


def training_suite(per_family: int, seed: int) -> list[Record]:
    """:func:`generate_suite` without the families held out for evaluation
    (:data:`HELDOUT_FAMILIES`): what a server may hold as its own prompts."""
    return [r for name in FAMILIES if name not in HELDOUT_FAMILIES
            for r in generate_family(name, per_family, seed)]
