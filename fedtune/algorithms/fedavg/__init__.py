"""FedAvg (full parameters) and FedIT (LoRA): client.py (local loop), server.py (weighted mean),
wire.py (messages), algorithm.py (the engine-facing glue)."""

from fedtune.algorithms.fedavg.algorithm import FedAvg

__all__ = ["FedAvg"]
