"""FedPT distillation and evaluation of the proxy-tuned model (tiny models, CPU)."""

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_fedpt_proxy import StubTokenizer, llama

from fedtune.algorithms.fedkseed.replay import rebuild_, seed_pool
from fedtune.algorithms.fedpt.config import FedPTConfig
from fedtune.algorithms.fedpt.distill import (
    distill,
    distill_zo,
    kl_to_teacher,
    kl_top_k,
    large_targets,
    mean_kl,
    teacher_targets,
)
from fedtune.algorithms.fedpt.evaluate import evaluate_proxy
from fedtune.algorithms.fedpt.proxy import ProxyModel
from fedtune.algorithms.fedpt.server import FedPTServer, distill_records
from fedtune.configbase import ConfigError
from fedtune.data.generated import HELDOUT_FAMILIES, generate_suite
from fedtune.eval.evaluate import evaluate
from fedtune.logits import LocalLogits
from fedtune.logits.source import top_logits
from fedtune.models.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALL, LARGE = ROOT / "fedtune/base_models/small", ROOT / "fedtune/base_models/large"


def test_kl_by_hand():
    same = torch.tensor([[1.0, 2.0, 0.5]])
    assert float(kl_to_teacher(same, same.clone(), 2.0)) == pytest.approx(0.0, abs=1e-7)
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * (torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(2 / 3)))
    assert float(kl_to_teacher(teacher, student, 1.0)) == pytest.approx(float(want), rel=1e-6)
    # T scales the logits inside and the loss by T² outside (Hinton et al.)
    t, s = teacher * 3, student * 3
    assert float(kl_to_teacher(t, s, 3.0)) == pytest.approx(9 * float(want), rel=1e-5)


def test_top_k_kl_by_hand_and_against_the_full_kl():
    # p = (0.5, 0.3, 0.2), q = (0.25, 0.25, 0.5); top 1: {0.5} and a bucket {0.5} vs (0.25, 0.75)
    p = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_top_k(top_logits(p, 1), q)) == pytest.approx(want, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g)
    full = float(kl_to_teacher(teacher, student, 1.0))
    assert float(kl_top_k(top_logits(teacher, 50), student)) == pytest.approx(full, rel=1e-5)
    bounds = [float(kl_top_k(top_logits(teacher, k), student)) for k in (1, 4, 16, 50)]
    # a lower bound up to float32 rounding (k = 50 equals the full KL to rel 1e-5, above)
    assert all(b <= full * (1 + 1e-5) for b in bounds) and bounds[-1] > bounds[0]
    with_grad = student.clone().requires_grad_()
    kl_top_k(top_logits(teacher, 8), with_grad).backward()
    assert with_grad.grad is not None and bool(torch.isfinite(with_grad.grad).all())


def teacher_and_targets(expert_scale: float = 1.0):
    """Tiny (base, tuned) pair, the proxy over them as teacher, and its targets on 32 training
    and 8 held-out random prompts. ``expert_scale`` sharpens the tuned model's head."""
    tok = StubTokenizer(40)
    large, base, tuned = llama(0, hidden=32), llama(1), llama(2)
    with torch.no_grad():
        tuned.lm_head.weight.mul_(expert_scale)
    teacher = ProxyModel(LocalLogits(large, tok), LocalLogits(tuned, tok), LocalLogits(base, tok))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 8, (40,), generator=g)]
    kw = {"max_new_tokens": 8, "eos_id": None, "pad_id": 0}
    return (base, tuned, teacher_targets(teacher, prompts[:32], **kw),
            teacher_targets(teacher, prompts[32:], **kw))


def test_large_targets_recover_the_bare_large_models_logits():
    """anti_expert = 'distilled' trains the anti-expert toward s_large, which the server
    recovers as s_proxy - alpha (s_tuned - s_base) without asking the large model again."""
    tok = StubTokenizer(40)
    large, base, tuned = llama(0, hidden=32), llama(1), llama(2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 8, (6,), generator=g)]
    for alpha in (1.0, 0.5):
        teacher = ProxyModel(LocalLogits(large, tok), LocalLogits(tuned, tok),
                             LocalLogits(base, tok), alpha=alpha)
        targets = teacher_targets(teacher, prompts, max_new_tokens=5, eos_id=None, pad_id=0)
        got = large_targets(targets, tuned, base, alpha=alpha, pad_id=0, vocab_size=40,
                            batch_size=4)
        assert len(got) == len(targets) == len(prompts)
        for t, g_ in zip(targets, got, strict=True):
            assert g_.ids == t.ids and g_.prompt_len == t.prompt_len
            with torch.no_grad():
                want = large(input_ids=torch.tensor([t.ids])).logits[0]
            rows = want[t.prompt_len - 1:t.prompt_len - 1 + len(t.logits)]
            torch.testing.assert_close(g_.logits, rows, rtol=1e-4, atol=1e-4)
            # and they are not the proxy's own logits (the offset is not zero here)
            assert not torch.allclose(g_.logits, t.logits, atol=1e-3)


def test_distillation_lowers_the_kl_to_the_teacher_on_held_out_prompts():
    _, tuned, train, held_out = teacher_and_targets()
    student = copy.deepcopy(tuned)
    args = {"temperature": 1.0, "pad_id": 0, "vocab_size": 40}
    before = mean_kl(student, held_out, **args)
    train_before = mean_kl(student, train, **args)
    params = list(student.parameters())
    distill(student, params, train, steps=40, batch_size=8, lr=3e-3, seed=0, **args)
    after = mean_kl(student, held_out, **args)
    assert after < 0.8 * before, (before, after)
    assert mean_kl(student, train, **args) < train_before
    # reproducible: the same seed gives the same student
    again = copy.deepcopy(tuned)
    distill(again, list(again.parameters()), train, steps=40, batch_size=8, lr=3e-3, seed=0,
            **args)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters(),
                                                  strict=True))


