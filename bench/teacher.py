"""What one distillation step from a black-box teacher costs: the teacher's logits through
``fedtune serve-logits`` in full against its top k, and the student's step on either.

    python -m bench.teacher                        smollm2-135m as the teacher, a 49,152-token
                                                   student of hidden 192 x 4 layers (tied)
    python -m bench.teacher --quick                fedtune's ``large`` and ``small`` (seconds)

The teacher runs in its own process (a spawned service with its token), as `fedtune pretrain
--teacher` uses it; each figure is the median of ``--repeats`` calls on the same (B, L) block of
token ids, measured alternately (full, top-k, full, ...) so that a change of load hits both.
Bytes are the reply bodies. The student step is `kd_loss` forward and backward (no optimizer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def bench(teacher: str, student_tokenizer: str, batch: int, length: int, k: int, repeats: int,
          hidden: int, layers: int, heads: int, threads: int) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from fedtune.logits.service import spawn_service
    from fedtune.logits.source import forced_logits, forced_top
    from fedtune.models.loading import load_tokenizer
    from fedtune.models.pretrain import kd_loss
    from fedtune.models.tiny import tiny_llama_config

    torch.set_num_threads(threads)
    tok = load_tokenizer(student_tokenizer)
    svc = spawn_service(teacher, threads=threads)
    try:
        client = svc.client()
        vocab = client.info().vocab_size
        g = torch.Generator().manual_seed(0)
        x = torch.randint(3, vocab, (batch, length), generator=g)
        y = torch.randint(3, vocab, (batch, length), generator=g)
        forced_logits(client, x[:, :8])  # warm-up: the service's first forward
        times: dict[str, list[float]] = {"full": [], "top": []}
        outs: dict[str, Any] = {}
        for _ in range(repeats):
            for name, call in (("full", lambda: forced_logits(client, x)),
                               ("top", lambda: forced_top(client, x, k))):
                t0 = time.perf_counter()
                outs[name] = call()
                times[name].append(time.perf_counter() - t0)
    finally:
        svc.stop()
    full, top = outs["full"], outs["top"]
    bytes_full = full.numel() * 4
    bytes_top = top.values.numel() * 8 + top.lse.numel() * 4
    config = tiny_llama_config(len(tok), hidden_size=hidden, num_layers=layers, num_heads=heads,
                               max_positions=length, pad_token_id=tok.pad_token_id or 0,
                               bos_token_id=tok.bos_token_id or 0,
                               eos_token_id=tok.eos_token_id or 0, tie_embeddings=True)
    student = LlamaForCausalLM(config).float().train()
    step: dict[str, list[float]] = {"full": [], "top": [], "ce": []}
    for _ in range(repeats):
        for name, t in (("full", full), ("top", top), ("ce", None)):
            t0 = time.perf_counter()
            if t is None:
                logits = student(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            else:
                loss = kd_loss(student, x, y, t, 0.5, 1.0)[0]
            loss.backward()
            student.zero_grad(set_to_none=True)
            step[name].append(time.perf_counter() - t0)
    med = {k_: statistics.median(v) for k_, v in times.items()}
    smed = {k_: statistics.median(v) for k_, v in step.items()}
    return {"teacher": teacher, "batch": batch, "length": length, "top_k": k,
            "threads": threads, "repeats": repeats, "vocab": vocab,
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "teacher_s": med, "reply_bytes": {"full": bytes_full, "top": bytes_top},
            "student_step_s": smed,
            "step_s": {"full": med["full"] + smed["full"], "top": med["top"] + smed["top"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fedtune's small pair, seconds")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.quick:
        a.teacher, a.batch, a.length, a.repeats, a.hidden, a.layers, a.heads = \
            "large", 2, 64, 2, 64, 2, 2
    res = bench(a.teacher, a.teacher, a.batch, a.length, a.top_k, a.repeats, a.hidden,
                a.layers, a.heads, a.threads)
    res["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    t, b, s = res["teacher_s"], res["reply_bytes"], res["student_step_s"]
    print(f"teacher {a.batch}x{a.length}: full {t['full']:.2f} s ({b['full'] / 1e6:.1f} MB), "
          f"top-{a.top_k} {t['top']:.2f} s ({b['top'] / 1e6:.2f} MB); student step: full KL "
          f"{s['full']:.2f} s, top-k KL {s['top']:.2f} s, CE only {s['ce']:.2f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
