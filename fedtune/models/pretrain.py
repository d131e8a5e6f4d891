"""Pre-train a byte-level BPE tokenizer and a Llama-style causal LM from scratch on a text corpus.

One recipe, read top to bottom (nanoGPT style), in :func:`pretrain` (the corpus steps 1, 2 and 4
live in :mod:`.pretrain_data`):

1. load the corpus: ``.jsonl`` / ``.jsonl.gz`` files with a ``text`` field (one document per
   line, named by its ``file``/``id``/``name``/``title`` field or ``<file>:<line>``) and ``.txt``
   files (one document per file), given as files or folders;
2. hold out whole documents for validation: by name, or a seeded random choice of a count;
3. train the tokenizer on the training documents (or reuse a model's tokenizer, so a family of
   models shares one vocabulary) and save it to the output directory at once;
4. tokenise every document into one stream, an EOS token between documents;
5. train: random contiguous blocks of ``block_size + 1`` tokens drawn by a seeded generator,
   AdamW with linear warmup and cosine decay, fp32, gradient clipping, a tqdm bar with the loss;
   every ``val_every`` steps the loss on fixed held-out blocks; every ``checkpoint_every`` steps
   and at the end an atomic checkpoint (model, optimizer, step, data RNG state, tokens seen);
   with a ``teacher`` (a model behind ``fedtune serve-logits``, reached only through its logits:
   FedPT's way of building a small partner for a black-box large model) the loss is
   (1 - w) CE + w T^2 KL(softmax(teacher / T) || softmax(student / T)) at every position, and
   validation also reports that KL on the held-out blocks;
6. save: float16 safetensors (``config.json`` says float32, so ``from_pretrained`` gives fp32),
   the tokenizer, ``training.json`` and a ``README.md`` model card.

``resume=True`` continues from the checkpoint; because the data order is drawn from a generator
whose state is checkpointed and the learning rate is a function of the step, a resumed run ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from fedtune.configbase import ConfigError, check, option
from fedtune.logits.source import MAX_TOP_K, TopLogits
from fedtune.models.loading import resolve_model_source
from fedtune.models.pretrain_data import (
    load_corpus,
    split_documents,
    token_stream,
    val_block_starts,
)
from fedtune.models.tiny import tiny_llama_config, train_tokenizer

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, int]] = {
    "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
    "large": {"hidden_size": 256, "num_layers": 6, "num_heads": 8},
}
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class PretrainConfig:
    corpus: str = option("", "Corpus: a .jsonl/.jsonl.gz file (one document per line, a 'text' "
                         "field), a .txt file (one document), or a folder of such files.")
    out_dir: str = option("", "Output model directory (tokenizer, fp16 weights, model card).")
    tokenizer: str = option("", "Reuse this model's tokenizer (a directory, a built-in name such "
                            "as smollm2-135m, or a hub id; models then share one vocabulary). "
                            "Empty: train a byte-level BPE tokenizer on the training documents.")
    vocab_size: int = option(4096, "Vocabulary size of a newly trained tokenizer (special tokens "
                             "included).")
    text_field: str = option("text", "JSONL field holding a document's text.")
    init: str = option(
        "", "Start from this model's weights instead of from scratch (a directory or built-in "
            "name: a second stage, e.g. distilling a partner on instruction-formatted text): "
            "its architecture and tied head are kept (hidden_size, num_layers, num_heads and "
            "tie_embeddings are then unused), its tokenizer is reused unless tokenizer names "
            "one with the same vocabulary, and block_size must fit its context. Empty: a new "
            "model.")
    tie_embeddings: bool = option(False, "Share the input embedding and the output head (halves "
                                  "what a large vocabulary costs; SmolLM2 ties them).")
    teacher: str = option(
        "", "Distil from this model's logits while pre-training: the URL of a running `fedtune "
            "serve-logits` (its token from FEDTUNE_LOGITS_TOKEN / FEDTUNE_LOGITS_TOKEN_FILE), or "
            "a model (directory, built-in name, hub id) that this command serves from a child "
            "process with a fresh token; its weights never enter this process. It must share "
            "the tokenizer (checked). Empty: plain language-model pre-training.")
    teacher_weight: float = option(
        0.5, "w in (1 - w) CE + w T^2 KL(teacher || student) (1: the teacher's logits only).")
    teacher_temperature: float = option(
        1.0, "T of the distillation term (1 with teacher_top_k: the top-k form carries the "
             "teacher's distribution at T = 1).")
    teacher_top_k: int = option(
        64, "Ask the teacher for its top k logits per position and the probability of the rest "
            "(k * 8 + 4 bytes instead of V * 4: 381x less for a 49,152-token vocabulary at "
            "k 64), and distil on those k tokens plus one bucket for the rest (a lower bound of "
            "the full KL). 0: the full logits.")
    hidden_size: int = option(128, "Hidden size.")
    num_layers: int = option(4, "Number of decoder layers.")
    num_heads: int = option(4, "Attention heads (must divide hidden_size, even head size).")
    block_size: int = option(256, "Tokens per training sequence (also the model's max length).")
    batch_size: int = option(8, "Sequences per optimizer step.")
    steps: int = option(500, "Optimizer steps.")
    lr: float = option(3e-3, "Peak learning rate (AdamW).")
    min_lr_ratio: float = option(0.1, "Final learning rate as a share of the peak (cosine decay).")
    warmup_steps: int = option(50, "Steps of linear warmup.")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only, not norms).")
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: no clipping).")
    val_docs: list = option([], "Names of documents held out for validation (overrides "
                            "val_count).")
    val_count: int = option(4, "Documents held out for validation, a seeded random choice "
                            "(when val_docs is empty).")
    val_every: int = option(100, "Validation loss every this many steps (0: only at the end).")
    val_blocks: int = option(64, "Fixed held-out blocks the validation loss is averaged over.")
    checkpoint_every: int = option(100, "Checkpoint every this many steps (and at the end).")
    checkpoint_dir: str = option("", "Checkpoint folder. Empty: <out_dir>/checkpoint.")
    seed: int = option(0, "Seed of the held-out choice, the initial weights and the data order.")
    threads: int = option(0, "torch CPU threads (0: torch's default).")
    resume: bool = option(False, "Continue from the checkpoint in checkpoint_dir.")

    def validate(self) -> None:
        check(bool(self.corpus), "corpus", self.corpus, "is required")
        check(bool(self.out_dir), "out_dir", self.out_dir, "is required")
        for key in ("hidden_size", "num_layers", "num_heads", "block_size", "batch_size",
                    "steps", "val_blocks"):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
        for key in ("warmup_steps", "val_every", "checkpoint_every", "val_count", "threads"):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= 0, key, value, "must be an integer >= 0")
        check(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
              f"must be divisible by num_heads = {self.num_heads}")
        check((self.hidden_size // self.num_heads) % 2 == 0, "hidden_size", self.hidden_size,
              "the head size hidden_size / num_heads must be even (rotary embeddings)")
        check(self.vocab_size >= 260, "vocab_size", self.vocab_size,
              "must be >= 260 (the 256 byte-level symbols and 4 special tokens)")
        check(self.vocab_size < 2**16 or bool(self.tokenizer), "vocab_size", self.vocab_size,
              "must be < 65536")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(not self.teacher or bool(self.tokenizer) or bool(self.init), "tokenizer",
              self.tokenizer, "a teacher needs its own tokenizer here (--tokenizer, e.g. the "
              "teacher's name, or --init a model that has it)")
        check(0 <= self.teacher_weight <= 1, "teacher_weight", self.teacher_weight,
              "must be in [0, 1]")
        check(self.teacher_temperature > 0, "teacher_temperature", self.teacher_temperature,
              "must be > 0")
        check(isinstance(self.teacher_top_k, int) and 0 <= self.teacher_top_k <= MAX_TOP_K,
              "teacher_top_k", self.teacher_top_k, f"must be an integer in [0, {MAX_TOP_K}]")
        check(self.teacher_top_k == 0 or self.teacher_temperature == 1, "teacher_temperature",
              self.teacher_temperature, "must be 1 with teacher_top_k > 0 (set teacher_top_k "
              "= 0 for full logits at another temperature)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(bool(self.val_docs) or self.val_count >= 1, "val_count", self.val_count,
              "must be >= 1 when no val_docs are named (validation needs held-out documents)")


# ----------------------------------------------------------------------------------------------
# 5. Training pieces


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at ``steps`` (``step`` counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def get_batch(tokens: torch.Tensor, starts: torch.Tensor, block_size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of the blocks starting at ``starts``."""
    idx = starts[:, None] + torch.arange(block_size + 1)[None, :]
    blocks = tokens[idx].long()
    return blocks[:, :-1], blocks[:, 1:]


