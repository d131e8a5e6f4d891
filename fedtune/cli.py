"""The ``fedtune`` command: run, eval, generate, export, config, pretrain, serve-logits, flower."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from fedtune import __version__
from fedtune.configbase import ConfigError
from fedtune.federation.flower import cli as flower_cli
from fedtune.logsetup import configure_logging
from fedtune.models import pretrain_cli

EPILOG = """examples:
  fedtune run                                   # the embedded default run, offline
  fedtune run configs/small-fedit.toml --set federation.rounds=5 --out runs/try
  fedtune run --resume runs/try                 # continue an interrupted run
  fedtune eval runs/try                         # Rouge-L and eval loss of a run's model
  fedtune eval runs/try --round 5 --predictions preds.jsonl   # a kept round, per example
  fedtune generate runs/try --prompt "Reverse the word." --input "cat"
  fedtune generate runs/try --prompt "Write a haiku." --temperature 0.8 --top-p 0.9 --seed 1
  fedtune report runs/fedit runs/fedkseed --out reports/   # one table, one figure
  fedtune export runs/try --gguf tuned.gguf --quant q8_0   # for llama.cpp-style runtimes
  fedtune config                                # every config key, its default and its help
  fedtune flower local --set data.num_clients=2 --set federation.clients_per_round=2 --nodes 2
                                                # a run on 2 local Flower SuperNodes
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedtune", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Federated fine-tuning of language models (FedKSeed, FedPT and baselines).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a federation (the embedded defaults without a config)",
                       description="Run a federated fine-tuning job and write a run directory: "
                       "config.toml, partition.json, metrics.jsonl, summary.json, PNG plots, "
                       "the exported model and a checkpoint per round.")
    r.add_argument("config", nargs="?", help="TOML config file (default: embedded defaults; "
                   "see `fedtune config`)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set federation.rounds=5 (repeatable)")
    r.add_argument("--out", help="run directory (default: output.dir or runs/<name>-<time>)")
    r.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last completed round")
    r.add_argument("--quiet", action="store_true",
                   help="no progress bars, round table or example answers; the closing summary "
                   "(metrics before/after, bytes, time, memory, run directory) still prints")

    e = sub.add_parser("eval", help="Rouge-L and eval loss of a run or model directory",
                       description="Evaluate a run directory's exported model (on the run's own "
                       "eval split) or a model directory (on the data of --config/--set).")
    e.add_argument("path", help="run directory or model directory")
    e.add_argument("--config", help="TOML config whose data/evaluation sections to use")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--large-url", default="", help="FedPT run: reach the large model at this "
                   "`fedtune serve-logits` URL (default: the run's URL, else load it here)")
    e.add_argument("--small", action="store_true",
                   help="FedPT run: score the tuned small model instead of the proxy-tuned large")
    _add_proxy_options(e, "score")
    e.add_argument("--round", type=int, metavar="N",
                   help="score the global model after round N of a run directory (the last "
                   "round, or one kept with output.keep_checkpoints)")
    e.add_argument("--predictions", metavar="FILE.jsonl",
                   help="also write one JSON line per eval example: instruction, input, "
                   "category, reference, prediction and its Rouge-L")

    g = sub.add_parser("generate", help="answer one prompt with a run's or a model's model",
                       description="Answer one instruction (and optional input) with a run "
                       "directory's exported model (in the run's prompt template) or a model "
                       "directory. Greedy by default (what evaluation uses); --temperature > 0 "
                       "samples, with --top-p and a --seed that makes the sample reproducible.")
    g.add_argument("path", help="run directory or model directory")
    g.add_argument("--prompt", required=True, help="the instruction")
    g.add_argument("--input", default="", help="optional input / context of the instruction")
    g.add_argument("--raw", action="store_true", help="send --prompt as is, without the template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default): greedy decoding")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample from the smallest set of tokens whose "
                   "probability reaches P (default 1.0: all); needs --temperature > 0")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling (default 0); the same seed gives the same answer")
    g.add_argument("--large-url", default="", help="FedPT run: the large model's logits service")
    g.add_argument("--small", action="store_true",
                   help="FedPT run: generate with the tuned small model instead")
    _add_proxy_options(g, "decode")

    x = sub.add_parser("export", help="write a run's model as a GGUF file (llama.cpp and co.)",
                       description="Write the fine-tuned model of a run (or a model directory) as "
                       "a GGUF file that llama.cpp-style runtimes load. A run that started from "
                       "a GGUF (model.path = a .gguf file or 'smollm2-135m') keeps the source's "
                       "metadata (hyper-parameters, tokenizer, chat template, licence) with the "
                       "tuned tensors; other Llama models with a byte-level BPE tokenizer get "
                       "metadata built from their config.")
    x.add_argument("path", help="run directory or model directory")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    x.add_argument("--quant", default="f16", choices=["f16", "q8_0", "f32"],
                   help="matrix type: f16 (default), q8_0 (8-bit blocks, about half the size) "
                   "or f32; norms stay f32")

    c = sub.add_parser("config", help="list every config key with its default and help")
    c.add_argument("--toml", action="store_true", help="print the defaults as a TOML file")
    c.add_argument("--markdown", action="store_true",
                   help="print the fields as a Markdown table (the README's)")
    c.add_argument("--methods", action="store_true",
                   help="print the methods (algorithm.name) as a Markdown table (the README's)")
    c.add_argument("--example", nargs="?", const="", metavar="NAME",
                   help="write the shipped example config NAME (e.g. small-fedit) as NAME.toml "
                   "in the current folder (or --out); without NAME, list the examples")
    c.add_argument("--out", default=".", metavar="PATH",
                   help="with --example: the file or folder to write to (default: here)")
    c.add_argument("--force", action="store_true", help="with --example: overwrite the file")
    s = sub.add_parser("serve-logits", help="serve a model's next-token logits over HTTP",
                       description="Serve MODEL's next-token logits (never its weights) over "
                       "HTTP with an incremental decoding session per request: the black-box "
                       "large model of FedPT. See fedtune.logits.service for the protocol.")
    s.add_argument("model", help="model directory or hub id")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="port (default 0: a free one, printed)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: torch's choice)")
    s.add_argument("--ready-file", help="write the bound URL to this file once serving")
    s.add_argument("--parent-pid", type=int, default=0,
                   help="stop serving when this process exits (set by runs that start it)")
    _serve_security_args(s)
    rp = sub.add_parser("report", help="compare runs: one table and one figure",
                        description="Compare run directories: print one table (method, rounds, "
                        "eval loss and Rouge-L before and after, bytes per client per round, "
                        "total bytes, wall time, peak memory, epsilon of private runs) and draw "
                        "eval loss and Rouge-L of every run by round and by cumulative bytes "
                        "(log scale) in one figure. Writes report.md (the table in Markdown) "
                        "and report.png.")
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    rp.add_argument("--out", default=".", help="folder for report.md and report.png "
                    "(default: the current folder)")
    pretrain_cli.add_parser(sub)
    flower_cli.add_parser(sub)
    return p


