"""FedPrompt and FedPTuning (prompt-tuning baselines): config.py (the ``[algorithm.prompt]``
knobs), method.py (the registry rows: peft's prompt learning, FedAvg's server and device).

Nothing is imported here: ``fedtune.algorithms.config`` imports :mod:`.config`.
"""
