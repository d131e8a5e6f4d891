"""Config of the federation concern: rounds, client sampling, waiting for devices."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, check_choices, option


@dataclass
class FederationConfig:
    rounds: int = option(4, "Communication rounds.")
    clients_per_round: int = option(
        2, "Clients sampled per round (uniformly without replacement, seeded by round)."
    )
    client_fraction: float = option(
        0.0,
        "If > 0, sample this share of all clients per round instead (FedKSeed: 0.05), at least 1; "
        "overrides clients_per_round.",
    )
    seed: int = option(
        0, "Seed of client sampling and of every client's local randomness (batches, dropout)."
    )
    min_replies: int = option(
        1,
        "Flower engine: a round needs at least this many replies within reply_timeout_s; with "
        "fewer the run stops after its last completed round (resume it later). Replies that "
        "arrive are aggregated, sampled devices that stay silent count as failed.",
    )
    reply_timeout_s: float = option(
        600.0,
        "Flower engine: seconds a round waits for the sampled devices' replies before it "
        "aggregates those that arrived.",
    )
    delta_downloads: bool = option(
        False,
        "Flower engine, FedKSeed: each SuperNode keeps the model it last trained from in its "
        "cache and downloads only the accumulators' change since then (the paper's ΔA; sparse, "
        "fewer bytes, a missed round is caught up by replay). Equal to the full rebuild up to "
        "float32 rounding, so not bit for bit; off, every download carries all K accumulators "
        "and nodes rebuild from w0, exactly as in process.",
    )
    node_wait_s: float = option(
        300.0,
        "Flower engine: seconds the server waits at start for a SuperNode holding every "
        "partition (then it starts with those present; a missing one counts as failed).",
    )
    secure_aggregation: bool = option(
        False,
        "Flower engine (fedkseed, fedit, fedavg): aggregate with Flower's SecAgg+, so the server "
        "learns only the weighted mean of the replies' updates, never one of them (sample "
        "counts and train losses still travel in clear). The mean is quantised: equal to the "
        "plain path's within a few steps of 2 * secagg_clipping_range / "
        "secagg_quantization_range per value, not bit for bit. Needs >= 2 clients per round, "
        "robust.aggregation = 'mean', a max_sample_weight with 'samples' weighting and, for "
        "FedKSeed, fedkseed.g_max > 0.",
    )
    secagg_clipping_range: float = option(
        0.0,
        "SecAgg+: every value a device sends is clipped to [-range, range] before it is "
        "quantised (a device logs each value it clips). 0: FedKSeed tau * g_max, the largest "
        "per-seed sum tau clipped steps can give (nothing is clipped); the others 8.0, Flower's "
        "default, for their updates (trained tensors minus the download).",
    )
    secagg_quantization_range: int = option(
        1 << 22,
        "SecAgg+: values are rounded (stochastically) to this many levels over the clipping "
        "range; with the 2^32 modulus, clients per round * this must stay below 2^32.",
    )
    secagg_num_shares: float = option(
        1.0,
        "SecAgg+: the share of the round's devices each device's secrets are split among "
        "(Flower's num_shares as a fraction; 1.0: all of them, below: SecAgg+'s neighbours, "
        "cheaper for large rounds).",
    )
    secagg_reconstruction_threshold: float = option(
        0.6,
        "SecAgg+: the share of those shares needed to rebuild a device's secrets (at least 2): "
        "higher resists more devices colluding with the server, lower survives more dropouts "
        "during training.",
    )

    def validate(self, prefix: str = "federation") -> None:
        check_choices(self, prefix)
        check(self.rounds >= 1, f"{prefix}.rounds", self.rounds, "must be >= 1")
        check(self.clients_per_round >= 1, f"{prefix}.clients_per_round",
              self.clients_per_round, "must be >= 1")
        check(0.0 <= self.client_fraction <= 1.0, f"{prefix}.client_fraction",
              self.client_fraction, "must be in [0, 1]")
        check(self.min_replies >= 1, f"{prefix}.min_replies", self.min_replies, "must be >= 1")
        for key in ("reply_timeout_s", "node_wait_s"):
            check(getattr(self, key) > 0, f"{prefix}.{key}", getattr(self, key), "must be > 0")
        check(self.secagg_clipping_range >= 0, f"{prefix}.secagg_clipping_range",
              self.secagg_clipping_range, "must be >= 0 (0: the method's default)")
        check(2 <= self.secagg_quantization_range < 1 << 31, f"{prefix}.secagg_quantization_range",
              self.secagg_quantization_range,
              "must be in [2, 2^31) (Flower rounds the levels into int32)")
        for key in ("secagg_num_shares", "secagg_reconstruction_threshold"):
            check(0 < getattr(self, key) <= 1, f"{prefix}.{key}", getattr(self, key),
                  "must be in (0, 1]")

    def clients_in_round(self, num_clients: int) -> int:
        """How many clients a round samples out of ``num_clients``."""
        if self.client_fraction > 0:
            return max(1, round(self.client_fraction * num_clients))
        return self.clients_per_round
