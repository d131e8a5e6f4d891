"""The server half of the methods that send trainable tensors: FedAvg, FedIT, FedMeZO, FedZO,
FedPrompt and FedPTuning.

Global state: theta (all parameters for full FedAvg, the LoRA matrices for FedIT, the virtual
tokens' parameters for the prompt methods). Each round, over the replies that passed validation,

    theta <- sum_i (n_i / sum_k n_k) theta_i          (replies carry trained tensors)
    theta <- theta + sum_i (n_i / sum_k n_k) d_i      (``delta``: replies carry differences, FedZO)

folded in as they arrive (:class:`fedtune.algorithms.aggregate.Aggregator`). A round with no
valid reply keeps theta unchanged.

With any of ``[algorithm.robust]`` / ``[algorithm.dp]`` the server works on updates instead:
u_i = theta_i - theta (or d_i), each clipped to L2 norm C, combined by the configured rule (and
noised), theta <- theta + U; a U that is not finite or longer than ``max_round_change`` is
refused whole and theta kept.

Under the mean without a clip (the papers' rule by default) the server also notes each
reply's own update size ||theta_i - theta|| (or ||d_i||) and refuses a round whose move is
longer than ``max_change_over_median`` times their lower median: the papers' arithmetic is
unchanged, but one reply of 1e6 on every value can no longer poison the global tensors so that
every later round fails.

With secure aggregation (Flower engine) the server receives only the round's weighted mean of
the updates u_i (trained tensors minus the download; :func:`update_of`) and folds theta + mean
as the one entry of the round, which is the same theta as the mean of the trained tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from fedtune.algorithms.aggregate import Aggregator, Rules, l2_norm, outlier_refusal, refusal
from fedtune.algorithms.base import AcceptMean, Evaluate, MethodContext, ReplyInfo, SeedSteps
from fedtune.algorithms.fedavg.wire import Download, Reply
from fedtune.algorithms.params import load_into, trainable
from fedtune.wire import MessageError, TensorSpec

log = logging.getLogger(__name__)
Export = Literal["model", "lora", "adapter"]


def update_of(ctx: MethodContext, model: torch.nn.Module, download: bytes, reply: bytes,
              round_: int) -> tuple[dict[str, torch.Tensor], ReplyInfo]:
    """Secure aggregation, on the device: the reply's trained tensors minus the download's
    (float64). Their mean plus theta is the plain path's mean of the trained tensors, and a
    change is small and centred, so a narrow clipping range quantises it finely."""
    spec = TensorSpec.of(trainable(model))
    down = Download.decode(download, spec)
    got = Reply.decode(reply, spec, expect_round=round_)
    update = {k: t.double() - down.tensors[k].double() for k, t in got.tensors.items()}
    return update, ReplyInfo(got.num_samples, got.train_loss)


class FedAvgServer:
    """See :class:`fedtune.algorithms.base.Server`.

    ``export``: 'model' saves the whole model; 'lora' the adapter (``adapter/``) and the merged
    model (``model/``); 'adapter' only the peft adapter (``adapter/``, the prompt methods, whose
    virtual tokens cannot be merged into the weights).
    """

    download_since: Callable[[int, int], bytes] | None = None
    evaluate: Evaluate | None = None
    target_met: Callable[[dict[str, float]], bool] | None = None
    seed_steps: SeedSteps | None = None
    device_share: object | None = None

    def __init__(self, name: str, initial: Mapping[str, torch.Tensor], *,
                 export: Export = "model", delta: bool = False,
                 rules: Rules = Rules()) -> None:
        """``initial``: the trainable tensors by name (``trainable(prepared model)``);
        ``rules``: how a round's replies are weighted and combined."""
        self.name = name
        self.theta = {k: v.detach().to("cpu").clone() for k, v in initial.items()}
        self.spec = TensorSpec.of(self.theta)
        self.export_kind: Export = export
        self.delta = delta
        self.rules = rules
        self.updates = delta or not rules.plain  # aggregate changes, not trained tensors
        self.round = 0
        self._agg: Aggregator | None = None
        self._sizes: list[float] = []  # this round's update norms (rules.watches_sizes)
        self.set_global = self._set_global
        self.accept_mean: AcceptMean | None = self._accept_mean

    def download(self, round_: int, client_id: int) -> bytes:
        return Download(round_, self.theta).encode()

    def begin_round(self, round_: int) -> None:
        self.round = round_
        self._agg = self.rules.aggregator(round_)
        self._sizes = []

    def accept(self, payload: bytes) -> ReplyInfo:
        """Validate (raises MessageError) before anything touches the aggregate."""
        if self._agg is None:
            raise RuntimeError("accept() called outside a round")
        reply = Reply.decode(payload, self.spec, expect_round=self.round)
        tensors = reply.tensors
        if self.updates and not self.delta:
            tensors = {k: t.double() - self.theta[k].double() for k, t in tensors.items()}
            if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
                raise MessageError("the reply's change to the global tensors is not finite")
        if self.rules.watches_sizes:
            self._sizes.append(l2_norm(tensors) if self.updates else self._distance(tensors))
        self._agg.add(tensors, self.rules.weight(reply.num_samples))
        return ReplyInfo(reply.num_samples, reply.train_loss)

    def _accept_mean(self, mean: Mapping[str, torch.Tensor], total_weight: float,
                     infos: Sequence[ReplyInfo], *, error: float = 0.0) -> None:
        """Fold a securely aggregated round: ``mean`` = sum_i w_i u_i / sum_i w_i of the
        replies' changes u_i (the differences themselves for ``delta`` methods). Checked: its
        weight, names, shapes and finiteness; ``end_round`` then applies the round's bounds."""
        if self._agg is None:
            raise RuntimeError("accept_mean() called outside a round")
        why = self.rules.check_total([i.num_samples for i in infos], total_weight)
        if why is not None:
            raise MessageError(f"secure mean refused: {why}")
        shapes = {k: tuple(v.shape) for k, v in mean.items()}
        if shapes != {k: tuple(v.shape) for k, v in self.theta.items()}:
            raise MessageError(f"secure mean's tensors {shapes} do not match the global ones")
        update = {k: v.detach().to("cpu", torch.float64) for k, v in mean.items()}
        if not all(bool(torch.isfinite(t).all()) for t in update.values()):
            raise MessageError("secure mean holds non-finite values")
        self._agg.add(update if self.updates else
                      {k: self.theta[k].double() + u for k, u in update.items()}, total_weight)

    def end_round(self) -> None:
        if self._agg is None:
            raise RuntimeError("end_round() called outside a round")
        if self._agg.count == 0:
            log.warning("round %d: no valid reply, the global model stays as it was", self.round)
        else:
            if self._agg.clipped:
                log.info("round %d: %d of %d updates clipped to L2 norm %g", self.round,
                         self._agg.clipped, self._agg.count, self.rules.clip)
            self._commit(self._agg.result())
        self._agg = None

    def _commit(self, agg: dict[str, torch.Tensor]) -> None:
        """Make the round's aggregate (an update, or the mean of the trained tensors) the new
        theta, unless it is not finite or moves theta past the bound: then refuse it whole."""
        move = l2_norm(agg) if self.updates else None
        reason = refusal(agg, self.rules.max_change, move) if self.updates else None
        if reason is None and self._sizes:
            move = self._distance(agg) if move is None else move
            reason = outlier_refusal(move, self._sizes, self.rules.outlier_factor)
        new = ({k: (v.double() + agg[k]).to(v.dtype) for k, v in self.theta.items()}
               if self.updates else {k: v.to(self.theta[k].dtype) for k, v in agg.items()})
        if reason is None and not all(bool(torch.isfinite(v).all()) for v in new.values()):
            reason = "the new global tensors are not finite"
        if reason is not None:
            log.error("round %d refused whole: %s; the previous global model is kept",
                      self.round, reason)
            return
        self.theta = new

    def _distance(self, tensors: Mapping[str, torch.Tensor]) -> float:
        """||tensors - theta|| (L2, float64), one tensor at a time."""
        return math.sqrt(sum(float((t.double() - self.theta[k].double()).pow(2).sum())
                             for k, t in tensors.items()))

    def _set_global(self, model: torch.nn.Module) -> None:
        self.theta = {n: p.detach().to("cpu").clone() for n, p in trainable(model).items()}

    def load_global(self, model: torch.nn.Module) -> None:
        load_into(trainable(model), self.theta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.theta)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.theta):
            raise ValueError("checkpoint tensors do not match this model's trainable parameters")
        self.theta = {k: v.clone() for k, v in state.items()}

    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        self.load_global(model)
        if self.export_kind != "model":
            adapter_dir = out_dir / "adapter"
            model.save_pretrained(adapter_dir)  # type: ignore[operator]
            tokenizer.save_pretrained(adapter_dir)
            if self.export_kind == "adapter":
                return adapter_dir
            model = model.merge_and_unload()  # type: ignore[operator]
        model_dir = out_dir / "model"
        model.save_pretrained(model_dir)  # type: ignore[operator]
        tokenizer.save_pretrained(model_dir)
        return model_dir

    def close(self) -> None:
        pass
