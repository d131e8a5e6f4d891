"""Zeroth-order building blocks: the seeded perturbation z(s), perturb / restore / replay, and the
two-point step. Used by FedKSeed; pure functions, no federation code."""

from fedtune.zo.perturb import (
    add_z_,
    fill_z_,
    new_z_buffer,
    param_seed,
    perturb_,
    replay_,
    restore_and_update_,
    z_for,
)
from fedtune.zo.step import zo_loss, zo_step, zo_step_on

__all__ = ["add_z_", "fill_z_", "new_z_buffer", "param_seed", "perturb_", "replay_",
           "restore_and_update_", "z_for", "zo_loss", "zo_step", "zo_step_on"]
