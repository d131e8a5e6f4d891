"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024): config.py (knobs), pro.py (seed
probabilities), wire.py (messages), server.py (per-seed accumulators), client.py (τ ZO steps),
algorithm.py (the engine-facing glue). The ZO maths itself lives in :mod:`fedtune.zo`.

Nothing is imported here: ``fedtune.algorithms.config`` imports :mod:`.config`, and importing the
algorithm from this package's ``__init__`` would make that import circular.
"""
