"""Client-level differential privacy: the ``[algorithm.dp]`` settings and the accountant.

The mechanism (DP-FedAvg, McMahan et al., ICLR 2018), applied by the server halves through
:class:`fedtune.algorithms.aggregate.Aggregator`: every client's update (FedKSeed: its K-vector
of per-seed sums; the other methods: its change to the trainable tensors) is clipped to L2 norm
C, the clipped updates are summed with equal weights, Gaussian noise N(0, (z C)^2 I) is added to
the sum, and the sum is divided by the number of replies. FedKSeed devices clip their own
K-vector too, so an honest reply already holds its bound; the server clips again regardless.

Accounting: each round samples m of the N clients without replacement, and one client's data
enters only through its own clipped update. Replacing one client's data moves the sum by at most
2C (two vectors of norm <= C), so under the replace-one relation each round is a Gaussian
mechanism of noise multiplier z / 2 on a sample without replacement, composed over the rounds:
``dp_accounting``'s RDP accountant (``SampledWithoutReplacementDpEvent``, ``REPLACE_ONE``)
gives (epsilon, delta). This is a client-level guarantee: it covers everything a client
contributes, all of its examples together.

The noise comes from its own seeded stream (``noise_seed``, per round), so a run is reproducible;
anyone who knows that seed can subtract the noise, so a real deployment must keep it secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedtune.configbase import check, option

log = logging.getLogger(__name__)


@dataclass
class DPConfig:
    noise_multiplier: float = option(
        0.0, "z: the Gaussian noise added to the sum of clipped client updates has standard "
             "deviation z * clip_norm. 0 turns differential privacy off.")
    clip_norm: float = option(
        1.0, "C: each client's update is clipped to this L2 norm (FedKSeed: its K-vector of "
             "per-seed sums of g; the others: the change to the trainable tensors).")
    delta: float = option(
        0.0, "delta of the reported (epsilon, delta); 0: 1 / num_clients^1.1, below 1/N as a "
             "meaningful delta must be.")
    target_epsilon: float = option(
        0.0, "Stop the run (and export) before a round would push epsilon past this; 0: never.")
    noise_seed: int = option(
        0, "Seed of the noise stream (reproducible runs). Whoever knows it can remove the noise: "
           "a real deployment must draw it at random and keep it secret.")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def validate(self, prefix: str) -> None:
        check(self.noise_multiplier >= 0, f"{prefix}.noise_multiplier", self.noise_multiplier,
              "must be >= 0 (0: off)")
        check(self.clip_norm > 0, f"{prefix}.clip_norm", self.clip_norm, "must be > 0")
        check(0 <= self.delta < 1, f"{prefix}.delta", self.delta, "must be in [0, 1)")
        check(self.target_epsilon >= 0, f"{prefix}.target_epsilon", self.target_epsilon,
              "must be >= 0 (0: no target)")
        check(self.noise_seed >= 0, f"{prefix}.noise_seed", self.noise_seed, "must be >= 0")

    def noise_std(self) -> float:
        """The standard deviation of the noise on the sum of clipped updates (0: off)."""
        return self.noise_multiplier * self.clip_norm if self.enabled else 0.0


class Accountant:
    """(epsilon, delta) of a run after each round, from ``dp_accounting``'s RDP accountant."""

    def __init__(self, noise_multiplier: float, num_clients: int, per_round: int,
                 delta: float = 0.0) -> None:
        if noise_multiplier <= 0 or not 1 <= per_round <= num_clients:
            raise ValueError(f"accountant needs z > 0 and 1 <= m <= N, got z = "
                             f"{noise_multiplier}, m = {per_round}, N = {num_clients}")
        import dp_accounting

        logging.getLogger("absl").setLevel(logging.ERROR)  # orders it cannot use: not news
        self.noise_multiplier = noise_multiplier
        self.delta = delta if delta > 0 else 1.0 / num_clients ** 1.1
        self._dpa = dp_accounting
        # replace-one sensitivity of the sum is 2C, its noise z C: an effective multiplier z / 2
        self._event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
        self._spent: dict[int, float] = {0: 0.0}  # rounds -> epsilon (0.2 s each to compute)

    def epsilon(self, rounds: int) -> float:
        """epsilon after ``rounds`` rounds at this accountant's delta (0 rounds: 0); each count
        is computed once (a run asks for round r's and, to decide whether to stop, r + 1's)."""
        rounds = max(rounds, 0)
        if rounds not in self._spent:
            acc = self._dpa.rdp.RdpAccountant(
                neighboring_relation=self._dpa.NeighboringRelation.REPLACE_ONE)
            acc.compose(self._event, rounds)
            self._spent[rounds] = float(acc.get_epsilon(self.delta))
        return self._spent[rounds]
