"""Zeroth-order building blocks: the seeded perturbation z(s), perturb / restore / replay, and the
two-point step. Used by FedKSeed, FedMeZO, FedZO and FedPT's zeroth-order distillation; pure
functions, no federation code."""

from fedtune.zo.perturb import (
    add_z_,
    fill_z_,
    new_z_buffer,
    param_seed,
    perturb_,
    replay_,
    z_for,
)
from fedtune.zo.spec import ZSpec, replay_z_
from fedtune.zo.step import KeptZ, ZOStep, zo_loss, zo_step, zo_step_on

__all__ = ["add_z_", "fill_z_", "new_z_buffer", "param_seed", "perturb_", "replay_",
           "z_for", "ZSpec", "replay_z_", "KeptZ", "ZOStep", "zo_loss", "zo_step", "zo_step_on"]
