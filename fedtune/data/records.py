"""Instruction records: one common shape for every data source.

Every loader (Dolly-15k, Natural Instructions, Alpaca, generic JSONL, hub datasets, the generated
suite) yields :class:`Record` objects, so the partitioners, the prompt template and the metrics
apply to all of them alike.

A chat record (``data.format = "chat"``) also keeps its whole conversation in ``messages``, as
``(role, content)`` pairs with roles ``system``, ``user`` and ``assistant``; its ``instruction``
is the last user turn and its ``output`` the last assistant turn (the answer evaluation scores).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One instruction example.

    ``category`` is the column Dirichlet partitioning and held-out evaluation work on (Dolly's
    category, the generated suite's task family); ``source_id`` is the natural id a client owns
    under the by-natural-id partition (a Natural Instructions task name). ``messages`` is empty
    except for chat records, whose every assistant turn is trained
    (:func:`fedtune.data.prompts.tokenize_record`).
    """

    instruction: str
    input: str
    output: str
    category: str = ""
    source_id: str = ""
    messages: tuple[tuple[str, str], ...] = ()
