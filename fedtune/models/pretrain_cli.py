"""``fedtune pretrain``: pre-train a tokenizer and a Llama-style causal LM on a text corpus."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from fedtune.configbase import ConfigError

DESCRIPTION = """\
Train a byte-level BPE tokenizer and a Llama-style causal LM from scratch on a text corpus,
with a progress bar, periodic validation loss on held-out whole documents, atomic checkpoints
and --resume. The output directory loads as it is with AutoModelForCausalLM / AutoTokenizer
(float16 safetensors, loaded as float32) and holds a README.md model card and training.json.
"""

EPILOG = """\
examples (the embedded base models; exact commands in BENCHMARKS.md and each model card):
  # the small one first: it trains the shared tokenizer
  fedtune pretrain ../shared/data/pd-english-books/books.jsonl.gz \\
      --out fedtune/base_models/small --size small --vocab-size 4096 --steps 240 \\
      --checkpoint-dir /tmp/fedtune-ckpt/small
  # the large one on the small one's tokenizer (same vocabulary)
  fedtune pretrain ../shared/data/pd-english-books/books.jsonl.gz \\
      --out fedtune/base_models/large --size large --tokenizer fedtune/base_models/small \\
      --steps 480 --checkpoint-dir /tmp/fedtune-ckpt/large
  # FedPT's partner of a black box (smollm2-partner's card has the exact commands): its
  # tokenizer and its logits through the service, then a second stage on its chat answers
  fedtune pretrain ../shared/data/pd-english-books/books.jsonl.gz --out /tmp/partner-books \\
      --tokenizer smollm2-135m --teacher smollm2-135m --tie-embeddings --hidden-size 192 \\
      --layers 4 --heads 6
  python -m fedtune.models.instruct_corpus --teacher smollm2-135m --out /tmp/chat.jsonl
  fedtune pretrain /tmp/chat.jsonl --init /tmp/partner-books --teacher smollm2-135m \\
      --out runs/partner --steps 60 --lr 1e-3 --val-docs 24 --val-blocks 4
  # continue after Ctrl-C or a crash: the same command plus --resume
  fedtune pretrain corpus/ --out runs/lm --steps 2000 --resume
