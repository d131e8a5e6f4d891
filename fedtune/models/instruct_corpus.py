"""Instruction-formatted text for a FedPT partner's second stage, from a black-box teacher.

A partner pre-trained on books has never seen the large model's chat format, so its tuning
offset s_tuned - s_base starts far from anything the large model would do. This writes public,
server-held prompts (fedtune's generated suite, without the families it holds out for
evaluation, or Natural Instructions' training tasks with ``--ni``; never any device's data)
answered greedily by the teacher through `fedtune serve-logits` (only its tokens: sequence-level
distillation), each rendered with the shared chat
template as one document of a JSONL corpus. `fedtune pretrain CORPUS --init PARTNER --teacher
TEACHER` then trains the partner on it with the teacher's logits (token-level distillation).

    python -m fedtune.models.instruct_corpus --teacher smollm2-135m --out chat.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedtune.logits.source import LogitsSource

log = logging.getLogger(__name__)


@torch.no_grad()
def greedy_ids(source: LogitsSource, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               stop_ids: set[int], pad_id: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (one batch, one session) from a logits source; a row
    ends after its first stop token (kept) and feeds ``pad_id`` until every row has ended."""
    session, logits = source.start(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    try:
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1).tolist()
            for i, t in enumerate(nxt):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in stop_ids
            if all(done):
                break
            logits = source.step(session, [pad_id if d else t
                                           for d, t in zip(done, nxt, strict=True)])
    finally:
        source.close(session)
    return out


def prompts_records(n: int, seed: int, ni_root: str = "") -> list[Any]:
    """``n`` prompts of the generated suite's training families (the FedPT server's pool), or,
    with ``ni_root``, of Natural Instructions' training tasks (public text in natural English;
    never its held-out test tasks)."""
    if ni_root:
        from fedtune.data.natural_instructions import load_natural_instructions

        pool = load_natural_instructions(ni_root, "train", seed=seed)
        if len(pool) < n:
            raise ValueError(f"{ni_root}: {len(pool)} training instances, fewer than {n}")
    else:
        from fedtune.data.generated import FAMILIES, HELDOUT_FAMILIES, training_suite

        pool = training_suite(-(-n // (len(FAMILIES) - len(HELDOUT_FAMILIES))), seed)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in order[:n]]


def build(teacher: str, out: Path, *, prompts: int, max_new_tokens: int, batch_size: int,
          seed: int, tokenizer_name: str = "", progress: bool = True,
          ni_root: str = "") -> dict[str, Any]:
    """Write ``out`` (JSONL: ``{"name", "text"}``); return a summary. The tokenizer (only its
    files) is ``tokenizer_name``'s, else the teacher model's."""
    from transformers import AutoTokenizer

    from fedtune.data.prompts import prompt_ids, stop_token_ids, user_message
    from fedtune.logits.remote import remote_from_env
    from fedtune.logits.service import spawn_service
    from fedtune.logits.source import tokenizer_hash
    from fedtune.models.loading import resolve_model_source

    is_url = teacher.startswith(("http://", "https://"))
    if is_url and not tokenizer_name:
        raise ValueError("a teacher URL needs the tokenizer's model")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(tokenizer_name or teacher))
    service = None
    if is_url:
        source: Any = remote_from_env(teacher)
    else:
        service = spawn_service(teacher)
        source = service.client()
    try:
        if source.info().tokenizer_hash != tokenizer_hash(tokenizer):
            raise ValueError(f"{teacher}'s service does not use the tokenizer given")
        records = prompts_records(prompts, seed, ni_root)
        stops = set(stop_token_ids(tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
        n_tokens = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f, tqdm(total=len(records), disable=not progress,
                                      desc="teacher answers", unit="prompt") as bar:
            for start in range(0, len(records), batch_size):
                batch = records[start:start + batch_size]
                ids = [prompt_ids(r, tokenizer) for r in batch]
                answers = greedy_ids(source, ids, max_new_tokens=max_new_tokens,
                                     stop_ids=stops, pad_id=pad)
                for j, (r, a) in enumerate(zip(batch, answers, strict=True)):
                    answer = str(tokenizer.decode([t for t in a if t not in stops],
                                                  skip_special_tokens=True)).strip()
                    text = tokenizer.apply_chat_template(
                        [{"role": "user", "content": user_message(r)},
                         {"role": "assistant", "content": answer}], tokenize=False)
                    f.write(json.dumps({"name": f"{r.category}-{start + j}", "text": text})
                            + "\n")
                    n_tokens += len(a)
                bar.update(len(batch))
    finally:
        if service is not None:
            service.stop()
    return {"teacher": teacher, "prompts": len(records), "answer_tokens": n_tokens,
            "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedtune.models.instruct_corpus",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True,
                    help="a model this command serves from a child process (fresh token), or "
                         "the URL of a running `fedtune serve-logits` (token from "
                         "FEDTUNE_LOGITS_TOKEN[_FILE]; then --tokenizer)")
    ap.add_argument("--tokenizer", default="", help="with a teacher URL: its tokenizer's model")
    ap.add_argument("--out", required=True, type=Path, help="the JSONL corpus to write")
    ap.add_argument("--prompts", type=int, default=400, help="prompts answered (default 400)")
    ap.add_argument("--max-new-tokens", type=int, default=96,
                    help="longest answer in tokens (default 96)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per session (16)")
    ap.add_argument("--seed", type=int, default=7919,
                    help="seed of the prompts (default: FedPT's distill_seed)")
    ap.add_argument("--ni", default="", metavar="DIR",
                    help="draw the prompts from Natural Instructions' training tasks under DIR "
                         "(public, natural English) instead of fedtune's generated suite")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.teacher.startswith(("http://", "https://")) and not args.tokenizer:
        ap.error("a teacher URL needs --tokenizer")
    summary = build(args.teacher, args.out, prompts=args.prompts,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    seed=args.seed, tokenizer_name=args.tokenizer, progress=not args.quiet,
                    ni_root=args.ni)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
