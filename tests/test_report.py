"""What a person reads after a run: TensorBoard events, run.log's table, the plots, the summary,
the exported model's dtype, base model name and card, and ``fedtune report`` over two runs."""

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import rows, run_cli
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedtune.cli import main
from fedtune.config import RunConfig
from fedtune.metrics import MetricsLog
from fedtune.report import RunRecord, compare_row, compare_table, run_figures, summary_text
from fedtune.runner import build_summary

TINY = [
    "federation.rounds=2", "federation.clients_per_round=2", "data.num_clients=4",
    "data.generated_per_family=6", "evaluation.max_examples=4", "evaluation.max_new_tokens=4",
    "model.path=tiny", "model.tiny_vocab_size=300", "model.tiny_hidden_size=32",
    "model.tiny_layers=1", "algorithm.fedkseed.k_seeds=16", "algorithm.fedkseed.tau=4",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A FedIT run (fp32, eval loss every round, plots) and a FedKSeed run in bfloat16."""
    base = tmp_path_factory.mktemp("runs")
    fedit, fedkseed = base / "fedit", base / "fedkseed"
    assert run_cli(fedit, *TINY, "algorithm.name=fedit", "evaluation.loss_interval=1") == 0
    assert run_cli(fedkseed, *TINY, "algorithm.name=fedkseed", "model.dtype=bfloat16",
                   "output.plots=false") == 0
    return fedit, fedkseed


def scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


# -- TensorBoard and run.log ---------------------------------------------------------------------


def test_tensorboard_holds_every_round_metric_of_metrics_jsonl(runs):
    fedit, _ = runs
    acc, r = scalars(fedit), rows(fedit)
    assert steps(acc, "loss/train") == pytest.approx({x["round"]: x["train_loss"]
                                                      for x in r[1:]})
    assert steps(acc, "loss/eval") == pytest.approx({x["round"]: x["eval_loss"] for x in r})
    assert set(steps(acc, "eval/rougeL")) == {0, 2}  # measured before and after only
    for tag, key in (("bytes/up_per_client", "bytes_up_per_client"),
                     ("bytes/down_per_client", "bytes_down_per_client"),
                     ("bytes/cumulative_total", "cum_bytes"), ("time/round_wall_s", "wall_s"),
                     ("memory/peak_mb", "peak_memory_mb")):
        assert steps(acc, tag) == pytest.approx({x["round"]: x[key] for x in r}), tag


def test_tensorboard_after_a_resume_holds_each_round_once(tmp_path):
    """A crash after round 3's row but before its checkpoint: the resume rewrites rounds 2-3;
    TensorBoard's reader shows the new values only (the new file purges the old steps)."""
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path)
    for r in range(4):
        first.append({"round": r, "train_loss": 10.0 + r, "epsilon": 0.5 * r})
    first.close()
    resumed = MetricsLog(path, keep_through_round=1)
    for r in (2, 3):
        resumed.append({"round": r, "train_loss": 20.0 + r, "epsilon": 0.5 * r})
    resumed.close()
    acc = scalars(tmp_path)
    assert steps(acc, "loss/train") == {0: 10.0, 1: 11.0, 2: 22.0, 3: 23.0}
    assert steps(acc, "privacy/epsilon") == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5}
    assert [json.loads(x)["train_loss"] for x in path.read_text().splitlines()] == [
        10.0, 11.0, 22.0, 23.0]


def test_a_resume_within_the_first_files_second_still_supersedes_it(tmp_path):
    """Readers take event files in name order (creation second, host, pid, a per-process counter,
    compared as text: counter 10 sorts before 9). An earlier file named as if made in the same
    second or later must still come before the resumed run's file (seen once in CI)."""
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path)
    for r in range(3):
        first.append({"round": r, "train_loss": 10.0 + r})
    first.close()
    (old,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    parts = old.name.split(".")
    parts[3], parts[4] = str(int(time.time()) + 1), "zzz"  # sorts last in the next second
    old.rename(old.with_name(".".join(parts)))
    resumed = MetricsLog(path, keep_through_round=0)
    for r in (1, 2):
        resumed.append({"round": r, "train_loss": 20.0 + r})
    resumed.close()
    assert steps(scalars(tmp_path), "loss/train") == {0: 10.0, 1: 21.0, 2: 22.0}


def test_run_log_holds_the_round_table(runs):
    fedit, _ = runs
    text = (fedit / "run.log").read_text()
    assert "round train_loss eval_loss" in text
    table = [line for line in text.splitlines() if "fedtune.rounds:" in line]
    assert len([t for t in table if t.split(": ", 1)[1].split()[:1] in (["0"], ["1"], ["2"])]
               ) == 3
    assert "bytes per client per round" in text  # the closing summary too


# -- plots ---------------------------------------------------------------------------------------

ROWS = [
    {"round": 0, "train_loss": None, "eval_loss": 3.0, "rougeL": 0.10, "cum_bytes_up": 0,
     "cum_bytes_down": 0, "cum_bytes": 0},
    {"round": 1, "train_loss": 2.9, "eval_loss": None, "rougeL": None, "cum_bytes_up": 100,
     "cum_bytes_down": 100, "cum_bytes": 200},
    {"round": 2, "train_loss": 2.7, "eval_loss": 2.5, "rougeL": 0.20, "cum_bytes_up": 200,
     "cum_bytes_down": 200, "cum_bytes": 400},
]


def test_plots_have_integer_rounds_titles_units_and_honest_markers():
    figs = run_figures(ROWS, "fedit, run-a")
    rouge_ax, loss_ax = figs["eval_metric.png"].axes
    bytes_ax = figs["bytes.png"].axes[0]
    for fig in figs.values():
        fig.canvas.draw()
    for ax in (rouge_ax, loss_ax, bytes_ax):
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert "(" in ax.get_ylabel()  # a unit or a range
    assert loss_ax.get_title() == "loss"  # it holds train and eval loss
    assert {ln.get_label() for ln in loss_ax.lines} == {"train loss (mean of clients)",
                                                        "eval loss"}
    assert "fedit, run-a" in figs["eval_metric.png"]._suptitle.get_text()
    assert "fedit, run-a" in bytes_ax.get_title()
    # Rouge-L measured twice: two markers, no line implying a trend between them
    (rouge,) = rouge_ax.lines
    assert rouge.get_linestyle() == "None" and rouge.get_marker() == "o"
    # up equals down here (as for FedIT): both stay visible, told apart by marker and style
    by_label = {ln.get_label().split()[0]: ln for ln in bytes_ax.lines}
    up, down = by_label["up"], by_label["down"]
    assert up.get_marker() != down.get_marker()
    assert up.get_linestyle() != down.get_linestyle()
    assert up.get_zorder() > down.get_zorder()


# -- summary and export --------------------------------------------------------------------------


def test_fedpt_summary_names_the_proxy_manifest(tmp_path):
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "fedpt.json").write_text("{}")
    rows_ = [{"round": 0, "bytes_up_per_client": 0, "bytes_down_per_client": 0,
              "peak_memory_mb": 1.0},
             {"round": 1, "bytes_up_per_client": 5, "bytes_down_per_client": 5,
              "peak_memory_mb": 2.0}]
    summary = build_summary(RunConfig(), rows_, 2, 2, {"cum_bytes_up": 10, "cum_bytes_down": 10,
                                                       "wall_s": 1.0},
                            tmp_path, tmp_path / "model", [], torch.device("cpu"))
    assert summary["product"] == str(tmp_path / "proxy" / "fedpt.json")
    text = summary_text(summary)
    assert "proxy/fedpt.json" in text and "tuned small model" in text


