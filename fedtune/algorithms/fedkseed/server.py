"""The server side of FedKSeed / FedKSeed-Pro: per-seed accumulators and seed statistics.

Global state: A (K,) float32, the cumulative per-seed accumulators (never reset); the global
model is w0 − lr · Σ_j A_j z(s_j). Each round, over the replies that passed validation,

    A_j ← A_j + Σ_i w_i G_ij,   w_i = n_i / Σ_k n_k

with G_ij client i's sum of g for seed j (0 when untouched): a sample-weighted *mean*, not a sum.
With ``[algorithm.robust]`` / ``[algorithm.dp]`` each client's K-vector G_i is clipped to an L2
norm, combined by the configured rule (per seed) and noised (K-dimensional noise: the update
lives in R^K, not in the model's space); a round whose increment is not finite or longer than
``max_round_change`` is refused whole.
The increment is accumulated in float64 and A is rounded to float32 once per round, because the
float32 A is what travels and what defines the model. FedKSeed-Pro also folds every reply's
(Σ g, Σ|clip g|, count) into per-seed statistics (:mod:`.pro`) and recomputes the seed
probabilities once per round, in ``begin_round``. A round with no valid reply changes nothing.
With secure aggregation (Flower engine, FedKSeed only) the server gets just the round's mean of
the G_i (:meth:`FedKSeedServer._accept_mean`) and the Pro statistics are not updated.

The server half also holds w0 (a float32 copy of the trainable parameters, to evaluate and
export the global model w0 − lr · Σ_j A_j z(s_j)); a real server needs only the K numbers plus w0
on disk. Master weights are float32: the method's ``prepare`` upcasts a half-precision model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.algorithms.aggregate import Aggregator, Rules, refusal
from fedtune.algorithms.base import AcceptMean, Evaluate, MethodContext, ReplyInfo
from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedkseed.pro import initial_stats, seed_probabilities
from fedtune.algorithms.fedkseed.replay import RoundModel, seed_pool
from fedtune.algorithms.fedkseed.wire import Download, Reply
from fedtune.algorithms.params import trainable
from fedtune.wire import MessageError
from fedtune.zo.spec import ZSpec

log = logging.getLogger(__name__)
SEED_LOG = "fedkseed_seeds.json"


def z_state(z: ZSpec) -> torch.Tensor:
    """The checkpoint's record of the z: (generator, low-rank, rank)."""
    return torch.tensor([z.generator, int(z.lowrank), z.rank], dtype=torch.int64)


def check_possible(reply: Reply, tau: int, g_max: float) -> None:
    """Refuse a well-formed reply that ``tau`` steps (each |g| <= ``g_max`` when > 0) cannot
    have produced: more touched seeds than steps, Pro counts summing past tau, or per-seed sums
    beyond tau * g_max (one seed, or all together: sum_j |sum g_j| <= sum |g| <= tau g_max)."""
    n = int(reply.index.numel())
    if n > tau:
        raise MessageError(f"reply touches {n} seeds; {tau} steps touch at most {tau}")
    if reply.count is not None and int(reply.count.sum()) > tau:
        raise MessageError(f"reply counts {int(reply.count.sum())} steps; tau is {tau}")
    if g_max > 0:
        total = float(reply.sum_g.double().abs().sum())
        if total > tau * g_max * (1 + 1e-6):
            raise MessageError(f"reply's sums of g (sum of |sum g| = {total:.4g}) exceed what "
                               f"{tau} steps clipped to |g| <= {g_max:g} can give")


def dense_sums(reply: Reply, k_seeds: int) -> torch.Tensor:
    """G_i: the reply's per-seed sums of g as a dense (K,) float64 vector, 0 for untouched
    seeds (what the server aggregates; also a device's update under secure aggregation)."""
    g = torch.zeros(k_seeds, dtype=torch.float64)
    g[reply.index.long()] = reply.sum_g.double()
    return g


