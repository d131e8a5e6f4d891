"""Config of the federation concern: rounds, client sampling, engine."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, check_choices, option

ENGINES = ("inprocess",)


@dataclass
class FederationConfig:
    rounds: int = option(10, "Communication rounds.")
    clients_per_round: int = option(
        4, "Clients sampled per round (uniformly without replacement, seeded by round)."
    )
    client_fraction: float = option(
        0.0,
        "If > 0, sample this share of all clients per round instead (FedKSeed: 0.05), at least 1; "
        "overrides clients_per_round.",
    )
    seed: int = option(
        0, "Seed of client sampling and of every client's local randomness (batches, dropout)."
    )
    engine: str = option(
        "inprocess",
        "Engine: 'inprocess' runs the whole federation in this process, clients one after "
        "another on one shared model, every message encoded to bytes and decoded again.",
        ENGINES,
    )

    def validate(self, prefix: str = "federation") -> None:
        check_choices(self, prefix)
        check(self.rounds >= 1, f"{prefix}.rounds", self.rounds, "must be >= 1")
        check(self.clients_per_round >= 1, f"{prefix}.clients_per_round",
              self.clients_per_round, "must be >= 1")
        check(0.0 <= self.client_fraction <= 1.0, f"{prefix}.client_fraction",
              self.client_fraction, "must be in [0, 1]")

    def clients_in_round(self, num_clients: int) -> int:
        """How many clients a round samples out of ``num_clients``."""
        if self.client_fraction > 0:
            return max(1, round(self.client_fraction * num_clients))
        return self.clients_per_round