def test_zeroth_order_distillation_lowers_the_kl_and_devices_replay_it():
    """FedKSeed devices: the server's ZO distillation steps travel as per-seed sums of g, and
    the replay w0 - lr sum_j A_j z(s_j) from those sums alone lands on the distilled student."""
    # a confident expert: a teacher far from the base student
    base, _, train, held_out = teacher_and_targets(expert_scale=20.0)
    args = {"temperature": 1.0, "pad_id": 0, "vocab_size": 40}
    student = copy.deepcopy(base)
    params = list(student.parameters())
    w0 = [p.detach().clone() for p in params]
    before = mean_kl(student, held_out, **args)
    pool = seed_pool(3, 64)
    sums, loss = distill_zo(student, params, pool, train, steps=300, batch_size=8, eps=1e-3,
                            lr=1e-2, seed=0, **args)
    assert math.isfinite(loss) and 0 < len(sums) <= 64
    after = mean_kl(student, held_out, **args)
    assert after < 0.85 * before, (before, after)
    # a device holding w0 and the accumulators rebuilds the distilled student
    acc = torch.zeros(64)
    for j, s in sums.items():
        acc[j] = s
    device = copy.deepcopy(base)
    rebuild_(list(device.parameters()), w0, pool, acc, 1e-2)
    for a, b in zip(device.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert mean_kl(device, held_out, **args) == pytest.approx(after, rel=1e-3)


def test_proxy_eval_with_tuned_equal_base_scores_the_large_model():
    large, tok = load_model_and_tokenizer(LARGE, "float32", "cpu")
    small, _ = load_model_and_tokenizer(SMALL, "float32", "cpu")
    records = generate_suite(1, seed=5)[:6]
    proxy = ProxyModel(LocalLogits(large, tok), LocalLogits(small, tok), LocalLogits(small, tok))
    kw = {"max_new_tokens": 6, "batch_size": 4, "max_length": 128}
    got = evaluate_proxy(proxy, tok, records, **kw)
    want = evaluate(large, tok, records, **kw)
    assert got["rougeL"] == want["rougeL"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)


def test_distillation_prompts_are_the_servers_own():
    cfg = FedPTConfig(distill_prompts=48)
    pool = distill_records(cfg)
    assert len(pool) >= 48 and not {r.category for r in pool} & set(HELDOUT_FAMILIES)
    assert distill_records(cfg) == pool  # deterministic: a function of distill_seed only
    other = distill_records(FedPTConfig(distill_prompts=48, distill_seed=1))
    assert [r.input for r in other] != [r.input for r in pool]


def test_config_rejects_impossible_combinations():
    FedPTConfig(device_trainer="fedkseed").validate("algorithm.fedpt")  # ZO distillation
    with pytest.raises(ConfigError, match="large_url"):
        FedPTConfig(large_access="url").validate("algorithm.fedpt")
    with pytest.raises(ConfigError, match="distill_temperature"):
        FedPTConfig(distill_temperature=0.0).validate("algorithm.fedpt")


def test_stopping_rule():
    fake = SimpleNamespace(cfg=SimpleNamespace(stop_rougeL=0.5))
    assert FedPTServer._target_met(fake, {"rougeL": 0.5})  # type: ignore[arg-type]
    assert not FedPTServer._target_met(fake, {"rougeL": 0.49})  # type: ignore[arg-type]
    assert not FedPTServer._target_met(fake, {"eval_loss": 1.0})  # type: ignore[arg-type]
    off = SimpleNamespace(cfg=SimpleNamespace(stop_rougeL=0.0))
    assert not FedPTServer._target_met(off, {"rougeL": 1.0})  # type: ignore[arg-type]


def test_proxy_eval_loss_batches_rows_so_each_fits_the_context():
    from fedtune.algorithms.fedpt.evaluate import proxy_eval_loss
    from fedtune.data.prompts import TokenizedExample

    tok = StubTokenizer(40)
    large, small = llama(0, hidden=32), llama(1)  # 64 positions
    proxy = ProxyModel(LocalLogits(large, tok), LocalLogits(small, tok), LocalLogits(small, tok))
    long_prompt = TokenizedExample([5] * 50 + [6] * 5, [-100] * 50 + [6] * 5)
    long_answer = TokenizedExample([7] * 5 + [8] * 50, [-100] * 5 + [8] * 50)
    both = proxy_eval_loss(proxy, [long_prompt, long_answer], pad_id=0, batch_size=8)
    one = proxy_eval_loss(proxy, [long_prompt], pad_id=0, batch_size=8)
    two = proxy_eval_loss(proxy, [long_answer], pad_id=0, batch_size=8)
    assert both == pytest.approx((5 * one + 50 * two) / 55, rel=1e-6)


def test_other_losses_by_hand():
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    student = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    rev = (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
           + 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)) / 2
    assert float(kl_to_teacher(teacher, student, 1.0, "reverse-kl")) == pytest.approx(rev, rel=1e-5)
    # hard labels: the teacher's argmax is column 0 in both rows (a tie takes the first)
    ce = -(math.log(0.25) + math.log(0.5)) / 2
    assert float(kl_to_teacher(teacher, student, 5.0, "ce")) == pytest.approx(ce, rel=1e-5)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        kl_to_teacher(teacher, student, 1.0, "l2")