def update_of(ctx: MethodContext, model: torch.nn.Module, download: bytes, reply: bytes,
              round_: int) -> tuple[dict[str, torch.Tensor], ReplyInfo]:
    """Secure aggregation, on the device: its reply as the update ``{"g": G_i}`` (FedKSeed only:
    Pro's statistics need each reply)."""
    c = ctx.cfg.fedkseed
    got = Reply.decode(reply, c.k_seeds, False, c.clip, expect_round=round_, z=c.spec)
    check_possible(got, c.tau, c.g_max)
    return {"g": dense_sums(got, c.k_seeds)}, ReplyInfo(got.num_samples, got.train_loss)


class FedKSeedServer:
    """See :class:`fedtune.algorithms.base.Server`; also its own :class:`SeedSteps`."""

    evaluate: Evaluate | None = None
    target_met: Callable[[dict[str, float]], bool] | None = None
    set_global: Callable[[torch.nn.Module], None] | None = None

    def __init__(self, cfg: FedKSeedConfig, pro: bool, model: torch.nn.Module | None = None,
                 rules: Rules = Rules()) -> None:
        """``rules``: how a round's replies are weighted and combined."""
        self.cfg = cfg
        self.rules = rules
        self.pro = pro
        self.name = "fedkseed-pro" if pro else "fedkseed"
        self.pool = seed_pool(cfg.seed, cfg.k_seeds)
        self.lr, self.eps, self.z = cfg.lr, cfg.zo_eps, cfg.spec
        self.download_since = self._download_since
        self.seed_steps = self
        self.accept_mean: AcceptMean | None = None if pro else self._accept_mean
        params = trainable(model) if model is not None else {}
        self.param_names = list(params)
        self.round_model = RoundModel([p.detach().clone() for p in params.values()], self.pool,
                                      cfg.lr, z=cfg.spec)
        self.device_share = self.round_model
        k = cfg.k_seeds
        self.accumulators = torch.zeros(k, dtype=torch.float32)
        self.sum_g, self.sum_abs_clip, self.count = initial_stats(k)
        self.round = 0
        self._agg: Aggregator | None = None
        self._round_stats: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._download: bytes | None = None
        self._probs: torch.Tensor | None = None  # this round's, computed once in begin_round
        # A after each completed round (K floats a round), for devices that catch up from a
        # cached model; kept in memory only: after a resume such devices get a full download
        self.history: dict[int, torch.Tensor] = {0: self.accumulators.clone()}

    def probabilities(self) -> np.ndarray:
        """This round's seed probabilities (uniform for plain FedKSeed)."""
        if not self.pro:
            return np.full(self.cfg.k_seeds, 1.0 / self.cfg.k_seeds)
        return seed_probabilities(self.sum_abs_clip, self.count, self.cfg.temperature)

    def begin_round(self, round_: int) -> None:
        k = self.cfg.k_seeds
        self.round = round_
        self._agg = self.rules.aggregator(round_)
        self._round_stats = (np.zeros(k), np.zeros(k), np.zeros(k))
        self._probs = (torch.from_numpy(self.probabilities()).to(torch.float32) if self.pro
                       else None)
        # the same bytes go to every client of the round: encode once
        self._download = Download(round_, self.accumulators.clone(), self._probs,
                                  z=self.cfg.spec).encode()

    def download(self, round_: int, client_id: int = 0) -> bytes:
        """The round's download: A itself (the same bytes for every client)."""
        return self._download_since(round_, 0)

    def _download_since(self, round_: int, since: int) -> bytes:
        """The round's download for a device holding the model of round ``since`` (0: w0 only).

        Carries A itself for ``since = 0``, else ΔA = A − A_since (sparse when that is smaller).
        A ``since`` the server no longer knows (e.g. from before a resume) gets the full A.
        """
        if self._download is None or round_ != self.round:
            raise RuntimeError(f"download({round_}) outside round {self.round}")
        if since == 0 or since not in self.history:
            return self._download
        return Download(round_, self.accumulators - self.history[since], self._probs,
                        since, self.cfg.spec).encode()

    def accept(self, payload: bytes) -> ReplyInfo:
        """Validate (raises MessageError) before anything touches the aggregate."""
        if self._agg is None or self._round_stats is None:
            raise RuntimeError("accept() called outside a round")
        c = self.cfg
        reply = Reply.decode(payload, c.k_seeds, self.pro, c.clip, expect_round=self.round,
                             z=c.spec)
        check_possible(reply, c.tau, c.g_max)
        idx = reply.index.long().numpy()
        self._agg.add({"g": dense_sums(reply, c.k_seeds)}, self.rules.weight(reply.num_samples))
        sg, sa, cnt = self._round_stats
        sg[idx] += reply.sum_g.double().numpy()
        if reply.sum_abs_clip is not None and reply.count is not None:
            sa[idx] += reply.sum_abs_clip.double().numpy()
            cnt[idx] += reply.count.double().numpy()
        return ReplyInfo(reply.num_samples, reply.train_loss)

    def _accept_mean(self, mean: Mapping[str, torch.Tensor], total_weight: float,
                     infos: Sequence[ReplyInfo], *, error: float = 0.0) -> None:
        """Fold a securely aggregated round: ``mean`` = {"g": sum_i w_i G_i / sum_i w_i}.

        What each reply's check (:func:`check_possible`) implies for their mean is checked
        instead, each bound widened by the quantisation ``error`` per seed: finite, and with
        g_max > 0, |mean_j| <= tau g_max and sum_j |mean_j| <= tau g_max (a weighted mean of
        vectors inside that L1 ball is inside it).
        """
        if self._agg is None:
            raise RuntimeError("accept_mean() called outside a round")
        c = self.cfg
        why = self.rules.check_total([i.num_samples for i in infos], total_weight)
        if why is not None:
            raise MessageError(f"secure mean refused: {why}")
        g = mean.get("g")
        if set(mean) != {"g"} or g is None or tuple(g.shape) != (c.k_seeds,):
            raise MessageError(f"secure mean has tensors {sorted(mean)} of shapes "
                               f"{[tuple(t.shape) for t in mean.values()]}; expected g of "
                               f"shape ({c.k_seeds},)")
        g = g.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(g).all()):
            raise MessageError("secure mean holds non-finite values")
        if c.g_max > 0:
            bound = c.tau * c.g_max * (1 + 1e-6)
            top, total = float(g.abs().max()), float(g.abs().sum())
            if top > bound + error or total > bound + c.k_seeds * error:
                raise MessageError(f"secure mean (max |mean_j| = {top:.4g}, sum = {total:.4g})"
                                   f" exceeds what {c.tau} steps clipped to |g| <= {c.g_max:g}"
                                   " can give")
        self._agg.add({"g": g}, total_weight)

    def end_round(self) -> None:
        if self._agg is None or self._round_stats is None:
            raise RuntimeError("end_round() called outside a round")
        if self._agg.count == 0:
            log.warning("round %d: no valid reply, the global model stays as it was", self.round)
        elif isinstance(new := self._next_accumulators(self._agg), str):
            log.error("round %d refused whole: %s; the previous global model is kept",
                      self.round, new)
        else:
            self.accumulators = new
            sg, sa, cnt = self._round_stats
            self.sum_g, self.sum_abs_clip, self.count = (
                self.sum_g + sg, self.sum_abs_clip + sa, self.count + cnt)
        self.history[self.round] = self.accumulators.clone()
        self._agg, self._round_stats, self._download = None, None, None

    def _next_accumulators(self, agg: Aggregator) -> torch.Tensor | str:
        """The accumulators after this round, or why the round's increment must not commit."""
        if agg.clipped:
            log.info("round %d: %d of %d K-vectors clipped to L2 norm %g", self.round,
                     agg.clipped, agg.count, self.rules.clip)
        inc = agg.result()
        reason = refusal(inc, self.rules.max_change)
        new = (self.accumulators.double() + inc["g"]).to(torch.float32)
        if reason is None and not bool(torch.isfinite(new).all()):
            reason = "the accumulators would not be finite"
        return new if reason is None else reason

    def add_server_steps(self, sum_g: Mapping[int, float]) -> None:
        """Fold ZO steps the server itself took after ``end_round`` (FedPT's distillation, its
        seeds from the same pool) into A: A_j ← A_j + Σ g_j, so the devices' replay of A
        includes them. Pro statistics are left alone: they rank seeds by the devices' gradients.
        """
        if self._agg is not None:
            raise RuntimeError("add_server_steps() must come after end_round()")
        a = self.accumulators.double().numpy().copy()
        for j, g in sum_g.items():
            if not 0 <= j < self.cfg.k_seeds or not np.isfinite(g):
                raise ValueError(f"server step on seed index {j} with g = {g}")
            a[j] += g
        self.accumulators = torch.from_numpy(a).to(torch.float32)
        self.history[self.round] = self.accumulators.clone()

    # -- the global model ---------------------------------------------------------------------
    def load_global(self, model: torch.nn.Module) -> None:
        # by name, not by requires_grad: any copy of the architecture takes the global model
        named = dict(model.named_parameters())
        self.round_model.set_([named[n] for n in self.param_names], self.accumulators)

    def seed_log(self) -> dict[str, Any]:
        """Everything needed to rebuild the global model from w0 (float32 A as exact floats)."""
        return {"algorithm": self.name, **self.cfg.spec.describe(),
                "k_seeds": self.cfg.k_seeds, "lr": self.cfg.lr, "zo_eps": self.cfg.zo_eps,
                "run_seed": self.cfg.seed, "seed_pool": self.pool,
                "accumulators": [float(a) for a in self.accumulators.tolist()],
                "param_names": self.param_names,
                "formula": "w = w0 - lr * sum_j accumulators[j] * z(seed_pool[j]), z from "
                           "fedtune.zo (generator_version, perturbation, rank); "
                           "fedtune.algorithms.fedkseed.replay.rebuild_from_log replays it"}

    def export(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """Save the global model (save_pretrained) and the seed log next to it."""
        self.load_global(model)
        model_dir = out_dir / "model"
        model.save_pretrained(model_dir)  # type: ignore[operator]
        tokenizer.save_pretrained(model_dir)
        (out_dir / SEED_LOG).write_text(json.dumps(self.seed_log()))
        return model_dir

    def close(self) -> None:
        pass

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"accumulators": self.accumulators.clone(),
                "pro_sum_g": torch.from_numpy(self.sum_g.copy()),
                "pro_sum_abs_clip": torch.from_numpy(self.sum_abs_clip.copy()),
                "pro_count": torch.from_numpy(self.count.copy()),
                "seed_pool": torch.tensor(self.pool, dtype=torch.int64),
                "z_spec": z_state(self.cfg.spec)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pool = state.get("seed_pool")
        if pool is None or pool.tolist() != self.pool:
            raise ValueError("checkpoint seed pool differs from this config's "
                             "(algorithm.fedkseed.seed / k_seeds changed?)")
        got = state.get("z_spec", z_state(ZSpec(1)))  # checkpoints before versions: generator 1
        if not torch.equal(got, z_state(self.cfg.spec)):
            g, low, r = got.tolist()
            raise ValueError(f"checkpoint was made with z generator {g}, "
                             f"{'low-rank r ' + str(r) if low else 'dense'}; this config has "
                             f"{self.cfg.spec} (algorithm.fedkseed.generator / perturbation / "
                             "rank changed?)")
        k = self.cfg.k_seeds
        for name in ("accumulators", "pro_sum_g", "pro_sum_abs_clip", "pro_count"):
            if name not in state or tuple(state[name].shape) != (k,):
                raise ValueError(f"checkpoint tensor {name!r} is missing or not of shape ({k},)")
        self.accumulators = state["accumulators"].to(torch.float32).clone()
        self.sum_g = state["pro_sum_g"].double().numpy().copy()
        self.sum_abs_clip = state["pro_sum_abs_clip"].double().numpy().copy()
        self.count = state["pro_count"].double().numpy().copy()
