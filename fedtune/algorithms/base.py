"""The method contract: a Server half, a Device half, and the registry row that builds them.

An engine (in-process simulation, Flower) only moves bytes: it asks the server half for a
client's download, hands it to a device half with the client's data, and folds the reply back
into the server half. The method decides what the bytes mean. In process one model lives in
memory: the device half trains it in place, the server half keeps the global state apart from it
and loads it into the model for evaluation and export.

Optional capabilities are explicit members that are ``None`` when a method lacks them (never
found by ``getattr``): delta downloads, its own evaluation, a stopping rule, the two ways a
server may fold steps of its own into the global state (FedPT's distillation), and secure
aggregation (a server folds a round's mean without seeing one reply; the method's row says how
a device turns its reply into the update that is averaged).

A method is a :class:`Method` row in :data:`fedtune.algorithms.METHODS`: its name, the config
sub-tables it reads, how it prepares the base model, and its server and device factories.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedtune.algorithms.aggregate import Rules
from fedtune.data.prompts import TokenizedExample
from fedtune.data.records import Record

if TYPE_CHECKING:
    from fedtune.algorithms.config import AlgorithmConfig
    from fedtune.zo.spec import ZSpec


@dataclass(frozen=True)
class ReplyInfo:
    """What the server learnt from one accepted reply, for the metrics."""

    num_samples: int
    train_loss: float


@dataclass(frozen=True)
class MethodContext:
    """What both halves are built from: the algorithm config, the pad id, the tokenizer."""

    cfg: AlgorithmConfig
    pad_id: int
    tokenizer: Any = None

    def rules(self) -> Rules:
        """How the server aggregates (``algorithm.weighting``, ``max_sample_weight``,
        ``[algorithm.robust]``, ``[algorithm.dp]``). Both the robust clip and the privacy clip
        apply: the smaller bound wins."""
        c = self.cfg
        clips = [b for b in (c.robust.max_update_norm,
                             c.dp.clip_norm if c.dp.enabled else 0.0) if b > 0]
        return Rules(c.weighting, c.max_sample_weight, c.robust.aggregation,
                     c.robust.trim_fraction, min(clips, default=0.0), c.dp.noise_std(),
                     c.dp.noise_seed, c.robust.max_round_change,
                     c.robust.max_change_over_median)


@dataclass(frozen=True)
class DeviceEnv:
    """Where a device half runs.

    ``one_client``: a real device (a Flower node), one client per process: hold about inference
    memory, no copies kept for the next client. ``w0_dir``: the base model's safetensors, which a
    device may read instead of copying the weights. ``cache_dir``: a folder kept between rounds
    (a node with ``federation.delta_downloads``). ``shared``: in process, the server half's
    ``device_share`` (read-only state a simulated device may use instead of a copy of its own).
    """

    one_client: bool = False
    w0_dir: Path | None = None
    cache_dir: Path | None = None
    shared: object | None = None


class Evaluate(Protocol):
    """A method's own evaluation (FedPT scores its product, the proxy-tuned large model)."""

    def __call__(self, model: torch.nn.Module, tokenizer: Any, records: Sequence[Record], *,
                 max_new_tokens: int, batch_size: int, max_length: int, rouge: bool,
                 loss: bool, template: str = "auto", scorer: str = "rouge-score"
                 ) -> dict[str, float]: ...


class SeedSteps(Protocol):
    """A server whose global state is per-seed sums (FedKSeed): steps the server takes along
    the pool's seeds are folded in as Σ g per seed index."""

    @property
    def pool(self) -> Sequence[int]: ...

    @property
    def lr(self) -> float: ...

    @property
    def eps(self) -> float: ...

    @property
    def z(self) -> ZSpec: ...

    def add_server_steps(self, sum_g: Mapping[int, float]) -> None: ...


