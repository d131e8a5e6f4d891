"""The device half of FedKSeed / FedKSeed-Pro: rebuild the round's model, τ zeroth-order steps
with seeds from the pool, reply with per-seed sums.

A device holds w0 (the base model) and rebuilds the round's model from the K accumulators it
downloads (:class:`.replay.RoundModel`), so the model it trains from equals the server's global
model bit for bit. A device with a cache folder (a Flower SuperNode with
``federation.delta_downloads``) keeps the model it last trained from and applies only the
change ΔA since then (the paper's incremental rebuild, :func:`.replay.catch_up_`).

Each step draws a pool index j (uniformly, or from the Pro probabilities p), takes one two-point
ZO step with z(s_j) (:func:`fedtune.zo.zo_step`) and records g against j. The device keeps, per
touched seed, Σ g (what the server aggregates) and, for Pro, Σ|clip(g)| and the count; everything
else (the trained weights included) is discarded. Seed indices and batches come from the client
seed only (:mod:`fedtune.seeds`), so a round replays exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedtune import seeds
from fedtune.algorithms.aggregate import clip_l2
from fedtune.algorithms.base import DeviceEnv
from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedkseed.pro import clipped_abs
from fedtune.algorithms.fedkseed.replay import FileWeights, RoundModel, catch_up_, seed_pool
from fedtune.algorithms.fedkseed.wire import Download, Reply
from fedtune.algorithms.local import run_steps, to_device
from fedtune.algorithms.params import trainable
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.wire import MessageError
from fedtune.zo.spec import DEFAULT_Z, ZSpec
from fedtune.zo.step import KeptZ, zo_step

log = logging.getLogger(__name__)


@dataclass
class SeedStats:
    """Per touched pool index: Σ g, Σ |clip g|, count (float64 sums on the device)."""

    sum_g: dict[int, float] = field(default_factory=dict)
    sum_abs_clip: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)

    def add(self, j: int, g: float, clip: float) -> None:
        self.sum_g[j] = self.sum_g.get(j, 0.0) + g
        self.sum_abs_clip[j] = self.sum_abs_clip.get(j, 0.0) + clipped_abs(g, clip)
        self.count[j] = self.count.get(j, 0) + 1


def draw_seed_indices(k_seeds: int, tau: int, seed: int,
                      probs: np.ndarray | None = None) -> list[int]:
    """τ pool indices from the client seed: uniform, or from ``probs`` (renormalised in float64)."""
    rng = seeds.rng(seed, "seed-indices")
    if probs is None:
        return [int(j) for j in rng.integers(0, k_seeds, size=tau)]
    p = np.asarray(probs, dtype=np.float64)
    return [int(j) for j in rng.choice(k_seeds, size=tau, p=p / p.sum())]


def local_zo_train(model: torch.nn.Module, params: Sequence[torch.Tensor], pool: Sequence[int],
                   examples: Sequence[TokenizedExample], *, tau: int, batch_size: int,
                   eps: float, lr: float, clip: float, pad_id: int, seed: int,
                   probs: np.ndarray | None = None, keep_z: bool = False, g_max: float = 0.0,
                   z: ZSpec = DEFAULT_Z) -> tuple[SeedStats, float, int]:
    """τ ZO-SGD steps on ``params`` in place; return (per-seed stats, mean loss, skipped steps).

    ``keep_z`` trades one float32 copy of ``params`` for two fewer generations of z per step.
    ``g_max`` > 0 clips each projected gradient to [-g_max, g_max] before the update and the
    sums (bounded influence; the server checks the sums against it).
    """
    indices = draw_seed_indices(len(pool), tau, seed, probs)
    stats = SeedStats()
    # keep_z: z kept, each step's last move made as the next step draws its z (settled below)
    kept = KeptZ(params) if keep_z and not z.lowrank else None

    def step(i: int, batch: dict[str, torch.Tensor]) -> float | None:
        taken = zo_step(model, params, to_device(batch, model), pool[indices[i]], eps, lr,
                        g_max=g_max, spec=z, kept=kept)
        if taken is None:
            return None
        stats.add(indices[i], taken.g, clip)
        return taken.loss

    try:
        res = run_steps(model, examples, steps=tau, batch_size=batch_size, seed=seed,
                        collate=lambda b: collate(b, pad_id), step=step, train_mode=False,
                        what="ZO")
    finally:
        if kept is not None:
            kept.settle()
    return stats, res.loss, res.skipped


class FedKSeedDevice:
    """See :class:`fedtune.algorithms.base.Device`."""

    def __init__(self, cfg: FedKSeedConfig, pro: bool, pad_id: int, model: torch.nn.Module,
                 env: DeviceEnv, shared: RoundModel | None = None,
                 update_clip: float = 0.0) -> None:
        """``update_clip`` > 0: scale the reply's vector of per-seed sums to at most that L2
        norm (the bound the server clips to anyway; differential privacy needs an honest
        device to hold it itself)."""
        self.cfg, self.pro, self.pad_id = cfg, pro, pad_id
        self.update_clip = update_clip
        self.param_names = list(trainable(model))
        if shared is not None:  # in process: the server's w0 and round-model cache
            self.round_model = shared
        else:
            pool = seed_pool(cfg.seed, cfg.k_seeds)
            w0: Sequence[torch.Tensor] = (
                FileWeights(env.w0_dir, self.param_names) if env.w0_dir is not None
                else [p.detach().clone() for p in trainable(model).values()])
            self.round_model = RoundModel(w0, pool, cfg.lr, cache=not env.one_client,
                                          z=cfg.spec)
        self.pool = self.round_model.pool
        self.cache_dir = env.cache_dir

    def round(self, model: torch.nn.Module, payload: bytes,
              examples: Sequence[TokenizedExample], round_: int, seed: int) -> bytes:
        c = self.cfg
        down = Download.decode(payload, c.k_seeds, self.pro, expect_round=round_, z=c.spec)
        params = list(trainable(model).values())
        if down.since != 0:  # the cached model of round `since`, moved on by ΔA
            self._load_cached(params, down.since)
            catch_up_(params, self.pool, down.accumulators, c.lr, c.spec)
        else:  # the device's model of this round: w0 and the K accumulators, nothing else
            self.round_model.set_(params, down.accumulators)
        if self.cache_dir is not None:
            self._save_cached(params, round_ - 1)
        probs = down.probs.double().numpy() if down.probs is not None else None
        stats, loss, _ = local_zo_train(
            model, params, self.pool, examples, tau=c.tau, batch_size=c.batch_size,
            eps=c.zo_eps, lr=c.lr, clip=c.clip, pad_id=self.pad_id, seed=seed, probs=probs,
            keep_z=c.keep_z, g_max=c.g_max, z=c.spec)
        if not stats.count:
            raise RuntimeError("every ZO step had a non-finite loss")
        idx = sorted(stats.count)
        sums = torch.tensor([stats.sum_g[j] for j in idx], dtype=torch.float64)
        if self.update_clip > 0:
            sums = clip_l2({"g": sums}, self.update_clip)[0]["g"]
        reply = Reply(round_, len(examples), loss, torch.tensor(idx, dtype=torch.int32),
                      sums.to(torch.float32), z=c.spec)
        if self.pro:
            reply.sum_abs_clip = torch.tensor([stats.sum_abs_clip[j] for j in idx],
                                              dtype=torch.float32)
            reply.count = torch.tensor([stats.count[j] for j in idx], dtype=torch.int32)
        if not torch.isfinite(reply.sum_g).all():
            raise MessageError("a seed's sum of g overflows float32")
        return reply.encode(c.k_seeds)

    def kept_round(self, round_: int) -> int:
        return round_ - 1 if self.cache_dir is not None else -1

    # -- the device's cache (delta downloads) -------------------------------------------------
    def _cache_file(self, round_: int) -> Path:
        if self.cache_dir is None:
            raise MessageError("a download of the change since an earlier round needs a cached "
                               "model; this device holds only w0")
        return self.cache_dir / f"fedkseed-round-{round_:06d}.safetensors"

    def _load_cached(self, params: Sequence[torch.Tensor], since: int) -> None:
        path = self._cache_file(since)
        if not path.is_file():
            raise MessageError(f"download of the change since round {since}, but this device "
                               f"does not hold that round's model ({path})")
        with safe_open(str(path), "pt") as f, torch.no_grad():
            for name, p in zip(self.param_names, params, strict=True):
                p.copy_(f.get_tensor(name))

    def _save_cached(self, params: Sequence[torch.Tensor], round_: int) -> None:
        """Keep the model of ``round_`` (this round's start) for a later ΔA download.

        The previous one is kept too: the server only learns what a device holds from its
        reply, so after a reply that never arrived it still sends the change since the older.
        """
        path = self._cache_file(round_)
        tmp = path.with_name(path.name + ".tmp")
        save_file({n: p.detach().contiguous() for n, p in zip(self.param_names, params,
                                                               strict=True)}, str(tmp))
        os.replace(tmp, path)
        held = sorted(path.parent.glob("fedkseed-round-*.safetensors"))
        for old in held[:-2]:
            old.unlink()
