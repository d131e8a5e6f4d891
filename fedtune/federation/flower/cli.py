"""``fedtune flower local | run | certs | app``: fedtune runs on Flower's deployment engine."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import TextIO

DESCRIPTION = """\
Run a fedtune config on Flower: `local` starts a SuperLink and one SuperNode per client on this
machine (loopback), runs the config and stops them; `run` submits a config to a SuperLink you
started (a connection named in $FLWR_HOME/config.toml); `certs` writes a test CA, a server
certificate and SuperNode keys; `app` prints the Flower app folder (for `flwr run`).
A run directory that already holds a checkpoint resumes from its last completed round.
"""

EPILOG = """\
examples:
  fedtune flower local configs/small-fedit.toml --set data.num_clients=3 \
      --set federation.clients_per_round=3 --nodes 3 --out runs/fl
  fedtune flower local CONFIG --nodes 3 --tls            # TLS + SuperNode authentication
  fedtune flower local CONFIG --simulation               # Flower's simulation engine
  fedtune flower certs certs/ --nodes 3 --host 10.0.0.5  # for a SuperLink at 10.0.0.5
  fedtune flower run CONFIG --superlink my-link --out /srv/fedtune/runs/r1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("flower", help="run on Flower's deployment engine (SuperLink/SuperNodes)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = f.add_subparsers(dest="flower_command", required=True)

    loc = fsub.add_parser("local", help="a SuperLink and N SuperNodes on loopback, one run",
                          description="Start a SuperLink and one SuperNode per client on this "
                          "machine, run the config on them and stop every process again. The "
                          "console shows fedtune's round table and closing summary, as "
                          "`fedtune run` does; Flower's own output goes to RUN_DIR/flower/logs/. "
                          "A run directory holding a checkpoint resumes.")
    loc.add_argument("config", nargs="?", help="TOML config (default: embedded defaults)")
    loc.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config key (repeatable)")
    loc.add_argument("--nodes", type=int, help="SuperNodes to start, one per client "
                     "(default and required: data.num_clients)")
    loc.add_argument("--tls", action="store_true",
                     help="TLS and SuperNode authentication with freshly made test certificates")
    loc.add_argument("--out", help="run directory (default: output.dir or runs/<name>-<time>)")
    loc.add_argument("--simulation", action="store_true",
                     help="Flower's simulation engine instead (virtual SuperNodes on Ray inside "
                     "the SuperLink; no SuperNode processes)")
    loc.add_argument("--model-dir", help="node config model-dir for every SuperNode")
    loc.add_argument("--timeout", type=float, default=24 * 3600.0,
                     help="seconds before the run is given up (default: a day)")

    run = fsub.add_parser("run", help="submit a config to a running SuperLink",
                          description="Submit a config to a SuperLink you started (`flwr run "
                          "--stream`); the ServerApp writes the run directory on the "
                          "SuperLink's machine.")
    run.add_argument("config", nargs="?", help="TOML config (default: embedded defaults)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--superlink", required=True,
                     help="connection name in $FLWR_HOME/config.toml ([superlink.NAME])")
    run.add_argument("--out", required=True,
                     help="run directory on the SuperLink's machine (absolute)")

    certs = fsub.add_parser("certs", help="a test CA, server certificate and SuperNode keys",
                            description="Write a test CA, a server certificate for --host and "
                            "SuperNode key pairs (for --tls tries and small deployments; use "
                            "your own PKI in production).")
    certs.add_argument("out", help="folder to write them to")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs (default 2)")
    certs.add_argument("--host", action="append", default=[],
                       help="host name or IP the server certificate is for (repeatable; "
                       "default 127.0.0.1 and localhost)")
    certs.add_argument("--days", type=int, default=30, help="validity in days (default 30)")

    fsub.add_parser("app", help="print the Flower app folder (for `flwr run APP ...`)",
                    description="Print the folder of fedtune's Flower app (its pyproject.toml "
                    "names the ServerApp and ClientApp), for `flwr run APP ...`.")


def _config_text(args: argparse.Namespace) -> tuple[str, Path]:
    import tomli_w

    from fedtune.config import load_config
    from fedtune.configbase import ConfigError

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or cfg.output.dir or
               f"runs/{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (out / "metrics.jsonl").exists() and not (out / "checkpoint" / "engine.json").exists():
        raise ConfigError("--out", str(out), "holds a run without a checkpoint to resume from")
    cfg.output.dir = str(out)
    if getattr(args, "nodes", None) is not None and args.nodes != cfg.data.num_clients:
        raise ConfigError("--nodes", args.nodes, f"must equal data.num_clients = "
                          f"{cfg.data.num_clients} (one SuperNode per client; change either)")
    return tomli_w.dumps(cfg.to_dict()), out


def run(args: argparse.Namespace) -> int:
    """Run ``fedtune flower ...``; a missing Flower install is a clear error, not a traceback."""
    try:
        return _run(args)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("flwr", "cryptography"):
            raise FileNotFoundError(f"{e.name} is not installed: pip install "
                                    "'fedtune[flower]'") from e
        raise


def _run(args: argparse.Namespace) -> int:
    from fedtune.federation.flower import APP_DIR

    cmd = args.flower_command
    if cmd == "app":
        print(APP_DIR)
        return 0
    if cmd == "certs":
        from fedtune.federation.flower.certs import make_certs

        files = make_certs(Path(args.out), args.nodes, tuple(args.host) or
                           ("127.0.0.1", "localhost"), args.days)
        print(f"CA {files.ca_cert}, server certificate {files.server_cert} (key "
              f"{files.server_key}), SuperNode keys {', '.join(map(str, files.node_keys))} "
              "(public keys: *.pub)")
        return 0

    if cmd == "run":
        import tempfile

        import tomli_w

        from fedtune.configbase import ConfigError
        from fedtune.federation.flower.local import flower_command, flower_env

        if not Path(args.out).is_absolute():
            raise ConfigError("--out", args.out, "must be an absolute path on the SuperLink's "
                              "machine")
        text, out = _config_text(args)
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        with tempfile.TemporaryDirectory() as tmp:
            run_cfg = Path(tmp) / "run-config.toml"
            run_cfg.write_text(tomli_w.dumps({"fedtune-config": text, "run-dir": args.out}))
            return subprocess.call([flower_command("flwr"), "run", str(APP_DIR),
                                    args.superlink, "--stream", "--run-config", str(run_cfg)],
                                   env=flower_env(home))

    text, out = _config_text(args)

    from fedtune.federation.flower.certs import make_certs
    from fedtune.federation.flower.local import LocalFederation

    nodes = args.nodes if args.nodes is not None else _num_clients(text)
    work = out / "flower"
    if args.simulation and (args.tls or args.model_dir):
        from fedtune.configbase import ConfigError

        raise ConfigError("--simulation", True, "takes neither --tls nor --model-dir")
    certs = make_certs(work / "certs", nodes) if args.tls else None
    node_config = {"model-dir": str(Path(args.model_dir).resolve())} if args.model_dir else {}
    rounds = RoundPrinter(out / "metrics.jsonl", _private(text))
    with LocalFederation(work, nodes, certs=certs, node_config=node_config,
                         simulation=args.simulation) as fed:
        kind = ("simulation engine" if args.simulation else
                "TLS + node auth" if certs else "insecure")
        print(f"fedtune flower local: SuperLink on 127.0.0.1:{fed.port} ({kind}), {nodes} "
              f"SuperNodes, started in {fed.startup_s:.1f} s; Flower's logs in "
              f"{work / 'logs'}", flush=True)
        rc = fed.submit(text, out, timeout=args.timeout, on_wait=rounds.poll)
        run_log = fed.run_log
    rounds.poll()
    if rc != 0 or not (out / "summary.json").is_file():
        print(f"fedtune flower local: the run did not finish (flwr run exit code {rc}); the "
              f"end of {run_log}:\n{_tail(run_log)}\nall logs in {work / 'logs'}; rerun the "
              "same command to resume")
        return rc or 1
    print(closing_text(out))
    return 0


class RoundPrinter:
    """``fedtune flower local``'s console: the run's per-round table, a line as the ServerApp
    appends each row to ``metrics.jsonl`` (Flower's own output stays in its log files)."""

    def __init__(self, metrics: Path, private: bool = False, out: TextIO | None = None) -> None:
        self.metrics, self.private, self.out = metrics, private, out
        self.printed = 0

    def poll(self) -> None:
        from fedtune.metrics import read_metrics
        from fedtune.report import table_header, table_row

        rows = read_metrics(self.metrics)
        self.printed = min(self.printed, len(rows))  # a resume dropped unfinished rounds
        if self.printed == 0 and rows:
            head = table_header(self.private)
            print(f"{head}\n{'-' * len(head)}", file=self.out)
        for row in rows[self.printed:]:
            print(table_row(row, self.private), file=self.out, flush=True)
        self.printed = len(rows)


def closing_text(run_dir: Path) -> str:
    """What ``fedtune run`` prints at the end, from the run directory the ServerApp wrote: how
    the answers changed and the closing summary."""
    from fedtune.report import answers_text, summary_text

    summary = json.loads((run_dir / "summary.json").read_text())
    answers = run_dir / "answers.jsonl"
    lines = []
    if answers.is_file():
        rows = [json.loads(x) for x in answers.read_text().splitlines() if x.strip()]
        if rows:
            lines.append(answers_text(rows))
    return "\n".join([*lines, summary_text(summary)])


def _private(config_text: str) -> bool:
    """Whether the run is differentially private (its rows carry epsilon)."""
    import tomllib

    dp = tomllib.loads(config_text).get("algorithm", {}).get("dp", {})
    return float(dp.get("noise_multiplier", 0.0)) > 0


def _tail(path: Path | None, lines: int = 15) -> str:
    from fedtune.federation.flower.local import tail

    return tail(path, lines) if path is not None else ""


def _num_clients(config_text: str) -> int:
    import tomllib

    return int(tomllib.loads(config_text)["data"]["num_clients"])
