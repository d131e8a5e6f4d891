"""The small promises of the command line: --version, a closed pipe, descriptions in --help,
sampled generation, per-example predictions, kept checkpoints scored by round, progress lines
during evaluation, and no progress bar left frozen while the final evaluation runs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import rows, run_cli

from fedtune import __version__, runner
from fedtune.cli import main
from fedtune.config import load_config
from fedtune.configbase import ConfigError
from fedtune.federation.checkpoint import (
    CheckpointError,
    kept_rounds,
    load_checkpoint,
    save_checkpoint,
)

TINY = [
    "federation.rounds=2", "federation.clients_per_round=2", "data.num_clients=4",
    "data.generated_per_family=6", "evaluation.max_examples=4", "evaluation.max_new_tokens=4",
    "model.path=tiny", "model.tiny_vocab_size=300", "model.tiny_hidden_size=32",
    "model.tiny_layers=1", "output.plots=false", "evaluation.loss_interval=1",
    "algorithm.name=fedit",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A FedIT run that measures the eval loss every round and keeps round 1's checkpoint."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert run_cli(out, *TINY, "output.keep_checkpoints=[1]") == 0
    return out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedtune {__version__}"


def test_output_into_a_closed_pipe_is_no_traceback():
    """`fedtune config --toml | head`: the reader is gone before fedtune writes."""
    proc = subprocess.Popen([sys.executable, "-m", "fedtune", "config", "--toml"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "0"})
    proc.stdout.close()  # the reader left
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("argv, text", [
    (["generate", "--help"], "Greedy by default"),
    (["flower", "local", "--help"], "round table and closing summary"),
    (["flower", "certs", "--help"], "test CA"),
    (["report", "--help"], "by cumulative bytes"),
])
def test_help_has_descriptions(argv, text, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert text in " ".join(capsys.readouterr().out.split())


# -- generate ------------------------------------------------------------------------------------


def generate(run_dir, capsys, *extra):
    assert main(["generate", str(run_dir), "--prompt", "Reverse the word.", "--input", "cat",
                 "--max-new-tokens", "8", *extra]) == 0
    return capsys.readouterr().out


def test_generate_samples_reproducibly_and_stays_greedy_by_default(run_dir, capsys):
    greedy = generate(run_dir, capsys)
    assert generate(run_dir, capsys, "--temperature", "0") == greedy
    state = torch.get_rng_state()
    one = generate(run_dir, capsys, "--temperature", "1.5", "--seed", "1")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert generate(run_dir, capsys, "--temperature", "1.5", "--seed", "1") == one
    others = {generate(run_dir, capsys, "--temperature", "1.5", "--seed", str(s))
              for s in (2, 3, 4)}
    assert others != {one}  # a random tiny model: different seeds, different draws
    assert generate(run_dir, capsys, "--temperature", "1.5", "--top-p", "0.5", "--seed", "1")


def test_generate_refuses_top_p_without_temperature(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "x", "--top-p", "0.5"]) == 1
    assert "temperature" in capsys.readouterr().err


# -- eval: predictions, rounds, progress ---------------------------------------------------------


def test_eval_writes_predictions_and_prints_progress(run_dir, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", str(run_dir), "--predictions", str(preds)]) == 0
    out, err = capsys.readouterr()
    scores = json.loads(out)
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == scores["num_examples"] == 4
    assert set(lines[0]) == {"instruction", "input", "category", "reference", "prediction",
                             "rougeL"}
    assert sum(x["rougeL"] for x in lines) / 4 == pytest.approx(scores["rougeL"])
    for phase in ("eval: reading the data", "eval: 4 held-out records", "eval: loading",
                  "eval: loss on 4 examples", "eval: generating 4 answers"):
        assert phase in err, phase


def test_eval_scores_a_kept_round_as_the_run_measured_it(run_dir, capsys):
    assert kept_rounds(run_dir).keys() == {1}
    assert main(["eval", str(run_dir), "--round", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    measured = {r["round"]: r["eval_loss"] for r in rows(run_dir)}
    assert scores["eval_loss"] == pytest.approx(measured[1], rel=1e-6)
    assert measured[1] != pytest.approx(measured[2], rel=1e-6)
    assert main(["eval", str(run_dir), "--round", "2"]) == 0  # the last round: always there
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(measured[2],
                                                                             rel=1e-6)


def test_eval_of_a_round_not_kept_says_which_are(run_dir, capsys):
    assert main(["eval", str(run_dir), "--round", "5"]) == 1
    err = capsys.readouterr().err
    assert "round 5" in err and "[1, 2]" in err


def test_keep_checkpoints_config_is_checked():
    for bad in ("[0]", "[1.5]", '["3"]'):
        with pytest.raises(ConfigError, match="output.keep_checkpoints"):
            load_config(None, [f"output.keep_checkpoints={bad}"])
    with pytest.raises(ConfigError, match="output.checkpoint"):
        load_config(None, ["output.keep_checkpoints=[2]", "output.checkpoint=false"])


def test_kept_checkpoints_survive_and_are_verified(tmp_path):
    state = {r: {"w": torch.full((3,), float(r))} for r in range(1, 5)}
    for r in range(1, 5):
        save_checkpoint(tmp_path, r, state[r], {"wall_s": float(r)}, keep=[1, 3])
    files = sorted(p.name for p in (tmp_path / "checkpoint").glob("server-r*.safetensors"))
    assert files == ["server-r0001.safetensors", "server-r0003.safetensors",
                     "server-r0004.safetensors"]
    for r in (1, 3, 4):
        got = load_checkpoint(tmp_path, r)
        assert got is not None and got[0] == r and torch.equal(got[1]["w"], state[r]["w"])
    assert load_checkpoint(tmp_path, 2) is None
    assert load_checkpoint(tmp_path)[0] == 4  # resume still takes the last one
    kept = tmp_path / "checkpoint" / "server-r0001.safetensors"
    kept.write_bytes(kept.read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path, 1)


# -- the run's progress bar ----------------------------------------------------------------------


def test_the_rounds_bar_is_closed_before_the_final_evaluation(tmp_path, monkeypatch):
    bars, seen = [], []
    real_tqdm, real_measure = runner.tqdm, runner._measure

    def tqdm(*args, **kwargs):
        bars.append(real_tqdm(*args, **kwargs))
        return bars[-1]

    def measure(s, round_, final):
        if round_ > 0:
            seen.append((round_, final, bars[-1].disable))  # closed bars are disabled
        return real_measure(s, round_, final)

    monkeypatch.setattr(runner, "tqdm", tqdm)
    monkeypatch.setattr(runner, "_measure", measure)
    cfg = load_config(None, TINY)
    runner.run(cfg, tmp_path / "run", progress=True)
    assert seen == [(1, False, False), (2, True, True)]
