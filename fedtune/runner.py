"""A run, top to bottom: set up, evaluate the base, federate, evaluate, export, report.

``run(cfg, run_dir)`` is the recipe behind ``fedtune run``: it writes the resolved config, the
partition summary, ``metrics.jsonl`` (round 0 = the base model), a checkpoint after every round,
the exported model, the plots and ``summary.json``. ``resume(run_dir)`` reloads the saved config and
the last checkpoint and continues; because client sampling and every client's randomness are
pure functions of (seed, round, client), the resumed run ends with the same model as a straight one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedtune.algorithms import METHODS, Device, DeviceEnv, MethodContext, Server
from fedtune.algorithms.privacy import Accountant
from fedtune.config import RunConfig, load_config, save_config
from fedtune.configbase import check
from fedtune.cpu import ThreadPolicy
from fedtune.data.pipeline import all_texts, build_federated_data
from fedtune.data.prompts import TokenizedExample, resolve_template, tokenize_records
from fedtune.data.records import Record
from fedtune.eval.evaluate import evaluate, select_eval_records
from fedtune.eval.guard import guard_records, measure_guard
from fedtune.federation.checkpoint import load_checkpoint, save_checkpoint
from fedtune.federation.engine import Engine, EngineFactory, RoundResult
from fedtune.federation.simulation import InProcessEngine
from fedtune.metrics import MetricsLog, peak_memory_mb, reset_peak_memory
from fedtune.models.loading import load_model_and_tokenizer, resolve_device
from fedtune.models.tiny import build_tiny_model
from fedtune.publish import finish_export
from fedtune.report import (
    answer_rows,
    answers_text,
    plot_run,
    rounds_table,
    summary_text,
    table_header,
    table_row,
)
from fedtune.summary import build_summary

log = logging.getLogger(__name__)
CONFIG_NAME = "config.toml"
BASE_ANSWERS = "answers_base.json"
GUARD_BASE_ANSWERS = "guard_answers_base.json"
LOCK_NAME = ".lock"


class RunDirBusy(FileExistsError):
    """Another live process is writing the run directory (the CLI reports it as an error)."""


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for one run; a second writer is refused at once.

    Two processes appending to one ``metrics.jsonl`` and overwriting one checkpoint (say an old
    ServerApp still alive after its SuperLink was restarted, beside the resumed one) would leave
    a run that neither wrote. The lock is an ``flock`` on ``run_dir/.lock``: the kernel drops it
    when its holder dies, so a crashed run never leaves the directory locked.
    """
    f = open(run_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunDirBusy(f"{run_dir} is being written by another fedtune process "
                             f"(pid {holder}); wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock


# the per-round table goes to run.log as rounds end (the console gets it whole at the end)
table_log = logging.getLogger("fedtune.rounds")
table_log.propagate = False
table_log.setLevel(logging.INFO)


def _add_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    table_log.addHandler(handler)
    return handler


def base_model_path(cfg: RunConfig, run_dir: Path, texts: list[str]) -> str:
    """The base model to load; ``tiny`` builds one (tokenizer trained on the run's texts)."""
    m = cfg.model
    if m.path != "tiny":
        return m.path
    out = run_dir / "base_model"
    if not ((out / "config.json").is_file() and (out / "tokenizer.json").is_file()):
        log.info("building a tiny random Llama-style base model in %s", out)
        build_tiny_model(texts, out, vocab_size=m.tiny_vocab_size, hidden_size=m.tiny_hidden_size,
                         num_layers=m.tiny_layers, num_heads=m.tiny_heads,
                         max_positions=m.tiny_max_positions, seed=m.seed)
    return str(out)


def run(cfg: RunConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
        stop_after: int | None = None, engine: EngineFactory | None = None) -> dict[str, Any]:
    """Run (or resume) the federation described by ``cfg`` in ``run_dir``; return the summary.

    ``stop_after`` ends the run after that round as if it had been interrupted (for tests).
    ``engine`` builds the engine that runs the rounds (default: :class:`InProcessEngine`; the
    Flower ServerApp passes one that sends the same bytes to SuperNodes).
    """
    check(engine is not None or not cfg.federation.secure_aggregation,
          "federation.secure_aggregation", True, "only the Flower engine aggregates securely "
          "(`fedtune flower local|run`); in process the server half sees every reply")
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _add_file_log(run_dir)
    try:
        with run_dir_lock(run_dir):
            return _run(cfg, run_dir, resume, progress, stop_after, t0,
                        engine or InProcessEngine)
    finally:
        logging.getLogger().removeHandler(handler)
        table_log.removeHandler(handler)
        handler.close()


@dataclass
class _Setup:
    """Everything a run builds before its first round."""

    cfg: RunConfig
    run_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    template: str
    clients: list[list[TokenizedExample]]
    eval_records: list[Record]
    server: Server
    device_half: Device
    device: torch.device
    progress: bool
    accountant: Accountant | None = None  # with algorithm.dp: (epsilon, delta) by round
    guard: list[Record] = field(default_factory=list)  # the damage guard's records
    answers: dict[str, list[str]] = field(default_factory=dict)  # base and final greedy answers

    def epsilon(self, round_: int) -> float | None:
        return None if self.accountant is None else self.accountant.epsilon(round_)

    def privacy_ends(self, round_: int) -> bool:
        """Whether one more round would spend more than ``algorithm.dp.target_epsilon``."""
        target = self.cfg.algorithm.dp.target_epsilon
        return (self.accountant is not None and target > 0
                and self.accountant.epsilon(round_ + 1) > target)


def _setup(cfg: RunConfig, run_dir: Path, progress: bool) -> _Setup:
    """Data, tokenizer, model, and the method's two halves."""
    data = build_federated_data(cfg.data)
    (run_dir / "partition.json").write_text(json.dumps(data.summary.to_dict(), indent=1))
    log.info("partition (%d clients, %d eval records):\n%s", len(data.clients), len(data.eval),
             data.summary.format_table())
    model: torch.nn.Module
    model, tokenizer = load_model_and_tokenizer(
        base_model_path(cfg, run_dir, all_texts(data)), cfg.model.dtype, cfg.model.device,
        cache_dir=cfg.model.cache_dir or None)
    template = resolve_template(tokenizer, cfg.data.template)
    log.info("prompt template: %s (data.template = %r)", template, cfg.data.template)
    clients = [tokenize_records(records, tokenizer, cfg.data.max_length, quiet=True,
                                template=template) for records in data.clients]
    cut = sum(len(ex.input_ids) >= cfg.data.max_length for c in clients for ex in c)
    if cut:
        log.info("%d of %d training examples reach data.max_length = %d (longer prompts lost "
                 "middle tokens; answers are kept first)", cut, sum(map(len, clients)),
                 cfg.data.max_length)
    ev = cfg.evaluation
    eval_records = select_eval_records(data.eval, ev.max_examples, ev.seed)
    method = METHODS[cfg.algorithm.name]
    ctx = MethodContext(cfg.algorithm, int(tokenizer.pad_token_id), tokenizer)
    model = method.prepare(ctx, model)
    server = method.server(ctx, model)
    device_half = method.device(ctx, model, DeviceEnv(shared=server.device_share))
    guard = guard_records(ev.guard_path) if ev.guard else []
    return _Setup(cfg, run_dir, model, tokenizer, template, clients, eval_records, server,
                  device_half, resolve_device(cfg.model.device), progress,
                  _accountant(cfg, len(clients)), guard)


def _accountant(cfg: RunConfig, num_clients: int) -> Accountant | None:
    """The run's privacy accountant (None without algorithm.dp); refuses a target epsilon that
    not even one round can meet, before any round runs."""
    dp = cfg.algorithm.dp
    if not dp.enabled:
        return None
    acc = Accountant(dp.noise_multiplier, num_clients,
                     cfg.federation.clients_in_round(num_clients), dp.delta)
    log.warning("differential privacy: noise from algorithm.dp.noise_seed = %d, so this run is "
                "reproducible; whoever knows that seed can remove the noise, so a real "
                "deployment must draw it at random and keep it secret", dp.noise_seed)
    first = acc.epsilon(1)
    check(dp.target_epsilon == 0 or first <= dp.target_epsilon, "algorithm.dp.target_epsilon",
          dp.target_epsilon, f"one round already spends epsilon = {first:.3g} (delta = "
          f"{acc.delta:.3g}); raise the target or algorithm.dp.noise_multiplier")
    return acc


def _measure(s: _Setup, round_: int, final: bool) -> dict[str, float]:
    """The round's evaluation (what is due), of the method's product."""
    ev, cfg = s.cfg.evaluation, s.cfg

    def due(interval: int) -> bool:
        return final or round_ == 0 or (interval > 0 and round_ % interval == 0)

    want_loss, want_rouge = due(ev.loss_interval), due(ev.rouge_interval)
    if not (want_loss or want_rouge) or not s.eval_records:
        return {}
    s.server.load_global(s.model)
    scores = _measure_guard(s, final) if round_ == 0 or final else {}
    if s.server.evaluate is not None:  # FedPT scores its product, the proxy
        return scores | s.server.evaluate(
            s.model, s.tokenizer, s.eval_records, max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size, max_length=cfg.data.max_length, rouge=want_rouge,
            loss=want_loss, template=s.template, scorer=ev.rouge)
    # a peft model generates and scores like the PreTrainedModel it wraps
    kept: list[str] | None = [] if round_ == 0 or final else None
    scores |= evaluate(s.model, s.tokenizer, s.eval_records,  # type: ignore[arg-type]
                       max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                       max_length=cfg.data.max_length, rouge=want_rouge, loss=want_loss,
                       template=s.template, progress=s.progress, answers=kept, scorer=ev.rouge)
    if kept:
        s.answers["final" if final else "base"] = kept
        if not final:  # a resumed run needs the base answers after a restart
            (s.run_dir / BASE_ANSWERS).write_text(json.dumps(kept))
    return scores


def _measure_guard(s: _Setup, final: bool) -> dict[str, float]:
    """The damage guard on the global model (FedPT: the tuned small model), before round 1 and
    after the last; its answers kept for guard_answers.jsonl."""
    if not s.guard:
        return {}
    said: list[str] = []
    scores = measure_guard(s.model, s.tokenizer, s.guard, s.cfg.evaluation,
                           max_length=s.cfg.data.max_length, template=s.template,
                           progress=s.progress, answers=said)
    s.answers["guard_final" if final else "guard_base"] = said
    if not final:
        (s.run_dir / GUARD_BASE_ANSWERS).write_text(json.dumps(said))
    return scores


def _start(s: _Setup, resume: bool) -> tuple[int, dict[str, Any], MetricsLog]:
    """Resume from the last checkpoint or evaluate the base model: (first round, counters,
    metrics log)."""
    start_round, counters = 1, {"cum_bytes_up": 0, "cum_bytes_down": 0, "wall_s": 0.0}
    ckpt = load_checkpoint(s.run_dir) if resume else None
    if ckpt is not None:
        done, state, meta = ckpt
        s.server.load_state_dict(state)
        start_round = done + 1
        counters = {k: meta[k] for k in counters}
        log.info("resuming %s after round %d", s.run_dir, done)
    metrics = MetricsLog(s.run_dir / "metrics.jsonl",
                         keep_through_round=start_round - 1 if resume else None)
    table_log.info("per-round metrics (also in metrics.jsonl and tb/):\n%s",
                   table_header(s.accountant is not None))
    if start_round == 1 and not any(r["round"] == 0 for r in metrics.rows):
        row0: dict[str, Any] = {"round": 0, "train_loss": None, "eval_loss": None,
                                "rougeL": None, "bytes_up_per_client": 0,
                                "bytes_down_per_client": 0, "cum_bytes_up": 0,
                                "cum_bytes_down": 0, "cum_bytes": 0}
        if s.cfg.evaluation.evaluate_base:
            row0.update(_measure(s, 0, final=False))
        row0.update(wall_s=0.0, peak_memory_mb=peak_memory_mb(s.device))
        _append(s, metrics, row0)
    return start_round, counters, metrics


def _append(s: _Setup, metrics: MetricsLog, row: dict[str, Any]) -> None:
    """A round's row into metrics.jsonl, TensorBoard and run.log's table."""
    metrics.append(row)
    table_log.info("%s", table_row(row, s.accountant is not None))


def _round_row(s: _Setup, res: RoundResult, scores: dict[str, float],
               counters: dict[str, Any]) -> dict[str, Any]:
    row = {
        "round": res.round, "clients": res.clients, "train_loss": res.train_loss,
        "eval_loss": scores.get("eval_loss"), "rougeL": scores.get("rougeL"),
        "bytes_up_per_client": sum(res.bytes_up) / max(1, len(res.bytes_up)),
        "bytes_down_per_client": sum(res.bytes_down) / max(1, len(res.bytes_down)),
        "bytes_up": sum(res.bytes_up), "bytes_down": sum(res.bytes_down),
        "cum_bytes_up": counters["cum_bytes_up"], "cum_bytes_down": counters["cum_bytes_down"],
        "cum_bytes": counters["cum_bytes_up"] + counters["cum_bytes_down"],
        "accepted": len(res.losses), "rejected": res.rejected, "failed": res.failed,
        "wall_s": res.wall_s, "peak_memory_mb": peak_memory_mb(s.device),
    }
    if s.accountant is not None:
        row["epsilon"] = s.epsilon(res.round)
    row.update({k: v for k, v in scores.items()  # FedPT's small model, the guard, loops
                if k.startswith(("small_", "guard_")) or k == "repetition"})
    return row


def _rounds(s: _Setup, engine: Engine, start_round: int, last: int, counters: dict[str, Any],
            metrics: MetricsLog, clock: Callable[[], float], threads: ThreadPolicy) -> int:
    """Run rounds ``start_round..last``, a metrics row and a checkpoint after each; return the
    last round run (``rounds`` when the method's stopping rule ended the run early)."""
    fed = s.cfg.federation
    per_round = fed.clients_in_round(len(s.clients))
    bar = tqdm(total=fed.rounds * per_round, initial=(start_round - 1) * per_round,
               desc="clients trained", unit="client", disable=not s.progress,
               dynamic_ncols=True)
    stop = s.server.target_met
    try:
        for r in range(start_round, last + 1):
            bar.set_description(f"round {r}/{fed.rounds}")
            res = engine.run_round(r, on_client=lambda _cid: bar.update(1))
            bar.set_postfix(loss=f"{res.train_loss:.3f}" if res.train_loss else "-")
            spent = s.privacy_ends(r)  # the privacy budget allows no further round
            final = r == fed.rounds or spent
            if final:  # the final evaluation shows its own progress, not a bar frozen at 100 %
                bar.close()
            scores = _measure(s, r, final=final)
            counters["cum_bytes_up"] += sum(res.bytes_up)
            counters["cum_bytes_down"] += sum(res.bytes_down)
            counters["wall_s"] = clock()
            row = _round_row(s, res, scores, counters)
            _append(s, metrics, row)
            if s.cfg.output.checkpoint:
                save_checkpoint(s.run_dir, r, s.server.state_dict(), counters,
                                keep=s.cfg.output.keep_checkpoints)
            threads.update()  # after the checkpoint: nothing between a round's row and it
            if stop is not None and stop(scores):  # FedPT's stopping rule
                log.info("round %d: the target metric is reached; stopping", r)
                return fed.rounds
            if spent and r < fed.rounds:
                log.warning("round %d: epsilon = %.4g; one more round would pass "
                            "algorithm.dp.target_epsilon = %g; stopping", r, s.epsilon(r),
                            s.cfg.algorithm.dp.target_epsilon)
                return fed.rounds
    finally:
        bar.close()
    return last


def _finish(s: _Setup, metrics: MetricsLog, counters: dict[str, Any]) -> dict[str, Any]:
    """Export, plots, summary.json, answers.jsonl and the printed report."""
    cfg, run_dir = s.cfg, s.run_dir
    model_dir = (s.server.export(s.model, s.tokenizer, run_dir) if cfg.output.save_model
                 else None)
    title = f"{cfg.algorithm.name}, {run_dir.name}"
    plots = ([str(p) for p in plot_run(metrics.rows, run_dir, title)] if cfg.output.plots
             else [])
    per_round = cfg.federation.clients_in_round(len(s.clients))
    summary = build_summary(cfg, metrics.rows, len(s.clients), per_round, counters, run_dir,
                            model_dir, plots, s.device, s.accountant)
    if model_dir is not None:  # in the configured dtype, with a portable base and a card
        finish_export(model_dir, cfg, summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    changes = _answers_file(s, "final", BASE_ANSWERS, s.eval_records, "answers.jsonl")
    _answers_file(s, "guard_final", GUARD_BASE_ANSWERS, s.guard, "guard_answers.jsonl")
    table_log.info("summary:\n%s", summary_text(summary))
    if s.progress:
        print(rounds_table(metrics.rows))
        if changes:
            print(answers_text(changes))
        print(summary_text(summary))
    return summary


def _answers_file(s: _Setup, key: str, base_name: str, records: list[Record],
                  out_name: str) -> list[dict[str, Any]] | None:
    """Each record's base and final answers and their Rouge-L into ``out_name`` (the base answers
    from ``base_name``, so a resumed run has them too); the rows, or None when either is
    missing."""
    base_file = s.run_dir / base_name
    if key not in s.answers or not base_file.is_file():
        return None
    base = json.loads(base_file.read_text())
    if len(base) != len(s.answers[key]):
        return None
    rows = answer_rows(records[:len(base)], base, s.answers[key], s.cfg.evaluation.rouge)
    with (s.run_dir / out_name).open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def _run(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool, stop_after: int | None,
         t0: float, make_engine: EngineFactory) -> dict[str, Any]:
    if not resume:
        save_config(cfg, run_dir / CONFIG_NAME)
    torch.manual_seed(cfg.federation.seed)  # anything left on global RNG is seeded too
    threads = ThreadPolicy(cfg.model.threads)
    reset_peak_memory(resolve_device(cfg.model.device))  # this run's peak, not the process's
    s = _setup(cfg, run_dir, progress)
    metrics: MetricsLog | None = None
    try:
        start_round, counters, metrics = _start(s, resume)
        prior_wall = float(counters["wall_s"])  # elapsed time of the runs before a resume

        def clock() -> float:
            return prior_wall + time.perf_counter() - t0

        fed = cfg.federation
        engine = make_engine(s.server, s.device_half, s.model, s.clients, fed)
        last = fed.rounds if stop_after is None else min(fed.rounds, stop_after)
        last = _rounds(s, engine, start_round, last, counters, metrics, clock, threads)
        if last < fed.rounds:
            log.info("stopped after round %d of %d (resume with --resume %s)", last, fed.rounds,
                     run_dir)
            return {"stopped_after": last, "run_dir": str(run_dir)}
        counters["wall_s"] = clock()
        return _finish(s, metrics, counters)
    finally:
        if metrics is not None:
            metrics.close()
        s.server.close()


def resume(run_dir: Path, *, progress: bool = True,
           engine: EngineFactory | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last completed round."""
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {CONFIG_NAME}: not a fedtune run directory")
    return run(load_config(cfg_path), run_dir, resume=True, progress=progress, engine=engine)
