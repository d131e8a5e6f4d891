"""FedMeZO (FedIT's LoRA FedAvg, trained on the device by MeZO with fresh seeds): config.py
(knobs), client.py (τ ZO steps), algorithm.py (the engine-facing glue, composing FedIT's LoRA
wrapping, server and wire format). The ZO maths itself lives in :mod:`fedtune.zo`.

Nothing is imported here: ``fedtune.algorithms.config`` imports :mod:`.config`, and importing the
algorithm from this package's ``__init__`` would make that import circular.
"""
