"""Config of FedKSeed and FedKSeed-Pro: the ``[algorithm.fedkseed]`` sub-table.

Names follow the paper (Qin et al., ICML 2024, arXiv 2312.06353): K seeds (``k_seeds``), the
perturbation scale ε (``zo_eps``), τ local steps per round (``tau``). The defaults are the quick
start's (``configs/quickstart.toml`` says why), for the real model smollm2-135m on a CPU; the
paper's values are in each help text.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, option
from fedtune.zo.spec import KINDS, ZSpec

MAX_K_SEEDS = 1 << 20


@dataclass
class FedKSeedConfig:
    k_seeds: int = option(1024, "K, the size of the seed pool every perturbation is drawn from "
                              "(paper: 4096; 1024 in the reference's README runs).")
    zo_eps: float = option(5e-4, "ε, the scale of the two-point perturbation θ ± εz (paper 5e-4).")
    lr: float = option(3e-5, "Zeroth-order SGD learning rate; the global model is "
                             "w0 - lr * sum_j A_j z(s_j) (paper: 3e-7 on 1.3B-3B models; "
                             "3e-5 for the 135M smollm2-135m, 2e-4 for the 2.1M small model).")
    tau: int = option(20, "τ, zeroth-order steps each sampled client takes per round (paper 200).")
    batch_size: int = option(4, "Examples per zeroth-order step (paper 1).")
    clip: float = option(1000.0, "FedKSeed-Pro: c in the seed importance mean(|clip(g, -c, c)|) "
                                 "(paper 1000). Only the importance is clipped, never the update.")
    temperature: float = option(
        1.0, "FedKSeed-Pro: p = softmax(psi_normalised / temperature). 1.0 is the paper's "
             "behaviour (the likeliest seed at most e times likelier than the least).")
    keep_z: bool = option(
        True, "Keep z in memory from step to step: one generation of z per step instead of "
               "three, the first move made as z is drawn and each step's last move in the same "
               "pass as the next step's draw (faster), at the cost of one float32 copy of the "
               "trainable parameters (more memory). Bitwise the same result either way.")
    seed: int = option(0, "Run seed the K pool seeds derive from (shared by server and clients, "
                          "never sent).")
    generator: int = option(
        2, "Version of the generator of z(s): 2 (Philox4x32-10 counters, every core shares "
           "every tensor, CUDA tensors drawn on the device; fedtune.zo.philox documents it bit "
           "for bit) or 1 (torch's CPU generator per (seed, parameter): runs made before "
           "version 2). The seed log, checkpoints and messages carry it; a mismatch is refused.")
    perturbation: str = option(
        "dense", "z(s) on every weight matrix: 'dense' (the paper's) or 'lowrank' (z = U V^T / "
                 "sqrt(rank) with U, V drawn from the seed, as in LOZO: a step draws (m + n) r "
                 "values instead of m n, and a rebuild is one matrix product per matrix). "
                 "Needs generator 2.")
    rank: int = option(4, "r of perturbation = 'lowrank' (ignored when dense).")
    tune_embeddings: bool = option(
        False, "Perturb and tune the token embeddings and the output head too (true: the paper, "
               "every parameter). False (the default) freezes them at the base model's values "
               "(found by get_input_embeddings / get_output_embeddings, so any architecture): z "
               "covers the transformer blocks and norms only, so no step moves the logits of the "
               "whole vocabulary at random. On smollm2-135m this turned the quick start's damage "
               "to general instructions (guard eval loss +0.11) into none (-0.005 to -0.039 over "
               "3 seeds) and doubled its Rouge-L gain (BENCHMARKS.md).")
    g_max: float = option(
        1000.0, "Bounded influence: devices clip each projected gradient g to [-g_max, g_max] "
                "and the server refuses a reply whose per-seed sums could not come from tau "
                "clipped steps (|sum g_j| and sum_j |sum g_j| <= tau * g_max). 1000 is the "
                "paper's c; honest steps measured far below it (smollm2-135m: median |g| 27, "
                "max 310 of 80; see BENCHMARKS.md). 0 turns the clip off; the server still "
                "refuses more touched seeds (or Pro counts) than tau steps allow.")

    def validate(self, prefix: str) -> None:
        check(1 <= self.k_seeds <= MAX_K_SEEDS, f"{prefix}.k_seeds", self.k_seeds,
              f"must be in [1, {MAX_K_SEEDS}]")
        check(self.zo_eps > 0, f"{prefix}.zo_eps", self.zo_eps, "must be > 0")
        check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        check(1 <= self.tau <= 65535, f"{prefix}.tau", self.tau,
              "must be in [1, 65535] (a seed's count travels as uint16)")
        check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        check(self.clip > 0, f"{prefix}.clip", self.clip, "must be > 0")
        check(self.temperature > 0, f"{prefix}.temperature", self.temperature, "must be > 0")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "must be >= 0")
        check(self.g_max >= 0, f"{prefix}.g_max", self.g_max, "must be >= 0 (0: off)")
        check(self.generator in (1, 2), f"{prefix}.generator", self.generator, "must be 1 or 2")
        check(self.perturbation in KINDS, f"{prefix}.perturbation", self.perturbation,
              f"must be one of {', '.join(KINDS)}")
        check(self.rank >= 1, f"{prefix}.rank", self.rank, "must be >= 1")
        check(self.perturbation == "dense" or self.generator == 2, f"{prefix}.perturbation",
              self.perturbation, "low-rank perturbations need generator = 2")

    @property
    def spec(self) -> ZSpec:
        """The z of this config (generator, dense or low-rank, rank)."""
        return ZSpec(self.generator, self.perturbation,
                     self.rank if self.perturbation == "lowrank" else 0)
