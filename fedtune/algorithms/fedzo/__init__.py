"""FedZO (the zeroth-order full-parameter baseline of FedKSeed's comparison): config.py (the
``[algorithm.fedzo]`` knobs), method.py (the registry row: MeZO's fresh-seed device on every
parameter, replying with the model difference; FedAvg's server adding the mean difference).

Nothing is imported here: ``fedtune.algorithms.config`` imports :mod:`.config`.
"""
