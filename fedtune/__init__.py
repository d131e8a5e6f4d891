"""fedtune: federated fine-tuning of language models for phones and edge boxes.

FedKSeed, FedKSeed-Pro, FedPT and the baselines they are judged against (FedIT, full FedAvg,
prompt tuning, FedMeZO), with one in-process engine and a Flower adapter over the same code.
"""

__version__ = "0.1.0"
