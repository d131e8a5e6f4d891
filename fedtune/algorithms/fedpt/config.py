"""Config of FedPT: the ``[algorithm.fedpt]`` sub-table.

FedPT (Gao et al., arXiv 2410.00362): devices tune a small LM (``model.path``); the server
aggregates it, proxy-tunes a black-box large LM with it (``alpha``, the large model reached only
through its logits) and distils the proxy-tuned large LM back into the small one. The choices
the paper leaves open (distillation data, loss, temperature, anti-expert, what travels, stopping
rule) are fields here, each with its default and the reason in the help text.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.configbase import check, check_choices, option

DEVICE_TRAINERS = ("fedit", "fedavg", "fedkseed")
LARGE_ACCESS = ("spawn", "url", "in-process")
ANTI_EXPERTS = ("base", "round-start", "distilled")
DISTILL_DATA = ("generated", "jsonl")
DISTILL_LOSSES = ("kl", "reverse-kl", "ce")


@dataclass
class FedPTConfig:
    device_trainer: str = option(
        "fedit",
        "How devices tune the small model, and so what travels each round: 'fedit' (LoRA "
        "adapters both ways, the paper's example), 'fedavg' (the full small model both ways) or "
        "'fedkseed' (zeroth-order, inference memory only, a few KB of seed scalars each way; "
        "its settings come from [algorithm.fedkseed]).",
        DEVICE_TRAINERS,
    )
    large_model: str = option(
        "large",
        "The black-box large model: 'large' (fedtune's own 8.4M base model, the partner of "
        "model.path = 'small'), a local directory or a hub id. Its weights are only ever "
        "loaded by the logits service (or by this process with large_access = 'in-process'); "
        "it must share the small model's tokenizer (checked at start).",
    )
    large_access: str = option(
        "spawn",
        "How the server reaches the large model: 'spawn' starts `fedtune serve-logits "
        "large_model` as a child process on 127.0.0.1 (a free port) and talks to it over HTTP, "
        "stopping it at the end; 'url' uses a service already running at large_url (this "
        "process never loads the large weights); 'in-process' loads it here (tests, quick "
        "experiments).",
        LARGE_ACCESS,
    )
    large_url: str = option("", "With large_access = 'url': the service, e.g. "
                                "http://127.0.0.1:8700 (from `fedtune serve-logits`).")
    alpha: float = option(1.0, "α in s_large + α (s_tuned - s_base) (1 in the FedPT and "
                               "proxy-tuning papers).")
    plausibility: float = option(
        0.0,
        "β of the plausibility constraint (Li et al. 2023, contrastive decoding): with β > 0 "
        "the offset α (s_tuned - s_base) acts only on the tokens the large model finds "
        "plausible, p_large >= β max p_large, and every other token keeps the large model's "
        "log-probability, so a weak small pair can re-rank the large model's candidates but "
        "not promote a token it rules out. 0 (the papers' proxy) applies the offset to every "
        "token. Applied wherever the proxy decodes or is scored (evaluation, the product); the "
        "distillation teacher is the unconstrained proxy.",
    )
    anti_expert: str = option(
        "distilled",
        "s_base: 'base' keeps the original pre-trained small model for the whole run (the "
        "paper's s_small_base; the offset then carries everything learnt, distilled knowledge "
        "included); 'round-start' uses the small model broadcast at the start of the round, so "
        "the offset carries only that round's device training; 'distilled' starts from the "
        "base small model and, whenever the student is distilled toward the proxy, distils it "
        "by the same steps on the same sequences toward the bare large model (s_large, "
        "recovered locally as s_proxy - alpha (s_tuned - s_base)), so the offset s_tuned - "
        "s_base keeps carrying what devices learnt and the next proxy does not count "
        "s_large - s_base twice (with distill = false it stays the base model). The default: "
        "the best of the three in three of four measured comparisons, on SmolLM2 and on the "
        "books pair (BENCHMARKS.md, 'FedPT on a real black box').",
        ANTI_EXPERTS,
    )
    distill: bool = option(
        True,
        "Distil the proxy-tuned large model (teacher) into the aggregated small model (student) "
        "after every round. With device_trainer = 'fedkseed' the server distils by "
        "zeroth-order steps along the same K seeds (distill_zo_steps, FedKSeed's lr and "
        "zo_eps) and folds them into the per-seed accumulators, so devices still download only "
        "K scalars and replay the distilled model. The paper's step; with the paper's "
        "anti_expert = 'base' it costs the proxy much of its gain (a student that matches the "
        "teacher carries s_large, so the next proxy counts s_large - s_base twice), which "
        "anti_expert = 'distilled' (the default) avoids: BENCHMARKS.md.",
    )
    distill_data: str = option(
        "generated",
        "Server-held prompts the distillation runs on, never the devices' data: 'generated' "
        "(fedtune's own instruction suite, drawn with distill_seed, disjoint from any client's "
        "records) or 'jsonl' (records with 'instruction' and optional 'input' at distill_path).",
        DISTILL_DATA,
    )
    distill_path: str = option("", "With distill_data = 'jsonl': the file of prompts.")
    distill_prompts: int = option(64, "Prompts drawn (afresh each round) for distillation.")
    distill_max_new_tokens: int = option(
        32, "The teacher continues each prompt greedily for at most this many tokens; the KL is "
            "taken at every position of that continuation (sequence-level distillation).")
    distill_steps: int = option(16, "Optimizer steps of distillation per round (AdamW; "
                                    "device trainers 'fedit' and 'fedavg').")
    distill_zo_steps: int = option(
        200, "With device_trainer = 'fedkseed': zeroth-order steps of distillation per round, "
             "each along z(s) of one pool seed (zeroth-order steps move far less than AdamW's, "
             "hence more of them; each costs two forwards of the small model).")
    distill_batch_size: int = option(8, "Sequences per distillation step.")
    distill_lr: float = option(1e-3, "AdamW learning rate of distillation (the student's "
                                     "trainable parameters: LoRA adapters or the full model).")
    distill_loss: str = option(
        "kl", "Distillation loss at every position of the teacher's continuation: 'kl' "
              "(T² · KL(softmax(s_teacher / T) ‖ softmax(s_student / T)), Hinton et al. 2015), "
              "'reverse-kl' (KL(student ‖ teacher), mode seeking) or 'ce' (cross-entropy on the "
              "teacher's greedy tokens).", DISTILL_LOSSES)
    distill_temperature: float = option(
        1.0, "T of the 'kl' and 'reverse-kl' losses (softmax(s / T), loss scaled by T²).")
    distill_seed: int = option(7919, "Seed of the distillation prompts and batches.")
    stop_rougeL: float = option(
        0.0, "Stopping rule: end the run once the proxy-tuned large model's Rouge-L reaches "
             "this (checked when Rouge-L is measured); 0 runs all federation.rounds.")
    eval_small: bool = option(
        True, "Also report the tuned small model's Rouge-L (as small_rougeL in the metrics).")

    def validate(self, prefix: str) -> None:
        check_choices(self, prefix)
        check(bool(self.large_model.strip()) or self.large_access == "url",
              f"{prefix}.large_model", self.large_model, "must name the large model")
        check(self.large_access != "url" or self.large_url.startswith(("http://", "https://")),
              f"{prefix}.large_url", self.large_url,
              "large_access = 'url' needs an http:// URL of `fedtune serve-logits`")
        check(self.distill_data != "jsonl" or bool(self.distill_path), f"{prefix}.distill_path",
              self.distill_path, "distill_data = 'jsonl' needs a file")
        for key in ("distill_prompts", "distill_max_new_tokens", "distill_steps",
                    "distill_zo_steps", "distill_batch_size"):
            value = getattr(self, key)
            check(value >= 1, f"{prefix}.{key}", value, "must be >= 1")
        check(0 <= self.plausibility < 1, f"{prefix}.plausibility", self.plausibility,
              "must be in [0, 1)")
        check(self.distill_lr > 0, f"{prefix}.distill_lr", self.distill_lr, "must be > 0")
        check(self.distill_temperature > 0, f"{prefix}.distill_temperature",
              self.distill_temperature, "must be > 0")
        check(0 <= self.stop_rougeL <= 1, f"{prefix}.stop_rougeL", self.stop_rougeL,
              "must be in [0, 1]")
