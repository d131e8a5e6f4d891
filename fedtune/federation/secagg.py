"""Secure aggregation without Flower: the SecAgg+ parameters a run asks for, the precision they
give, what a device hands the protocol, and the runs it cannot serve.

Flower's SecAgg+ (Bell et al., CCS 2020; ``flwr.server.workflow.SecAggPlusWorkflow`` with
``flwr.client.mod.secaggplus_mod``) sums integer vectors under pairwise masks that cancel in the
sum. Device i, with weight w_i (1, or its sample count capped at W = max_weight) and update x_i,
sends, masked modulo M = 2^32,

    q_i = SR((clip(r_i x_i, -c, c) + c) Q / 2c)   and   r_i Q,   r_i = round(Q w_i / W) / Q

(c: clipping range, Q: quantisation range, SR: stochastic rounding to an integer); the server
unmasks only the sums and gets

    mean = (sum_i q_i 2c/Q - m c) / sum_i r_i  ~  sum_i w_i x_i / sum_i w_i.

Stochastic rounding moves each q_i by less than one step s = 2c/Q and the weights' rounding adds
at most half of that again, so each coordinate is within 1.5 m s / sum_i r_i of the exact
weighted mean (:meth:`SecAggParams.error`; 1.5 s with equal weights, W = 1). No sum may wrap:
m Q < M, and w_i <= W. Values beyond +-c would be clipped silently by Flower; here the device
clips them itself and logs how many (:func:`device_update`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedtune.algorithms import METHODS
from fedtune.algorithms.aggregate import clip_l2
from fedtune.algorithms.base import ReplyInfo
from fedtune.configbase import ConfigError

if TYPE_CHECKING:
    from fedtune.config import RunConfig

log = logging.getLogger(__name__)
MODULUS = 1 << 32  # Flower's default and largest modulus_range
TENSOR_CLIP = 8.0  # Flower's default clipping_range, for updates of trained tensors


@dataclass(frozen=True)
class SecAggParams:
    """What ``SecAggPlusWorkflow`` is built with, and the weights devices claim."""

    clipping_range: float
    quantization_range: int
    max_weight: float  # W: 1 with equal weights, else the sample cap
    num_shares: float
    reconstruction_threshold: float
    equal: bool  # algorithm.weighting == "equal"

    @property
    def step(self) -> float:
        """One quantisation level, 2c / Q."""
        return 2 * self.clipping_range / self.quantization_range

    def weight(self, num_samples: int) -> int:
        """A device's weight in the mean (what it puts in ``num_examples``)."""
        return 1 if self.equal else min(num_samples, int(self.max_weight))

    def error(self, weights: Sequence[float]) -> float:
        """A bound on each coordinate's distance from the exact weighted mean."""
        ratios = sum(w / self.max_weight for w in weights)
        return 1.5 * len(weights) * self.step / ratios if ratios > 0 else float("inf")


def params_of(cfg: RunConfig) -> SecAggParams:
    fed, alg = cfg.federation, cfg.algorithm
    clip = fed.secagg_clipping_range or (
        alg.fedkseed.tau * alg.fedkseed.g_max if alg.name == "fedkseed" else TENSOR_CLIP)
    equal = alg.weighting == "equal"
    return SecAggParams(clip, fed.secagg_quantization_range,
                        1.0 if equal else float(alg.max_sample_weight), fed.secagg_num_shares,
                        fed.secagg_reconstruction_threshold, equal)


def check_config(cfg: RunConfig) -> None:
    """Refuse (ConfigError) a run with ``federation.secure_aggregation`` that SecAgg+ cannot
    serve: the server then sees only a quantised weighted mean, never a reply."""
    fed, alg = cfg.federation, cfg.algorithm
    why = "federation.secure_aggregation = true"
    secure = [m.name for m in METHODS.values() if m.update_of is not None]
    if METHODS[alg.name].update_of is None:
        raise ConfigError("algorithm.name", alg.name, f"cannot aggregate securely (its server "
                          f"needs each reply: FedKSeed-Pro's seed statistics, FedPT's server "
                          f"steps...); use one of {secure} with {why}")
    if alg.robust.aggregation != "mean":
        raise ConfigError("algorithm.robust.aggregation", alg.robust.aggregation,
                          f"must be 'mean' with {why}: a per-coordinate rule needs every reply")
    if alg.weighting == "samples" and alg.max_sample_weight <= 0:
        raise ConfigError("algorithm.max_sample_weight", alg.max_sample_weight,
                          f"must be > 0 with weighting = 'samples' and {why}: weights are "
                          "quantised "
                          "relative to the cap and an uncapped claim could overflow the sums "
                          "(or use weighting = 'equal')")
    if alg.name == "fedkseed" and alg.fedkseed.g_max <= 0:
        raise ConfigError("algorithm.fedkseed.g_max", alg.fedkseed.g_max,
                          f"must be > 0 with {why}: tau * g_max bounds each per-seed sum, so it "
                          "sets "
                          "the clipping range and the server's check of the mean")
    m = fed.clients_in_round(cfg.data.num_clients)
    key = "client_fraction" if fed.client_fraction > 0 else "clients_per_round"
    if m < 2:
        raise ConfigError(f"federation.{key}", getattr(fed, key),
                          f"gives {m} client per round; SecAgg+ needs at least 2 ({why})")
    if m * fed.secagg_quantization_range >= MODULUS:
        raise ConfigError("federation.secagg_quantization_range", fed.secagg_quantization_range,
                          f"times {m} clients per round must stay below 2^32 (the modulus the "
                          "quantised sums live in)")


@dataclass(frozen=True)
class DeviceUpdate:
    """What a device hands SecAgg+: its update's arrays in sorted-name order, its weight, and
    the counts that travel in clear."""

    names: list[str]
    arrays: list[np.ndarray]
    weight: int
    info: ReplyInfo


def device_update(update: Mapping[str, torch.Tensor], info: ReplyInfo, params: SecAggParams,
                  l2_clip: float = 0.0) -> DeviceUpdate:
    """The device's update for SecAgg+: clipped to L2 norm ``l2_clip`` when > 0 (the rules'
    update clip: the server cannot clip one reply any more), then each value to
    [-c, c] (counted and logged; Flower would clip silently), float64 in sorted-name order."""
    if l2_clip > 0:
        update = clip_l2(update, l2_clip)[0]
    c = params.clipping_range
    names = sorted(update)
    arrays = [update[k].detach().to("cpu", torch.float64).numpy() for k in names]
    outside = sum(int((np.abs(a) > c).sum()) for a in arrays)
    if outside:
        log.warning("%d of %d values of this update are beyond the secure-aggregation clipping "
                    "range +-%g and are clipped to it (federation.secagg_clipping_range)",
                    outside, sum(a.size for a in arrays), c)
        arrays = [np.clip(a, -c, c) for a in arrays]
    return DeviceUpdate(names, arrays, params.weight(info.num_samples), info)