def test_fedkseed_exports_the_configured_dtype(runs):
    _, fedkseed = runs
    tensors = load_file(str(fedkseed / "model" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((fedkseed / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fedkseed / "model")
    assert model.dtype == torch.bfloat16


def test_adapter_names_its_base_portably_and_has_a_model_card(runs, monkeypatch):
    fedit, _ = runs
    adapter = fedit / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "../base_model" and not Path(base).is_absolute()
    card = (adapter / "README.md").read_text()
    assert "[More Information Needed]" not in card  # peft's template
    summary = json.loads((fedit / "summary.json").read_text())
    for text in ("fedit", "../base_model", "generated", f"{summary['final']['eval_loss']:.4f}",
                 "2 rounds"):
        assert text in card, text
    assert "fedit" in (fedit / "model" / "README.md").read_text()
    from fedtune.models.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(adapter), "float32", "cpu")  # from anywhere
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(adapter)  # plain peft: the base is relative to the adapter directory
    assert AutoPeftModelForCausalLM.from_pretrained(".") is not None


# -- fedtune report ------------------------------------------------------------------------------


def test_report_of_two_runs_prints_one_table_and_draws_one_png(runs, tmp_path, capsys):
    fedit, fedkseed = runs
    out = tmp_path / "report"
    assert main(["report", str(fedit), str(fedkseed), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("method", "eval loss before", "Rouge-L before", "up/client/round",
                 "total bytes", "wall s", "peak MB", "fedit", "fedkseed"):
        assert text in printed, text
    assert "epsilon" not in printed  # no private run
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text().splitlines()
    assert md[0].startswith("| run | method | rounds |") and len(md) == 4


def test_compare_row_by_hand():
    run = RunRecord("r", "fedkseed", [
        {"round": 0, "eval_loss": 3.0, "rougeL": 0.1, "cum_bytes": 0, "peak_memory_mb": 5.0},
        {"round": 1, "eval_loss": None, "rougeL": None, "bytes_up_per_client": 10,
         "bytes_down_per_client": 30, "cum_bytes": 80, "wall_s": 1.0, "peak_memory_mb": 7.0,
         "epsilon": 2.0},
        {"round": 2, "eval_loss": 2.0, "rougeL": 0.3, "bytes_up_per_client": 20,
         "bytes_down_per_client": 30, "cum_bytes": 180, "wall_s": 2.0, "peak_memory_mb": 6.0,
         "epsilon": 3.0}], {})
    line = compare_row(run)
    assert line == {"run": "r", "method": "fedkseed", "rounds": 2, "eval_loss_before": 3.0,
                    "eval_loss_after": 2.0, "rougeL_before": 0.1, "rougeL_after": 0.3,
                    "guard_loss_before": None, "guard_loss_after": None,
                    "guard_loops_before": None, "guard_loops_after": None,
                    "up_per_client_round": 15.0, "down_per_client_round": 30.0,
                    "total_bytes": 180, "wall_s": 3.0, "peak_memory_mb": 7.0, "epsilon": 3.0}
    head = compare_table([line]).splitlines()[0]
    assert "epsilon" in head and "guard" not in head  # columns only where a run has them
    run.rows[0].update(guard_eval_loss=2.5, guard_repetition=0.0)
    run.rows[2].update(guard_eval_loss=2.6, guard_repetition=0.25)
    line = compare_row(run)
    assert (line["guard_loss_before"], line["guard_loss_after"]) == (2.5, 2.6)
    assert (line["guard_loops_before"], line["guard_loops_after"]) == (0.0, 0.25)
    table = compare_table([line])
    assert "guard loss before" in table and "25%" in table


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "not a fedtune run directory" in capsys.readouterr().err
