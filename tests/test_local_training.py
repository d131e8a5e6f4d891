"""The backprop devices' local loop: learning-rate schedules, gradient accumulation and
gradient checkpointing (issue 14), against hand-computed values or the plain loop."""

import pytest
import torch
from conftest import build, examples, tiny_model

from fedtune.algorithms.config import AlgorithmConfig
from fedtune.algorithms.fedavg.wire import Reply
from fedtune.algorithms.local import backprop_step, make_scheduler
from fedtune.configbase import ConfigError
from fedtune.wire import TensorSpec


def rates(name: str, warmup: int, steps: int) -> list[float]:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = make_scheduler(opt, name, warmup, steps)
    seen = []
    step = backprop_step([w], opt, 0.0, lambda _b: (w - 1).pow(2).sum(), scheduler=sched)
    for i in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        step(i, None)
    return seen


def test_schedules_by_hand():
    assert rates("constant", 0, 4) == [1.0] * 4
    assert rates("constant", 2, 4) == [0.0, 0.5, 1.0, 1.0]
    assert rates("linear", 2, 6) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert rates("cosine", 0, 4) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])


def test_accumulating_two_halves_is_one_step_on_the_whole_batch():
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 1.0, 0.0, 5.0])

    def train(accumulate: int) -> torch.Tensor:
        w = torch.nn.Parameter(torch.tensor([0.5]))
        opt = torch.optim.SGD([w], lr=0.1)
        step = backprop_step([w], opt, 0.0, lambda idx: (w * x[idx] - y[idx]).pow(2).mean(),
                             accumulate=accumulate)
        batches = [[0, 1, 2, 3]] if accumulate == 1 else [[0, 1], [2, 3]]
        for i, b in enumerate(batches):
            step(i, b)
        return w.detach()

    assert torch.allclose(train(1), train(2))
    assert not torch.equal(train(1), torch.tensor([0.5]))


def fedit(**kw) -> AlgorithmConfig:
    cfg = AlgorithmConfig(name="fedit", local_steps=2, batch_size=2, lr=1e-2, **kw)
    cfg.validate()
    return cfg


def reply_of(cfg: AlgorithmConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # peft draws the LoRA A matrices from the global RNG
    server, device, model = build(cfg, tiny_model())
    server.begin_round(1)
    up = device.round(model, server.download(1, 0), examples(0), 1, 7)
    return Reply.decode(up, TensorSpec.of(server.theta), expect_round=1).tensors


def test_gradient_checkpointing_trains_the_same_adapters():
    plain, ckpt = reply_of(fedit()), reply_of(fedit(gradient_checkpointing=True))
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-6), k
    assert any(not torch.equal(plain[k], reply_of(fedit(lr_schedule="cosine"))[k])
               for k in plain)  # and a schedule changes what is trained


def test_bad_schedule_settings_name_the_key():
    with pytest.raises(ConfigError, match="algorithm.lr_schedule"):
        fedit(lr_schedule="exponential")
    with pytest.raises(ConfigError, match="algorithm.warmup_steps"):
        fedit(warmup_steps=5)
    with pytest.raises(ConfigError, match="algorithm.grad_accumulation"):
        fedit(grad_accumulation=0)