"""


def _val_docs(value: str) -> int | list[str]:
    """``--val-docs``: a count, or comma-separated document names."""
    if value.isdigit():
        return int(value)
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a count or comma-separated document names")
    return names


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``pretrain`` subcommand on ``subparsers`` (from ``add_subparsers``)."""
    from fedtune.models.pretrain import PRESETS, PretrainConfig

    d = PretrainConfig()
    p: argparse.ArgumentParser = subparsers.add_parser(
        "pretrain", help="pre-train a tokenizer and a small causal LM on a text corpus",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="a .jsonl/.jsonl.gz file (one document per line with a 'text' "
                   "field, named by its 'file'/'id'/'name'/'title' field), a .txt file, or a "
                   "folder of such files")
    p.add_argument("--out", required=True, help="output model directory")
    size = p.add_argument_group("model size (a preset, optionally overridden per dimension)")
    size.add_argument("--size", choices=sorted(PRESETS), default="small",
                      help="preset: " + "; ".join(
                          f"{k}: hidden {v['hidden_size']}, {v['num_layers']} layers, "
                          f"{v['num_heads']} heads" for k, v in PRESETS.items())
                      + " (default: small)")
    size.add_argument("--hidden-size", type=int, help="hidden size (overrides --size)")
    size.add_argument("--layers", type=int, help="decoder layers (overrides --size)")
    size.add_argument("--heads", type=int, help="attention heads (overrides --size)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", metavar="MODEL", default="",
                     help="reuse this model's tokenizer (a directory, e.g. a smaller model of "
                     "the family, or a built-in name such as smollm2-135m) instead of training "
                     "one")
    size.add_argument("--init", metavar="MODEL", default="",
                      help="start from this model's weights (a directory or built-in name) "
                      "instead of a new model: a second stage, e.g. a partner distilled on "
                      "instruction-formatted text; its architecture and tokenizer are kept")
    size.add_argument("--tie-embeddings", action="store_true",
                      help="share the input embedding and the output head (halves what a "
                      "large vocabulary costs)")
    kd = p.add_argument_group(
        "distillation from a black-box teacher (FedPT's small partner: the teacher's logits, "
        "never its weights)")
    kd.add_argument("--teacher", metavar="URL|MODEL", default="",
                    help="a running `fedtune serve-logits` URL (token from "
                    "FEDTUNE_LOGITS_TOKEN[_FILE]) or a model this command serves from a child "
                    "process; needs --tokenizer of the same vocabulary")
    kd.add_argument("--teacher-weight", type=float, default=d.teacher_weight,
                    help=f"w in (1 - w) CE + w T^2 KL (default {d.teacher_weight})")
    kd.add_argument("--teacher-temperature", type=float, default=d.teacher_temperature,
                    help=f"T of the KL term (default {d.teacher_temperature}; 1 with top-k)")
    kd.add_argument("--teacher-top-k", type=int, default=d.teacher_top_k,
                    help="distil on the teacher's top k tokens per position and one bucket for "
                    f"the rest: k * 8 + 4 bytes instead of V * 4 (default {d.teacher_top_k}; "
                    "0: the full logits)")
    tok.add_argument("--vocab-size", type=int, default=d.vocab_size,
                     help=f"vocabulary of a newly trained tokenizer (default {d.vocab_size})")
    tok.add_argument("--text-field", default=d.text_field,
                     help=f"JSONL text field (default {d.text_field!r})")
    tr = p.add_argument_group("training")
    tr.add_argument("--steps", type=int, default=d.steps,
                    help=f"optimizer steps (default {d.steps})")
    tr.add_argument("--block-size", type=int, default=d.block_size,
                    help=f"tokens per sequence and context length (default {d.block_size})")
    tr.add_argument("--batch-size", type=int, default=d.batch_size,
                    help=f"sequences per step (default {d.batch_size})")
    tr.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    tr.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                    help=f"linear warmup steps, then cosine decay (default {d.warmup_steps})")
    tr.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                    help=f"final lr as a share of the peak (default {d.min_lr_ratio})")
    tr.add_argument("--weight-decay", type=float, default=d.weight_decay,
                    help=f"AdamW weight decay (default {d.weight_decay})")
    tr.add_argument("--seed", type=int, default=d.seed,
                    help=f"seed of the held-out choice, initial weights and data order "
                    f"(default {d.seed})")
    tr.add_argument("--threads", type=int, default=d.threads,
                    help="torch CPU threads (default: torch's own choice)")
    ev = p.add_argument_group("validation and checkpoints")
    ev.add_argument("--val-docs", type=_val_docs, default=d.val_count, metavar="N|NAMES",
                    help=f"documents held out whole for validation: a count drawn by --seed, "
                    f"or comma-separated names (default {d.val_count})")
    ev.add_argument("--val-every", type=int, default=d.val_every,
                    help=f"validation loss every N steps (default {d.val_every})")
    ev.add_argument("--val-blocks", type=int, default=d.val_blocks,
                    help=f"fixed held-out blocks averaged over (default {d.val_blocks})")
    ev.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                    help=f"checkpoint every N steps and at the end (default "
                    f"{d.checkpoint_every})")
    ev.add_argument("--checkpoint-dir", default="",
                    help="checkpoint folder (default OUT/checkpoint)")
    ev.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint (same arguments as the first run)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~fedtune.models.pretrain.PretrainConfig` of parsed arguments."""
    from fedtune.models.pretrain import PRESETS, PretrainConfig

    preset = PRESETS[args.size]
    val_names = args.val_docs if isinstance(args.val_docs, list) else []
    val_count = args.val_docs if isinstance(args.val_docs, int) else 0
    return PretrainConfig(
        corpus=args.corpus, out_dir=args.out, tokenizer=args.tokenizer, init=args.init,
        vocab_size=args.vocab_size, text_field=args.text_field,
        tie_embeddings=args.tie_embeddings, teacher=args.teacher,
        teacher_weight=args.teacher_weight, teacher_temperature=args.teacher_temperature,
        teacher_top_k=args.teacher_top_k,
        hidden_size=args.hidden_size or preset["hidden_size"],
        num_layers=args.layers or preset["num_layers"],
        num_heads=args.heads or preset["num_heads"],
        block_size=args.block_size, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, val_docs=val_names, val_count=val_count,
        val_every=args.val_every, val_blocks=args.val_blocks,
        checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir,
        seed=args.seed, threads=args.threads, resume=args.resume,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``fedtune pretrain``; 0 on success, 2 on a config error, 130 on Ctrl-C."""
    from fedtune.models.pretrain import pretrain

    argv = [a for a in sys.argv[1:] if a != "--resume"]
    command = "fedtune " + shlex.join(argv) if argv and argv[0] == "pretrain" else ""
    try:
        cfg = config_from_args(args)
        result = pretrain(cfg, command=command, progress=not args.quiet)
    except ConfigError as e:
        print(f"fedtune pretrain: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfedtune pretrain: interrupted; continue from the last checkpoint with the same "
              "command plus --resume", file=sys.stderr)
        return 130
    logging.getLogger(__name__).info("done")
    print(f"pretrained {result.out_dir}: {result.parameters:,} parameters, {result.steps} steps, "
          f"{result.tokens_seen:,} tokens seen, validation loss {result.val_loss:.4f}, "
          f"{result.wall_s:.0f} s")
    return 0