def lm_loss(model: LlamaForCausalLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def kd_loss(model: LlamaForCausalLM, x: torch.Tensor, y: torch.Tensor,
            teacher: torch.Tensor | TopLogits, weight: float, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1 - w) CE(student, y) + w T^2 KL(softmax(teacher / T) || softmax(student / T)) over every
    position, then the CE and the KL at T = 1 (both detached, for the log). ``teacher``: (B, L, V')
    logits of the same positions (the shared width min(V, V') is compared: a model may pad its
    head), or their (B, L, k) :class:`TopLogits` (T = 1; :func:`kl_top_k`)."""
    from fedtune.algorithms.fedpt.distill import kl_to_teacher, kl_top_k_log_q

    logits = model(input_ids=x).logits
    if isinstance(teacher, TopLogits):
        v = logits.size(-1)
        flat = TopLogits(teacher.values.reshape(-1, teacher.values.size(-1)),
                         teacher.indices.reshape(-1, teacher.indices.size(-1)),
                         teacher.lse.reshape(-1))
        log_q = torch.log_softmax(logits.reshape(-1, v).float(), dim=-1)
        ce = F.nll_loss(log_q, y.reshape(-1))
        kl = kl_top_k_log_q(flat, log_q)
        return (1 - weight) * ce + weight * kl, ce.detach(), kl.detach()
    width = min(logits.size(-1), teacher.size(-1))
    s = logits[..., :width].reshape(-1, width)
    t = teacher[..., :width].reshape(-1, width).to(s.dtype)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    kl = kl_to_teacher(t, s, temperature)
    with torch.no_grad():
        kl1 = kl if temperature == 1 else kl_to_teacher(t, s.detach(), 1.0)
    return (1 - weight) * ce + weight * kl, ce.detach(), kl1.detach()


@torch.no_grad()
def validation_loss(model: LlamaForCausalLM, val_tokens: torch.Tensor, starts: list[int],
                    block_size: int, batch_size: int,
                    teacher: Callable[[torch.Tensor], torch.Tensor | TopLogits] | None = None
                    ) -> tuple[float, float | None]:
    """Mean next-token loss (nats) over the fixed held-out blocks, and with a ``teacher`` (a
    function of the input ids giving its logits) the mean KL(teacher || model) at T = 1."""
    was_training = model.training
    model.eval()
    total, kl_total, count = 0.0, 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = torch.tensor(starts[i:i + batch_size])
        x, y = get_batch(val_tokens, chunk, block_size)
        if teacher is None:
            total += lm_loss(model, x, y).item() * len(chunk)
        else:
            _, ce, kl = kd_loss(model, x, y, teacher(x), 0.0, 1.0)
            total += ce.item() * len(chunk)
            kl_total += kl.item() * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / count, (kl_total / count if teacher is not None else None)


@contextmanager
def open_teacher(spec: str, tokenizer: PreTrainedTokenizerBase, top_k: int = 0
                 ) -> Iterator[Callable[[torch.Tensor], torch.Tensor | TopLogits]]:
    """The teacher's logits (or their top ``top_k``) as a function of (B, L) input ids, reached
    only through `fedtune serve-logits`: at ``spec`` if it is a URL, else a child process serving
    the model ``spec`` (stopped on exit). Its tokenizer must be ``tokenizer``'s, token for
    token."""
    from fedtune.logits.remote import remote_from_env
    from fedtune.logits.service import spawn_service
    from fedtune.logits.source import forced_logits, forced_top, tokenizer_hash

    service = None
    if spec.startswith(("http://", "https://")):
        source: Any = remote_from_env(spec)
    else:
        service = spawn_service(spec)
        source = service.client()
    try:
        info = source.info()
        if info.tokenizer_hash != tokenizer_hash(tokenizer):
            raise ConfigError("teacher", spec, "does not share the tokenizer being trained with "
                              "(distillation compares logits token by token)")
        logger.info("teacher %s: vocabulary %d, logits width %d", spec, info.vocab_size,
                    info.logits_width)
        if top_k:
            yield lambda x: forced_top(source, x, top_k)
        else:
            yield lambda x: forced_logits(source, x)
    finally:
        if service is not None:
            service.stop()


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: to a temporary file in the same folder, then rename over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# Keys of the config that must not change when a run is resumed.
_RESUME_KEYS = ("corpus", "init", "tokenizer", "vocab_size", "text_field", "tie_embeddings",
                "teacher_weight", "teacher_temperature", "teacher_top_k", "hidden_size",
                "num_layers",
                "num_heads", "block_size", "batch_size", "steps", "lr", "min_lr_ratio",
                "warmup_steps", "weight_decay", "grad_clip", "val_docs", "val_count", "seed")


# ----------------------------------------------------------------------------------------------
# The recipe


@dataclass
class PretrainResult:
    out_dir: Path
    steps: int
    tokens_seen: int
    val_loss: float
    parameters: int
    wall_s: float
    history: list[dict[str, float]]


def pretrain(cfg: PretrainConfig, *, command: str = "", progress: bool = True,
             stop_after: int | None = None) -> PretrainResult:
    """Run the recipe (see the module docstring); returns the final figures.

    ``command`` is recorded in the model card. ``stop_after`` ends the run after that many steps
    (with a checkpoint) as an interruption would; ``resume=True`` then continues it.
    ``cfg.threads`` applies for the duration of the call only.
    """
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:  # holds the teacher service, if any, until the end
            return _pretrain(cfg, command, progress, stop_after, stack)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: PretrainConfig, command: str, progress: bool, stop_after: int | None,
              stack: ExitStack) -> PretrainResult:
    t_start = time.time()
    out = Path(cfg.out_dir)
    ckpt_path = Path(cfg.checkpoint_dir or out / "checkpoint") / CHECKPOINT_FILE
    state: dict[str, Any] | None = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = state["config"]
        changed = {k: (saved.get(k), getattr(cfg, k)) for k in _RESUME_KEYS
                   if saved.get(k) != getattr(cfg, k)}
        if changed:
            raise ConfigError("resume", changed, "differs from the checkpointed run's config")
    elif ckpt_path.is_file():
        raise ConfigError("out_dir", str(out), f"holds a checkpoint ({ckpt_path}); pass resume "
                          "to continue it or choose another directory")

    # 1-2. corpus and held-out documents
    docs = load_corpus(cfg.corpus, cfg.text_field)
    train_docs, val_docs = split_documents(docs, list(cfg.val_docs), cfg.val_count, cfg.seed)
    logger.info("corpus %s: %d documents, %d chars; %d held out for validation: %s",
                cfg.corpus, len(docs), sum(len(d.text) for d in docs), len(val_docs),
                [d.name for d in val_docs])

    # 3. tokenizer: reused, resumed (saved in out_dir at the start), or trained now
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer or cfg.init or state is not None:
        tok_dir = (resolve_model_source(cfg.tokenizer) if cfg.tokenizer else
                   str(out) if state is not None else resolve_model_source(cfg.init))
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        for key in ("is_local", "local_files_only"):  # loading details, not tokenizer settings
            tokenizer.init_kwargs.pop(key, None)
        logger.info("tokenizer from %s: %d tokens", tok_dir, len(tokenizer))
    else:
        t0 = time.time()
        tokenizer = train_tokenizer((d.text for d in train_docs), cfg.vocab_size)
        logger.info("trained a byte-level BPE tokenizer: %d tokens (%.0f s)", len(tokenizer),
                    time.time() - t0)
    tokenizer.model_max_length = cfg.block_size
    tokenizer.save_pretrained(out)
    teacher = (stack.enter_context(open_teacher(cfg.teacher, tokenizer, cfg.teacher_top_k))
               if cfg.teacher else None)

    # 4. token streams
    t0 = time.time()
    train_tokens = torch.from_numpy(token_stream(tokenizer, train_docs).astype(np.int32))
    val_tokens = torch.from_numpy(token_stream(tokenizer, val_docs).astype(np.int32))
    logger.info("tokens: %d train, %d validation (%.0f s)", len(train_tokens), len(val_tokens),
                time.time() - t0)
    if len(train_tokens) < cfg.block_size + 2:
        raise ValueError(f"the training documents have {len(train_tokens)} tokens, fewer than "
                         f"one block of {cfg.block_size + 1}")
    val_starts = val_block_starts(len(val_tokens), cfg.block_size, cfg.val_blocks)

    # 5. model, optimizer, data generator: fresh or from the checkpoint
    config = tiny_llama_config(
        len(tokenizer), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, max_positions=cfg.block_size,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_embeddings=cfg.tie_embeddings,
    )
    if cfg.init:
        model = initial_model(cfg.init, len(tokenizer), cfg.block_size)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = LlamaForCausalLM(config)
    model.float().train()
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, tokens_seen, wall_before = 0, 0, 0.0
    history: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        wall_before, history = state["wall_s"], state["history"]
        logger.info("resumed at step %d (%d tokens seen)", step, tokens_seen)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters (hidden %d, %d layers, %d heads, vocab %d)%s", n_params,
                model.config.hidden_size, model.config.num_hidden_layers,
                model.config.num_attention_heads, len(tokenizer),
                f", from {cfg.init}" if cfg.init else "")

    def checkpoint() -> None:
        _save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "data_rng": gen.get_state(), "step": step, "tokens_seen": tokens_seen,
            "wall_s": wall_before + time.time() - t_start, "history": history,
            "config": dataclasses.asdict(cfg),
        })

    def validate_now() -> float:
        loss, kl = validation_loss(model, val_tokens, val_starts, cfg.block_size,
                                   cfg.batch_size, teacher)
        history.append({"step": step, "tokens_seen": tokens_seen, "val_loss": loss}
                       | ({} if kl is None else {"val_kl": kl}))
        return loss

    if step == 0 and not history:
        logger.info("step 0: validation loss %.4f", validate_now())
    n_starts = len(train_tokens) - cfg.block_size  # the last start leaves block_size + 1
    last_stop = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="pretrain",
               unit="step", dynamic_ncols=True)
    train_loss = float("nan")
    while step < last_stop:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n_starts, (cfg.batch_size,), generator=gen)
        x, y = get_batch(train_tokens, starts, cfg.block_size)
        if teacher is None:
            loss = lm_loss(model, x, y)
        else:
            loss, _, kl = kd_loss(model, x, y, teacher(x), cfg.teacher_weight,
                                  cfg.teacher_temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += x.numel()
        train_loss = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                        **({} if teacher is None else {"kl": f"{kl.item():.3f}"}))
        if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            val = validate_now()
            bar.write(f"step {step}: train loss {train_loss:.4f}, validation loss {val:.4f}")
            logger.info("step %d: train loss %.4f, validation loss %.4f", step, train_loss, val)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < last_stop:
            checkpoint()
    bar.close()
    if step < cfg.steps:  # stopped early, as an interruption would
        checkpoint()
        logger.info("stopped at step %d of %d; checkpoint %s", step, cfg.steps, ckpt_path)
        val = history[-1]["val_loss"] if history else float("nan")
        return PretrainResult(out, step, tokens_seen, val, n_params,
                              wall_before + time.time() - t_start, history)
    if not history or history[-1]["step"] != step:
        validate_now()
    val = history[-1]["val_loss"]
    logger.info("step %d: train loss %.4f, final validation loss %.4f", step, train_loss, val)
    checkpoint()

    # 6. the model directory
    wall = wall_before + time.time() - t_start
    save_model(model, tokenizer, out)
    summary = {
        "corpus": str(cfg.corpus), "documents": len(docs),
        "train_documents": len(train_docs), "validation_documents": [d.name for d in val_docs],
        "train_tokens": len(train_tokens), "validation_tokens": len(val_tokens),
        "validation_blocks": len(val_starts), "steps": step, "tokens_seen": tokens_seen,
        "val_loss": round(val, 4), "parameters": n_params, "wall_s": round(wall, 1),
        "architecture": {"hidden_size": model.config.hidden_size,
                         "num_layers": model.config.num_hidden_layers,
                         "num_heads": model.config.num_attention_heads,
                         "mlp": model.config.intermediate_size,
                         "tied": bool(model.config.tie_word_embeddings)},
        "seed": cfg.seed, "command": command, "config": dataclasses.asdict(cfg),
        "special_tokens": {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id,
                           "eos": tokenizer.eos_token_id},
        "history": [{k: (round(v, 4) if k.startswith("val_") else v) for k, v in h.items()}
                    for h in history],
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(model_card(summary, len(tokenizer)))
    logger.info("saved %s (%d parameters, validation loss %.4f, %d tokens seen, %.0f s)", out,
                n_params, val, tokens_seen, wall)
    return PretrainResult(out, step, tokens_seen, val, n_params, wall, history)


def initial_model(init: str, vocab: int, block_size: int) -> LlamaForCausalLM:
    """The model a second stage starts from (``init``), checked against the tokenizer and the
    block size it will be trained with."""
    model = LlamaForCausalLM.from_pretrained(resolve_model_source(init), dtype=torch.float32)
    if model.config.vocab_size < vocab:
        raise ConfigError("init", init, f"has {model.config.vocab_size} embedding rows, fewer "
                          f"than the tokenizer's {vocab} tokens")
    if block_size > model.config.max_position_embeddings:
        raise ConfigError("block_size", block_size, f"exceeds {init}'s context of "
                          f"{model.config.max_position_embeddings} positions")
    return model


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """float16 safetensors; ``config.json`` records float32 so loading gives fp32 by default."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # one matrix; the head is tied to it again on load
        state.pop("lm_head.weight", None)
    model.save_pretrained(out, state_dict=state)
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    config["dtype"] = "float32"
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)


def model_card(s: dict[str, Any], vocab: int) -> str:
    """The README.md of a pre-trained model directory, from its ``training.json`` summary."""
    c = s["config"]
    a = s.get("architecture") or {  # cards written before the architecture was recorded
        "hidden_size": c["hidden_size"], "num_layers": c["num_layers"],
        "num_heads": c["num_heads"], "mlp": 4 * c["hidden_size"],
        "tied": bool(c.get("tie_embeddings"))}
    held = ", ".join(f"`{n}`" for n in s["validation_documents"])
    rows = [
        ("corpus", f"`{s['corpus']}`: {s['documents']} documents, {s['train_documents']} "
                   "trained on"),
        ("held out for validation", f"{held} ({s['validation_tokens']:,} tokens, "
                                    f"{s['validation_blocks']} fixed blocks)"),
        ("tokens seen", f"{s['tokens_seen']:,} ({s['steps']} steps x {c['batch_size']} x "
                        f"{c['block_size']}; the training documents hold "
                        f"{s['train_tokens']:,})"),
        ("validation loss", f"{s['val_loss']:.4f} nats/token (perplexity "
                            f"{math.exp(s['val_loss']):.1f})"),
        ("parameters", f"{s['parameters']:,}"),
        ("architecture", f"Llama: hidden {a['hidden_size']}, {a['num_layers']} layers, "
                         f"{a['num_heads']} heads, MLP {a['mlp']}, context "
                         f"{c['block_size']}, {'tied' if a['tied'] else 'untied'} embeddings"),
        ("tokenizer", (f"reused from `{c.get('tokenizer') or c.get('init')}`: {vocab} tokens; "
                       "ids " + ", ".join(f"{k} {v}"
                                          for k, v in s.get("special_tokens", {}).items())
                       + " (EOS between documents)")
         if c.get("tokenizer") or c.get("init") else
                      f"byte-level BPE, {vocab} tokens; `<pad>` 0, `<s>` 1, `</s>` 2 (between "
                      "documents), `<unk>` 3; encoding adds no special tokens"),
        ("optimizer", f"AdamW (0.9, 0.95), peak lr {c['lr']}, {c['warmup_steps']} warmup "
                      f"steps, cosine to {c['min_lr_ratio']} x peak, weight decay "
                      f"{c['weight_decay']}, gradient clip {c['grad_clip']}"),
        ("seed", str(s["seed"])),
        ("wall time", f"{s['wall_s']:.0f} s"),
    ]
    if c.get("init"):
        rows.insert(0, ("initialised from", f"`{c['init']}` (a second stage: its weights, "
                                            "not a random initialisation)"))
    if c.get("teacher"):
        kl = [h["val_kl"] for h in s["history"] if "val_kl" in h]
        rows.insert(5, ("distilled from", (
            f"`{c['teacher']}`, through its logits only (`fedtune serve-logits`; its weights "
            f"were never read): loss (1 - w) CE + w T^2 KL(teacher || student), w "
            f"{c['teacher_weight']}, T {c['teacher_temperature']}"
            + (f", on the teacher's top {c['teacher_top_k']} tokens and one bucket for the "
               "rest" if c.get("teacher_top_k") else ", on the full logits")
            + (f"; KL to the teacher on the held-out blocks {kl[0]:.3f} -> {kl[-1]:.3f}"
               if kl else ""))))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    curve = ", ".join(f"step {h['step']} {h['val_loss']:.3f}" for h in s["history"])
    how = " with distillation from a black-box teacher" if c.get("teacher") else ""
    start = f"trained further from `{c['init']}`" if c.get("init") else "pre-trained from scratch"
    return f"""# fedtune base model ({a['hidden_size']} hidden, {a['num_layers']} layers)

A Llama-style causal LM {start} by `fedtune pretrain`{how} (fp32 training; weights
stored as float16 safetensors, loaded as float32). Loads offline as it is:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR)   # float32
tokenizer = AutoTokenizer.from_pretrained(DIR)
```

| | |
| --- | --- |
{table}

Command (run from the repository root):

```bash
{s['command'] or '(called from Python)'}
```

Validation loss during training: {curve}.
"""
