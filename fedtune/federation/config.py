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

    def clients_in_round(self, num_clients: int) -> int:
        """How many clients a round samples out of ``num_clients``."""
        if self.client_fraction > 0:
            return max(1, round(self.client_fraction * num_clients))
        return self.clients_per_round
