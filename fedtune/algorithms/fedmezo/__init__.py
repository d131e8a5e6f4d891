"""FedMeZO (FedIT's LoRA FedAvg, trained on the device by MeZO with fresh seeds): config.py
(knobs), device.py (τ ZO steps with fresh seeds, shared with FedZO), method.py (the registry row:
FedIT's server and LoRA wrapping, this device). The ZO maths itself lives in :mod:`fedtune.zo`.

Nothing is imported here: ``fedtune.algorithms.config`` imports :mod:`.config`, and importing the
method from this package's ``__init__`` would make that import circular.
"""
