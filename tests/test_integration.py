"""Whole runs through the CLI on a tiny model: run directory contents, resume, refusals."""

import json
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import torch
from conftest import rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedtune.cli import main

SMALL = [
    "federation.rounds=2", "federation.clients_per_round=2", "data.num_clients=4",
    "data.generated_per_family=6", "algorithm.local_steps=3", "algorithm.batch_size=2",
    "evaluation.max_examples=6", "evaluation.max_new_tokens=6", "evaluation.rouge_interval=1",
    "evaluation.loss_interval=1",
    "model.path=tiny", "model.tiny_vocab_size=300", "algorithm.lr=0.003",
]

# Golden values: fp32 on CPU, torch 2.13.0, unchanged since before the method contract. They pin
# the whole pipeline (data generation, partition, tokenizer training, model init, sampling, local
# training, aggregation, evaluation).
GOLDEN = {
    "fedavg": {"train_loss": [5.587761869033177, 5.253327832077488],
               "eval_loss": [5.7178473839393025, 5.34581287090595, 5.058587294358474]},
    "fedit": {"train_loss": [5.728035062551498, 5.654075348015987],
              "eval_loss": [5.7178473839393025, 5.68113767183744, 5.5907716017503]},
}


def run_cli(out: Path, *extra: str) -> int:
    return conftest.run_cli(out, *SMALL, *extra)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedit"])
def test_two_rounds_through_the_cli(tmp_path, algorithm, capsys):
    out = tmp_path / algorithm
    assert run_cli(out, f"algorithm.name={algorithm}") == 0
    printed = capsys.readouterr().out  # --quiet: no bars or tables, the closing summary only
    assert f"run directory: {out}" in printed and "Rouge-L" in printed
    assert "round train_loss" not in printed
    r = rows(out)
    assert [x["round"] for x in r] == [0, 1, 2]
    train = [x["train_loss"] for x in r[1:]]
    evals = [x["eval_loss"] for x in r]
    assert train == pytest.approx(GOLDEN[algorithm]["train_loss"], rel=1e-4)
    assert evals == pytest.approx(GOLDEN[algorithm]["eval_loss"], rel=1e-4)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["rounds"] == 2
    for key in ("rougeL", "eval_loss"):
        assert summary["base"][key] is not None and summary["final"][key] is not None
    b = summary["bytes"]
    assert b["up_per_client_round"] > 0 and b["down_per_client_round"] > 0
    assert b["total"] == sum(x["bytes_up"] + x["bytes_down"] for x in r[1:])
    assert summary["peak_memory_mb"] > 0 and summary["wall_s"] > 0
    for name in ("config.toml", "partition.json", "eval_metric.png", "bytes.png", "run.log"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.num_parameters() > 0
    if algorithm == "fedit":
        assert (out / "adapter" / "adapter_config.json").is_file()
        # LoRA traffic is a small fraction of the full model's
        assert b["up_per_client_round"] < 0.2 * 4 * model.num_parameters()
    else:
        assert b["up_per_client_round"] >= 4 * model.num_parameters()


def test_fedit_export_equals_global_adapter(tmp_path):
    out = tmp_path / "fedit"
    assert run_cli(out, "algorithm.name=fedit", "federation.rounds=1") == 0
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((run_dir / "model").glob("*.safetensors"))))


@pytest.mark.parametrize("algorithm", ["fedavg", "fedit"])
def test_resume_after_interrupt_gives_the_same_model(tmp_path, interrupt_at_round, algorithm):
    straight = tmp_path / "straight"
    assert run_cli(straight, f"algorithm.name={algorithm}", "federation.rounds=3") == 0

    broken = tmp_path / "broken"
    interrupt_at_round(2)
    assert run_cli(broken, f"algorithm.name={algorithm}", "federation.rounds=3") == 130
    assert [x["round"] for x in rows(broken)] == [0, 1]
    assert not (broken / "model").exists()
    interrupt_at_round(None)

    assert main(["run", "--quiet", "--resume", str(broken)]) == 0
    a, b = final_weights(straight), final_weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = rows(straight), rows(broken)
    assert [x["train_loss"] for x in ra] == [x["train_loss"] for x in rb]
    assert [x["cum_bytes"] for x in ra] == [x["cum_bytes"] for x in rb]


def test_existing_run_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(out, "federation.rounds=1") == 0
    assert run_cli(out, "federation.rounds=1") == 2
    assert "--resume" in capsys.readouterr().err


