"""What the engines need from an algorithm: the contract every method folder implements.

An engine (in-process simulation, Flower) only moves bytes: it asks the server side for a
client's download, hands it to the client side with the client's data, and folds the reply back
in. The method decides what the bytes mean. One model lives in memory; the client side trains it
in place and the server side keeps the global state apart from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fedtune.data.prompts import TokenizedExample


@dataclass(frozen=True)
class ReplyInfo:
    """What the server learnt from one accepted reply, for the metrics."""

    num_samples: int
    train_loss: float


class Algorithm(Protocol):
    name: str

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap the base model as the method needs (e.g. add LoRA) and set the global state."""
        ...

    def download(self, round_: int, client_id: int) -> bytes:
        """The server's message to ``client_id`` at the start of ``round_``."""
        ...

    def client_round(self, model: torch.nn.Module, payload: bytes,
                     examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        """On the device: decode the download, train locally in place, encode the reply."""
        ...

    def begin_round(self, round_: int) -> None:
        """Start collecting replies for ``round_``."""
        ...

    def accept(self, payload: bytes) -> ReplyInfo:
        """Validate one reply and fold it into the round's aggregate (MessageError if bad)."""
        ...

    def end_round(self) -> None:
        """Turn the round's aggregate into the new global state."""
        ...

    def load_global(self, model: torch.nn.Module) -> None:
        """Put the current global model into ``model`` (for evaluation and export)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server state a checkpoint must hold to resume."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """Write the global model as a directory transformers loads as it is; return its path."""
        ...