class AcceptMean(Protocol):
    """Secure aggregation: fold a round's securely aggregated updates in one go.

    ``mean`` = sum_i w_i u_i / sum_i w_i over the replies the server never saw one by one (u_i:
    what :attr:`Method.update_of` gives for reply i), ``total_weight`` = sum_i w_i (the rules'
    weights of the replies' sample counts), ``infos`` the replies' clear-text counts and losses,
    ``error`` a bound on each coordinate's distance from the exact mean (quantisation). For the
    mean rule this equals accepting every reply; the per-reply checks cannot run on a mean, so
    only what a mean of valid replies must satisfy is checked (MessageError if not; the state
    is left unchanged)."""

    def __call__(self, mean: Mapping[str, torch.Tensor], total_weight: float,
                 infos: Sequence[ReplyInfo], *, error: float = 0.0) -> None: ...


class UpdateOf(Protocol):
    """A device's side of secure aggregation: (context, the trained model, the download, the
    device's reply, the round) -> the reply's update as the server averages it (named float64
    tensors, the same names and shapes every round) and its clear-text counts (ReplyInfo)."""

    def __call__(self, ctx: MethodContext, model: torch.nn.Module, download: bytes,
                 reply: bytes, round_: int) -> tuple[dict[str, torch.Tensor], ReplyInfo]: ...


class Server(Protocol):
    name: str
    # -- optional capabilities (None when absent; read-only) ------------------------------
    @property
    def download_since(self) -> Callable[[int, int], bytes] | None:
        """(round, since) -> the download for a device holding the global model of round
        ``since``."""
        ...

    @property
    def evaluate(self) -> Evaluate | None:
        """Scores the run's product instead of the runner's standard evaluation of the model."""
        ...

    @property
    def target_met(self) -> Callable[[dict[str, float]], bool] | None:
        """A stopping rule over the round's scores."""
        ...

    @property
    def seed_steps(self) -> SeedSteps | None:
        """Server steps folded in as per-seed sums (FedKSeed)."""
        ...

    @property
    def set_global(self) -> Callable[[torch.nn.Module], None] | None:
        """Server steps folded in as weights: the model's trainable tensors become the global
        state."""
        ...

    @property
    def accept_mean(self) -> AcceptMean | None:
        """Secure aggregation: the round's mean of updates instead of its replies."""
        ...

    @property
    def device_share(self) -> object | None:
        """Read-only state simulated devices in the server's process may share (FedKSeed's w0
        and round-model cache): passed to the device factory as ``DeviceEnv.shared``."""
        ...

    def download(self, round_: int, client_id: int) -> bytes:
        """The message to ``client_id`` at the start of ``round_`` (after ``begin_round``)."""
        ...

    def begin_round(self, round_: int) -> None: ...

    def accept(self, payload: bytes) -> ReplyInfo:
        """Validate one reply and fold it into the round's aggregate (MessageError if bad;
        a rejected reply leaves the state unchanged)."""
        ...

    def end_round(self) -> None:
        """Turn the round's aggregate into the new global state."""
        ...

    def load_global(self, model: torch.nn.Module) -> None:
        """Put the current global model into ``model`` (for evaluation and export)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state a checkpoint must hold to resume."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """Write the global model as a directory transformers (or peft) loads; return it."""
        ...

    def close(self) -> None:
        """Release what the server holds outside the process (a spawned service)."""
        ...


class Device(Protocol):
    def round(self, model: torch.nn.Module, payload: bytes,
              examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        """Decode a download, train ``model`` in place on ``examples``, encode the reply."""
        ...

    def kept_round(self, round_: int) -> int:
        """After ``round(…, round_, …)``: the round whose global model this device keeps for a
        delta download (-1: none)."""
        ...


@dataclass(frozen=True)
class Method:
    """One registry row: everything an engine, the runner and a Flower node need of a method."""

    name: str
    summary: str  # what it is and what a device does, for the README table and --help
    traffic: str  # what travels each round
    sections: tuple[str, ...]  # the [algorithm.*] sub-tables it reads
    prepare: Callable[[MethodContext, torch.nn.Module], torch.nn.Module]
    """Make the base model the method's model (LoRA, prompt encoder, fp32): same on both sides."""
    server: Callable[[MethodContext, torch.nn.Module], Server]
    device: Callable[[MethodContext, torch.nn.Module, DeviceEnv], Device]
    update_of: UpdateOf | None = None
    """Secure aggregation (Flower engine): a reply's update; None: the method cannot aggregate
    securely (its server needs each reply)."""