def test_a_second_writer_of_a_run_dir_is_refused(tmp_path, capsys):
    """While another process holds a run directory, a resume of it is refused and changes
    nothing; once that process is gone (its lock dies with it) the resume goes ahead."""
    out = tmp_path / "r"
    assert run_cli(out, "federation.rounds=1") == 0
    before = (out / "metrics.jsonl").read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('held', flush=True); "
         "time.sleep(60)", str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["run", "--quiet", "--resume", str(out)]) == 1
        err = capsys.readouterr().err
        assert "another fedtune process" in err and "4242" in err
        assert (out / "metrics.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["run", "--quiet", "--resume", str(out)]) == 0


def test_bad_config_stops_before_any_work(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(out, "data.alpha=-1") == 2
    assert "data.alpha" in capsys.readouterr().err
    assert not out.exists()


def test_eval_and_generate_on_run_and_model_dirs(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(out, "federation.rounds=1") == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert scores["eval_loss"] == pytest.approx(summary["final"]["eval_loss"], rel=1e-5)
    assert scores["rougeL"] == pytest.approx(summary["final"]["rougeL"], abs=1e-9)
    assert main(["generate", str(out / "model"), "--prompt", "Write the word backwards.",
                 "--input", "cloud", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 1


def test_engine_drops_bad_replies_and_failed_clients(tmp_path, monkeypatch):
    from fedtune.algorithms.fedavg.device import BackpropDevice

    real = BackpropDevice.round
    calls = {"n": 0}

    def flaky(self, model, payload, examples, round_, seed):
        calls["n"] += 1
        if calls["n"] == 1:
            return b"garbage that is not a message"
        if calls["n"] == 2:
            raise RuntimeError("device ran out of battery")
        return real(self, model, payload, examples, round_, seed)

    monkeypatch.setattr(BackpropDevice, "round", flaky)
    out = tmp_path / "r"
    assert run_cli(out, "algorithm.name=fedavg", "federation.rounds=1",
                   "federation.clients_per_round=3") == 0
    r = rows(out)[1]
    assert (r["accepted"], r["rejected"], r["failed"]) == (1, 1, 1)
    assert len(r["clients"]) == 3


@pytest.mark.parametrize("damage", ["nan", "altered"])
def test_a_damaged_checkpoint_is_refused_never_resumed(tmp_path, interrupt_at_round, capsys,
                                                       damage):
    """A valid safetensors file with NaN in it, or with one value changed, is refused: resuming
    would export a non-finite or a different model."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    interrupt_at_round(2)
    assert run_cli(broken, "algorithm.name=fedkseed", "federation.rounds=2") == 130
    interrupt_at_round(None)
    meta = json.loads((broken / "checkpoint" / "engine.json").read_text())
    state_file = broken / "checkpoint" / meta["state_file"]
    state = load_file(str(state_file))
    acc = state["accumulators"].clone()
    acc[0] = float("nan") if damage == "nan" else acc[0] + 1.0
    state["accumulators"] = acc
    if damage == "nan":  # a consistent checksum: only the finiteness check can catch it
        save_file(state, str(state_file))
        import hashlib

        meta["state_sha256"] = hashlib.sha256(state_file.read_bytes()).hexdigest()
        (broken / "checkpoint" / "engine.json").write_text(json.dumps(meta))
    else:
        save_file(state, str(state_file))
    capsys.readouterr()
    assert main(["run", "--quiet", "--resume", str(broken)]) == 1
    err = capsys.readouterr().err
    assert ("non-finite" in err) if damage == "nan" else ("checksum" in err), err
    assert not (broken / "model").exists()
    assert [x["round"] for x in rows(broken)] == [0, 1]  # nothing was appended


def test_a_tiny_model_is_built_whole_or_not_at_all(tmp_path, monkeypatch):
    """Killed while the tiny base model is written: no half model directory is left where a
    later run would take it for a complete one."""
    from transformers import PreTrainedTokenizerFast

    from fedtune.models.tiny import TEST_SENTENCES, build_tiny_model

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", crash)
    out = tmp_path / "base_model"
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model(TEST_SENTENCES, out, vocab_size=300, hidden_size=16, num_layers=1,
                         num_heads=2, max_positions=64, seed=0)
    assert not out.exists()
    monkeypatch.undo()
    build_tiny_model(TEST_SENTENCES, out, vocab_size=300, hidden_size=16, num_layers=1,
                     num_heads=2, max_positions=64, seed=0)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_a_mistyped_model_is_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--out", str(out), "--set", "model.path=smal"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'smal'" in err and "built-in name" in err, err
    assert not out.exists()  # nothing written: no partition, no run directory
    assert main(["eval", str(tmp_path / "nonexistent")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_eval_takes_a_built_in_model_name(capsys):
    assert main(["eval", "small", "--set", "evaluation.max_examples=2",
                 "--set", "evaluation.max_new_tokens=2", "--set", "data.generated_per_family=4"]
                ) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["num_examples"] == 2 and scores["eval_loss"] > 0