def _serve_security_args(s: argparse.ArgumentParser) -> None:
    """``serve-logits``: who may connect, and what one client may cost (ServiceLimits)."""
    from fedtune.logits.service import ServiceLimits

    d = ServiceLimits()
    a = s.add_argument_group("access (a token is required unless --host is a loopback address)")
    a.add_argument("--token-file", help="file holding the bearer token clients must send "
                   "(default: $FEDTUNE_LOGITS_TOKEN, else the file $FEDTUNE_LOGITS_TOKEN_FILE)")
    a.add_argument("--tls-certfile", help="serve HTTPS with this PEM certificate (chain)")
    a.add_argument("--tls-keyfile", help="the certificate's private key (if not in the certfile)")
    lim = s.add_argument_group("limits per client and in all")
    lim.add_argument("--max-batch", type=int, default=d.max_batch, help="most rows per session")
    for flag, kind, default, what in (
            ("--max-sessions", int, d.max_sessions, "open sessions in all"),
            ("--max-sessions-per-client", int, d.max_sessions_per_client,
             "open sessions per client address"),
            ("--session-ttl", float, d.session_ttl_s,
             "seconds after which an idle session is dropped"),
            ("--max-cache-mb", float, d.max_cache_mb,
             "KV cache of all sessions together, MiB (0: no cap)"),
            ("--max-response-mb", float, d.max_response_bytes / 2**20,
             "logits in one reply, MiB: B * k * V * 4 bytes"),
            ("--request-timeout", float, d.request_timeout_s,
             "seconds a client has to send a whole request"),
            ("--max-connections", int, d.max_connections, "connections served at once"),
            ("--max-connections-per-client", int, d.max_connections_per_client,
             "connections served at once per client address")):
        lim.add_argument(flag, type=kind, default=default, help=what + " (default %(default)g)")


