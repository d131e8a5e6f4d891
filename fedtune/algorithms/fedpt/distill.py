"""Distilling the proxy-tuned large model (teacher) into the small model (student), on the server.

Sequence-level distillation on server-held prompts (never the devices' data): the teacher
continues each prompt greedily (:func:`teacher_targets`), keeping its logits s̃ at every generated
position; the student is then trained to match those distributions at the same positions, by
default with

    L = T² · mean over positions of KL( softmax(s̃ / T) ‖ softmax(s_student / T) )

(Hinton et al. 2015: the T² keeps gradient magnitudes comparable across temperatures; the other
losses are in :func:`kl_to_teacher`). The
teacher's logits are fixed before the student moves, so the tuned small model inside the teacher
is the aggregated one, not the student being trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.algorithms.fedkseed.device import draw_seed_indices
from fedtune.algorithms.fedpt.proxy import ProxyModel, fit_prompts, proxy_decode
from fedtune.algorithms.local import backprop_step, run_steps
from fedtune.logits.source import TopLogits
from fedtune.zo.spec import DEFAULT_Z, ZSpec
from fedtune.zo.step import zo_step_on

LOSSES = ("kl", "reverse-kl", "ce")


def kl_to_teacher(teacher: torch.Tensor, student: torch.Tensor, temperature: float,
                  loss: str = "kl") -> torch.Tensor:
    """The distillation loss over rows i of (N, V) logits, with p = softmax(teacher / T) and
    q = softmax(student / T):

    * 'kl': T² · mean_i KL(p_i ‖ q_i) (forward KL, Hinton et al. 2015: the student covers the
      teacher's whole distribution);
    * 'reverse-kl': T² · mean_i KL(q_i ‖ p_i) (mode seeking, as in MiniLLM);
    * 'ce': mean_i −log softmax(student_i)[argmax teacher_i] (hard labels: sequence-level KD of
      the teacher's greedy output; T unused).
    """
    if loss == "ce":
        return torch.nn.functional.cross_entropy(student.float(), teacher.argmax(-1))
    t = temperature
    log_p = torch.log_softmax(teacher.float() / t, dim=-1)
    log_q = torch.log_softmax(student.float() / t, dim=-1)
    if loss == "kl":
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N,)
    elif loss == "reverse-kl":
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # (N,)
    else:
        raise ValueError(f"unknown distillation loss {loss!r}; expected one of {list(LOSSES)}")
    return kl.mean() * t * t


def kl_top_k(teacher: TopLogits, student: torch.Tensor) -> torch.Tensor:
    """mean_i KL(p_i || q_i) at T = 1 from the teacher's top k only (rows of (N, k)
    :class:`TopLogits`; ``student`` (N, V) logits): the k tokens exactly, and all other tokens
    as one bucket holding the probability left, 1 - sum_k p (the student's: 1 - sum_k q). Merging
    outcomes can only lower a KL, so this is a lower bound of the full KL, equal to it when k
    covers the vocabulary or the teacher's tail is empty."""
    return kl_top_k_log_q(teacher, torch.log_softmax(student.float(), dim=-1))


def kl_top_k_log_q(teacher: TopLogits, log_q: torch.Tensor) -> torch.Tensor:
    """:func:`kl_top_k` from the student's log-probabilities (N, V), for a caller that needs
    them for its cross-entropy too (one log-softmax over a large vocabulary, not two)."""
    log_p = teacher.log_probs().to(log_q.device)
    log_qk = log_q.gather(-1, teacher.indices.to(log_q.device))
    head = (log_p.exp() * (log_p - log_qk)).sum(-1)
    tiny = torch.finfo(torch.float32).tiny
    tail_p = (1 - log_p.exp().sum(-1)).clamp(min=0)
    tail_q = (1 - log_qk.exp().sum(-1)).clamp(min=tiny)
    tail = torch.where(tail_p > 0, tail_p * (tail_p.clamp(min=tiny).log() - tail_q.log()),
                       torch.zeros_like(tail_p))
    return (head + tail).mean()


@dataclass
class Target:
    """One distillation sequence: ids = prompt + teacher's continuation; the teacher's logits at
    the ``len(logits)`` positions that predict the continuation."""

    ids: list[int]
    prompt_len: int
    logits: torch.Tensor  # (n, V), row j predicts ids[prompt_len + j]


def teacher_targets(proxy: ProxyModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_id: int | None, pad_id: int, batch_size: int = 8) -> list[Target]:
    """Greedy continuations of ``prompts`` by the proxy-tuned model, with its logits."""
    prompts = fit_prompts(proxy, prompts, max_new_tokens)
    out: list[Target] = []
    for start in range(0, len(prompts), min(batch_size, proxy.max_batch)):
        batch = prompts[start:start + min(batch_size, proxy.max_batch)]
        dec = proxy_decode(proxy, batch, max_new_tokens=max_new_tokens, eos_id=eos_id,
                           pad_id=pad_id, keep_logits=True)
        assert dec.logits is not None
        for p, toks, logits in zip(batch, dec.tokens, dec.logits, strict=True):
            if toks:
                out.append(Target(list(p) + toks, len(p), logits))
    return out


def _student_logits(model: torch.nn.Module, batch: Sequence[Target], pad_id: int,
                    vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits, teacher logits) at the distilled positions of ``batch``, both (N, V)."""
    device = next(model.parameters()).device
    width = max(len(t.ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(batch):  # right padding: a causal model's real positions ignore it
        ids[i, :len(t.ids)] = torch.tensor(t.ids)
        mask[i, :len(t.ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
    rows = torch.cat([torch.full((len(t.logits),), i) for i, t in enumerate(batch)])
    cols = torch.cat([torch.arange(len(t.logits)) + t.prompt_len - 1 for t in batch])
    student = logits[rows.to(device), cols.to(device), :vocab_size]  # (N, V)
    teacher = torch.cat([t.logits for t in batch]).to(device)  # (N, V)
    return student, teacher


@torch.no_grad()
def large_targets(targets: Sequence[Target], tuned: torch.nn.Module, base: torch.nn.Module, *,
                  alpha: float, pad_id: int, vocab_size: int,
                  batch_size: int = 8) -> list[Target]:
    """The bare large model's logits at the positions of ``targets``, recovered without asking
    for them: s_large = s̃ − α (s_tuned − s_base), with s̃ the proxy's logits that ``targets``
    hold and ``tuned``, ``base`` the small models that were inside that proxy, in eval mode (run
    here on the whole sequences; the proxy ran them step by step with caches, so the two agree
    to float32 rounding). What the anti-expert is distilled toward with
    ``anti_expert = 'distilled'``."""
    out: list[Target] = []
    for start in range(0, len(targets), batch_size):
        batch = targets[start:start + batch_size]
        s_tuned, proxy = _student_logits(tuned, batch, pad_id, vocab_size)
        s_base, _ = _student_logits(base, batch, pad_id, vocab_size)
        large = (proxy - alpha * (s_tuned - s_base)).cpu()
        lengths = [len(t.logits) for t in batch]
        for t, rows in zip(batch, large.split(lengths), strict=True):
            out.append(Target(t.ids, t.prompt_len, rows))
    return out


@torch.no_grad()
def mean_kl(model: torch.nn.Module, targets: Sequence[Target], *, temperature: float,
            pad_id: int, vocab_size: int, batch_size: int = 8, loss: str = "kl") -> float:
    """Position-weighted mean of the distillation loss over ``targets`` (no update)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(targets), batch_size):
        batch = targets[start:start + batch_size]
        s, t = _student_logits(model, batch, pad_id, vocab_size)
        total += float(kl_to_teacher(t, s, temperature, loss)) * len(s)
        n += len(s)
    model.train(was_training)
    return total / n if n else float("nan")


def distill(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
            targets: Sequence[Target], *, steps: int, batch_size: int, lr: float,
            temperature: float, pad_id: int, vocab_size: int, seed: int,
            loss: str = "kl") -> float:
    """Train ``params`` of the student ``model`` in place on ``targets``; return the mean loss.

    AdamW, fresh each call, gradients clipped to norm 1, through the one local loop
    (:func:`fedtune.algorithms.local.run_steps`: seeded batches and dropout, so a round's
    distillation is reproducible and a resume gives the same model).
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def loss_fn(batch: list[Target]) -> torch.Tensor:
        s, t = _student_logits(model, batch, pad_id, vocab_size)
        return kl_to_teacher(t, s, temperature, loss)

    return run_steps(model, targets, steps=steps, batch_size=batch_size, seed=seed,
                     collate=list, step=backprop_step(params, opt, 1.0, loss_fn),
                     train_mode=True, what="distillation").loss


def distill_zo(model: torch.nn.Module, params: Sequence[torch.Tensor], pool: Sequence[int],
               targets: Sequence[Target], *, steps: int, batch_size: int, eps: float, lr: float,
               temperature: float, pad_id: int, vocab_size: int, seed: int,
               loss: str = "kl", z: ZSpec = DEFAULT_Z) -> tuple[dict[int, float], float]:
    """Distillation for FedKSeed devices: ``steps`` two-point zeroth-order steps on the
    distillation loss, each along z(s_j) for a pool seed s_j (the devices' z), ``params``
    updated in place.

    Returns ({pool index j: Σ g_j}, mean loss). Those sums are all the devices need: the
    server adds them to its accumulators A, and every device's replay w0 − lr Σ_j A_j z(s_j)
    then includes the distillation, so FedKSeed devices still download only K scalars. ``lr``
    and ``eps`` must be FedKSeed's (the replay scales A by its lr).
    """
    indices = draw_seed_indices(len(pool), steps, seed)
    sums: dict[int, float] = {}

    def step(i: int, batch: list[Target]) -> float | None:
        def objective() -> float:
            s, t = _student_logits(model, batch, pad_id, vocab_size)
            return float(kl_to_teacher(t, s, temperature, loss))

        taken = zo_step_on(objective, params, pool[indices[i]], eps, lr, spec=z)
        if taken is None:
            return None
        sums[indices[i]] = sums.get(indices[i], 0.0) + taken.g
        return taken.loss

    res = run_steps(model, targets, steps=steps, batch_size=batch_size, seed=seed, collate=list,
                    step=step, train_mode=False, what="ZO distillation")
    return sums, res.loss