def _model_source(path: Path, cache_dir: str | None = None) -> str:
    """What ``fedtune eval`` / ``generate`` load: a run directory's export, a model directory,
    or any model name ``model.path`` accepts (checked before any work)."""
    from fedtune.models.loading import check_model_source

    try:
        return str(_model_dir(path))
    except FileNotFoundError:
        if path.is_dir():
            raise
    check_model_source(str(path), cache_dir)
    return str(path)


def _model_dir(path: Path) -> Path:
    """A run directory's exported model, or ``path`` itself if it is a model directory."""
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "adapter" / "adapter_config.json").is_file():  # the prompt-tuning methods
        return path / "adapter"
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a run directory with model/ or adapter/ nor a "
                            "model directory")


def cmd_run(args: argparse.Namespace) -> int:
    from fedtune import runner
    from fedtune.config import load_config

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume", args.resume,
                              "a resumed run uses its saved config; drop CONFIG and --set")
        _closing(runner.resume(Path(args.resume), progress=not args.quiet), args.quiet)
        return 0
    cfg = load_config(args.config, args.overrides)
    from fedtune.models.loading import check_model_source

    check_model_source(cfg.model.path, cfg.model.cache_dir or None)  # before any work
    out = Path(args.out or cfg.output.dir or
               f"runs/{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "metrics.jsonl").exists():
        raise ConfigError("--out", str(out), "already holds a run; use --resume to continue it "
                          "or choose another directory")
    cfg.output.dir = str(out)
    _closing(runner.run(cfg, out, progress=not args.quiet), args.quiet)
    return 0


def _closing(summary: dict, quiet: bool) -> None:
    """With --quiet the run printed nothing: still say how it ended and where it is."""
    if not quiet:
        return
    if "stopped_after" in summary:
        print(f"stopped after round {summary['stopped_after']}; resume with `fedtune run "
              f"--resume {summary['run_dir']}`")
        return
    from fedtune.report import summary_text

    print(summary_text(summary))


def _add_proxy_options(p: argparse.ArgumentParser, verb: str) -> None:
    """--alpha and --plausibility of ``eval`` and ``generate`` (a FedPT run's proxy)."""
    p.add_argument("--alpha", type=float, metavar="A",
                   help=f"FedPT run: {verb} the proxy with this strength alpha instead of the "
                   "run's (the same tuned pair, no retraining)")
    p.add_argument("--plausibility", type=float, metavar="BETA",
                   help=f"FedPT run: {verb} the proxy with this plausibility constraint instead "
                   "of the run's (0: none; algorithm.fedpt.plausibility)")


def _check_proxy_options(args: argparse.Namespace, proxy: bool) -> None:
    """--alpha and --plausibility: only for a FedPT run's proxy, each in its range."""
    for flag, value in (("--alpha", args.alpha), ("--plausibility", args.plausibility)):
        if value is not None and not proxy:
            raise ConfigError(flag, value, "applies only to a FedPT run's proxy-tuned model "
                              "(not with --small, --round or a plain model)")
    if args.alpha is not None and not math.isfinite(args.alpha):
        raise ConfigError("--alpha", args.alpha, "must be a finite number")
    if args.plausibility is not None and not 0 <= args.plausibility < 1:
        raise ConfigError("--plausibility", args.plausibility, "must be in [0, 1)")


def cmd_eval(args: argparse.Namespace) -> int:
    from fedtune.algorithms.fedpt.product import manifest_path
    from fedtune.config import load_config
    from fedtune.cpu import ThreadPolicy
    from fedtune.data.pipeline import build_federated_data
    from fedtune.eval.evaluate import evaluate, select_eval_records
    from fedtune.models.loading import load_model_and_tokenizer

    path = Path(args.path)
    run_cfg = path / "config.toml"
    cfg_file = args.config or (str(run_cfg) if run_cfg.is_file() else None)
    cfg = load_config(cfg_file, args.overrides)
    if args.round is not None and not run_cfg.is_file():
        raise ConfigError("--round", args.round, f"needs a run directory; {path} holds no "
                          "config.toml")
    proxy = (not args.small and args.round is None
             and manifest_path(path) is not None)  # FedPT: the proxy-tuned model
    if proxy and args.predictions:
        raise ConfigError("--predictions", args.predictions, "is for plain models; with a FedPT "
                          "run add --small to write the tuned small model's answers")
    _check_proxy_options(args, proxy)
    source = ("" if proxy or args.round is not None
              else _model_source(path, cfg.model.cache_dir or None))  # before any work
    ThreadPolicy(cfg.model.threads)
    _say(f"eval: reading the data ({cfg.data.format})")
    data = build_federated_data(cfg.data)
    ev = cfg.evaluation
    records = select_eval_records(data.eval, ev.max_examples, ev.seed)
    _say(f"eval: {len(records)} held-out records (of {len(data.eval)})")
    if proxy:
        from fedtune.algorithms.fedpt.product import evaluate_product

        _say("eval: the proxy-tuned large model (FedPT)")
        scores = evaluate_product(path, records, cfg, large_url=args.large_url,
                                  alpha=args.alpha, plausibility=args.plausibility)
        print(json.dumps(scores, indent=1))
        return 0
    if args.round is not None:
        from fedtune.eval.rounds import model_at_round

        _say(f"eval: rebuilding the global model after round {args.round}")
        model, tok = model_at_round(path, cfg, args.round)
    else:
        _say(f"eval: loading {source}")
        model, tok = load_model_and_tokenizer(source, cfg.model.dtype, cfg.model.device,
                                              cache_dir=cfg.model.cache_dir or None)
    answers: list[str] | None = [] if args.predictions else None
    scores = evaluate(model, tok, records, max_new_tokens=ev.max_new_tokens,  # type: ignore[arg-type]
                      batch_size=ev.batch_size, max_length=cfg.data.max_length,
                      template=cfg.data.template, progress=True, answers=answers,
                      scorer=ev.rouge)
    if args.predictions and answers is not None:
        from fedtune.eval.evaluate import write_predictions

        write_predictions(Path(args.predictions), records, answers, ev.rouge)
        _say(f"eval: {len(answers)} predictions in {args.predictions}")
    print(json.dumps(scores, indent=1))
    return 0


def _say(line: str) -> None:
    """A progress line on stderr (stdout holds the result, for pipes)."""
    print(line, file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from fedtune.algorithms.fedpt.product import manifest_path
    from fedtune.config import load_config
    from fedtune.data.prompts import format_prompt, prompt_ids, stop_token_ids
    from fedtune.data.records import Record
    from fedtune.eval.generation import Sampling, encode_prompt, generate_ids
    from fedtune.models.loading import load_model_and_tokenizer

    path = Path(args.path)
    record = Record(args.prompt, args.input, "")
    sampling = Sampling(args.temperature, args.top_p, args.seed)  # checks the values
    proxy = not args.small and manifest_path(path) is not None  # FedPT: the proxy-tuned model
    _check_proxy_options(args, proxy)
    if proxy:
        from fedtune.algorithms.fedpt.product import generate_product

        if not sampling.greedy:
            raise ConfigError("--temperature", args.temperature, "FedPT's proxy-tuned model "
                              "decodes greedily; drop --temperature or add --small")

        prompt = args.prompt if args.raw else format_prompt(record)
        print(generate_product(path, prompt, max_new_tokens=args.max_new_tokens,
                               large_url=args.large_url, alpha=args.alpha,
                               plausibility=args.plausibility))
        return 0
    # a run directory prompts in its own template; a bare model directory in 'auto'
    template = (load_config(path / "config.toml").data.template
                if (path / "config.toml").is_file() else "auto")
    model, tok = load_model_and_tokenizer(_model_source(path), "float32", "auto")
    ids = encode_prompt(tok, args.prompt) if args.raw else prompt_ids(record, tok, template)
    print(generate_ids(model, tok, [ids], max_new_tokens=args.max_new_tokens,
                       stop_ids=stop_token_ids(tok, template), sampling=sampling)[0])
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtune.report import report

    table, files = report(args.runs, Path(args.out))
    print(table)
    print(f"table in Markdown: {files[0]}; figure: {files[1]}")
    return 0


def gguf_source(path: Path, model_dir: Path) -> Path | None:
    """The GGUF a run started from (its config's model.path), or a converted model directory
    came from; None when there is none."""
    from fedtune.config import load_config
    from fedtune.models.gguf import EMBEDDED_GGUF, embedded_gguf_path, gguf_source_of, is_gguf_path

    if (path / "config.toml").is_file():
        name = load_config(path / "config.toml").model.path
        if name in EMBEDDED_GGUF and not Path(name).exists():
            return embedded_gguf_path(name)
        if is_gguf_path(name) and Path(name).expanduser().is_file():
            return Path(name).expanduser()
        return gguf_source_of(name) if Path(name).is_dir() else None
    return gguf_source_of(model_dir)


def cmd_export(args: argparse.Namespace) -> int:
    from fedtune.models.gguf_export import write_gguf
    from fedtune.models.loading import load_model_and_tokenizer

    path = Path(args.path)
    model_dir = _model_dir(path)
    source = gguf_source(path, model_dir)
    model, tok = load_model_and_tokenizer(str(model_dir), "float32", "cpu")
    out = write_gguf(model, tok, args.gguf, args.quant, source=source,
                     name=f"fedtune: {path.name}")
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, {args.quant}; metadata "
          f"{'from ' + str(source) if source else 'built from the model config'})")
    return 0


def cmd_serve_logits(args: argparse.Namespace) -> int:
    from fedtune.logits.guard import tls_context
    from fedtune.logits.remote import read_token_file, token_from_env
    from fedtune.logits.service import ServiceLimits, serve

    if args.tls_keyfile and not args.tls_certfile:
        raise ValueError("--tls-keyfile needs --tls-certfile")
    token = read_token_file(args.token_file) if args.token_file else token_from_env()
    tls = tls_context(args.tls_certfile, args.tls_keyfile) if args.tls_certfile else None
    limits = ServiceLimits(
        max_batch=args.max_batch, max_sessions=args.max_sessions,
        max_sessions_per_client=args.max_sessions_per_client, session_ttl_s=args.session_ttl,
        max_cache_mb=args.max_cache_mb, max_response_bytes=int(args.max_response_mb * 2**20),
        request_timeout_s=args.request_timeout, max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client)
    serve(args.model, args.host, args.port, dtype=args.dtype, device=args.device, limits=limits,
          token=token, tls=tls, threads=args.threads, ready_file=args.ready_file,
          parent_pid=args.parent_pid)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedtune.config import RunConfig, describe_fields

    if args.toml:
        import tomli_w

        print(tomli_w.dumps(RunConfig().to_dict()))
        return 0
    if args.markdown:
        print(fields_markdown())
        return 0
    if args.methods:
        print(methods_markdown())
        return 0
    if args.example is not None:
        return _example(args.example, args.out, args.force)
    for key, tp, default, help_text in describe_fields():
        print(f"{key} ({tp}, default {default!r})\n    {help_text}")
    return 0


def _example(name: str, out: str, force: bool) -> int:
    """``fedtune config --example [NAME]``: list the shipped configs, or write one."""
    from fedtune import configs

    if not name:
        for n in configs.names():
            print(f"{n:<22} {configs.summary(n)}")
        print("\nwrite one with: fedtune config --example NAME   (then: fedtune run NAME.toml)")
        return 0
    path = configs.write(name, out, force)
    print(f"wrote {path}; run it with: fedtune run {path}")
    return 0


def fields_markdown() -> str:
    """Every config field as a Markdown table (``fedtune config --markdown``)."""
    from fedtune.config import describe_fields

    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, help_text in describe_fields():
        d = repr(default).replace("|", "\\|")
        rows.append(f"| `{key}` | {tp} | `{d}` | {help_text.replace('|', '/')} |")
    return "\n".join(rows)


def methods_markdown() -> str:
    """The registry as a Markdown table (``fedtune config --methods``)."""
    from fedtune.algorithms import METHODS

    rows = ["| `algorithm.name` | what it is | what travels each round | settings |",
            "| --- | --- | --- | --- |"]
    for m in METHODS.values():
        settings = ", ".join(f"`[algorithm.{s}]`" for s in m.sections) or "top level"
        rows.append(f"| `{m.name}` | {m.summary} | {m.traffic} | {settings} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    configure_logging()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would drown the run's own bar
    # peft 0.21 calls an API transformers 5 deprecates: nothing a user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    # peft's prompt learning drops position ids (virtual tokens come first): expected, not news
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter")
    handlers = {"run": cmd_run, "eval": cmd_eval, "generate": cmd_generate, "config": cmd_config,
                "export": cmd_export, "report": cmd_report,
                "pretrain": pretrain_cli.run, "serve-logits": cmd_serve_logits,
                "flower": flower_cli.run}
    try:
        code = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's exit flush
        return code
    except BrokenPipeError:
        # the reader left early (`fedtune config --toml | head`): not an error of ours. Point
        # stdout at /dev/null so the interpreter's own final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a command killed by the signal reports
    except ConfigError as e:
        print(f"fedtune: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"fedtune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfedtune: interrupted; every completed round is saved "
              "(continue with `fedtune run --resume RUN_DIR`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
