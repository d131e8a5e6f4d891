"""A Flower federation on this machine: one SuperLink and N SuperNodes on loopback.

:class:`LocalFederation` starts ``flower-superlink`` and ``flower-supernode`` processes (insecure,
or with TLS and SuperNode authentication), each in its own session and with its own
``FLWR_HOME`` under a work folder, submits runs with ``flwr run`` and stops every process it
started by its process id, with every process below it (the SuperExec and the app processes
Flower spawns in sessions of their own), also on Ctrl-C. ``fedtune flower local`` is a thin
CLI over it; the tests and ``bench/flower.py`` use it too.
Logs: ``WORK/logs/{superlink,node-N,run-N}.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil
import tomli_w

from fedtune.federation.flower import APP_DIR, FLOWER_ENV
from fedtune.federation.flower.certs import CertFiles
from fedtune.federation.flower.node import CACHE_ENV

log = logging.getLogger(__name__)
PROFILE = "fedtune"


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM ``pid`` and all its descendants, SIGKILL what is left after ``grace`` seconds.

    A member counts as stopped once it is gone or a zombie (its parent, or init, reaps it).
    """
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        deadline = time.monotonic() + wait
        while (tree := [p for p in tree if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not tree:
            return
    log.warning("processes %s survived SIGKILL", [p.pid for p in tree])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_command(name: str) -> str:
    """A Flower executable of this Python environment (else from PATH)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install Flower with "
                                "pip install 'fedtune[flower]'")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment, offline and quiet, with its own FLWR_HOME."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _node_config(values: Mapping[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        parts.append(f"{key}={value}" if isinstance(value, int) else f'{key}="{value}"')
    return " ".join(parts)


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float,
               what: str, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log_file}:\n"
                               + tail(log_file))
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s; see "
                       f"{log_file}")


def _sigterm_to_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalFederation:
    """A SuperLink and ``nodes`` SuperNodes (partition ids 0..nodes-1) on ``host``.

    ``certs``: run with TLS and SuperNode authentication (the node keys are registered with the
    SuperLink before the nodes start); without it everything is insecure (development only).
    ``node_config``: extra node-config values for every node (e.g. ``model-dir``).
    ``simulation``: Flower's simulation engine instead: the SuperLink runs ``nodes`` virtual
    SuperNodes itself (Ray), no SuperNode processes; node caches go under ``WORK/sim-cache``.
    """

    def __init__(self, work_dir: Path, nodes: int, *, certs: CertFiles | None = None,
                 node_config: Mapping[str, Any] | None = None, host: str = "127.0.0.1",
                 start_timeout: float = 120.0, simulation: bool = False) -> None:
        if nodes < 1:
            raise ValueError(f"nodes = {nodes}: a federation needs at least one SuperNode")
        if simulation and (certs is not None or node_config):
            raise ValueError("the simulation engine takes neither certificates nor node config")
        if certs is not None and len(certs.node_keys) < nodes:
            raise ValueError(f"{len(certs.node_keys)} node keys for {nodes} SuperNodes")
        self.work = work_dir.resolve()
        self.nodes = nodes
        self.certs = certs
        self.node_config = dict(node_config or {})
        self.host = host
        self.start_timeout = start_timeout
        self.simulation = simulation
        self.port = free_port(host)
        self.node_ports = [free_port(host) for _ in range(nodes)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._runs = 0
        self.run_log: Path | None = None  # Flower's output of the last submitted run
        self._t0 = self.startup_s = 0.0
        self._old_sigterm: Any = None
        (self.work / "logs").mkdir(parents=True, exist_ok=True)

    # -- processes ----------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: Sequence[str], home: Path) -> subprocess.Popen[bytes]:
        home.mkdir(parents=True, exist_ok=True)
        out = open(self.work / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (closed in _reap)
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                env=self._env(home), cwd=home, start_new_session=True)
        self.procs[name], self._logs[name] = proc, out
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def _env(self, home: Path) -> dict[str, str]:
        env = flower_env(home)
        if self.simulation:
            env[CACHE_ENV] = str(self.work / "sim-cache")
        return env

    def _reap(self, name: str, grace: float = 10.0) -> None:
        """Stop one process we started and every process below it, by their pids.

        Flower 1.41 starts the SuperExec in a session of its own (``start_new_session``), so a
        process-group signal misses it and the ServerApp/ClientApp it spawns: left running, an
        old ServerApp keeps writing the run directory after a restart. The tree is read before
        the first signal (orphans lose their parent link) and each member is waited for.
        """
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_tree(proc.pid, grace)
            proc.wait()
            log.info("stopped %s (pid %d)", name, proc.pid)
        out = self._logs.pop(name, None)
        if out is not None:
            out.close()

    def start_link(self) -> None:
        home = self.work / "superlink"
        cmd = [flower_command("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation",
               "--database", str(home / "state.db")]
        if self.simulation:
            cmd.append("--simulation")
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.certs.ca_cert),
                    "--ssl-certfile", str(self.certs.server_cert),
                    "--ssl-keyfile", str(self.certs.server_key), "--enable-supernode-auth"]
        proc = self._spawn("superlink", cmd, home)
        _wait_port(self.host, self.port, proc, self.start_timeout, "flower-superlink",
                   self.work / "logs" / "superlink.log")
        self._write_cli_config()

    def stop_link(self) -> None:
        self._reap("superlink")

    def start_node(self, i: int) -> None:
        cfg = {"partition-id": i, "num-partitions": self.nodes,
               "cache-dir": str(self.work / f"node-{i}" / "cache"), **self.node_config}
        cmd = [flower_command("flower-supernode"), "--superlink", f"{self.host}:{self.port}",
               "--port", str(self.node_ports[i]), "--node-config", _node_config(cfg)]
        if self.certs is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.certs.ca_cert),
                    "--auth-supernode-private-key", str(self.certs.node_keys[i])]
        self._spawn(f"node-{i}", cmd, self.work / f"node-{i}")

    def stop_node(self, i: int) -> None:
        self._reap(f"node-{i}")

    def start(self) -> LocalFederation:
        """Start the SuperLink, register the node keys (with certs), start every SuperNode."""
        t0 = self._t0 = time.perf_counter()
        self.start_link()
        if self.certs is not None:
            for key in self.certs.node_keys[: self.nodes]:
                self.flwr("supernode", "register", str(key.with_name(key.name + ".pub")),
                          PROFILE)
        if not self.simulation:
            for i in range(self.nodes):
                self.start_node(i)
        self.startup_s = time.perf_counter() - t0
        return self

    def online_nodes(self) -> int:
        """SuperNodes the SuperLink counts as online (``flwr supernode list``)."""
        listing = json.loads(self.flwr("supernode", "list", PROFILE, "--format", "json"))
        return sum(1 for n in listing.get("nodes", []) if n.get("status") == "online")

    def wait_online(self, timeout: float = 120.0) -> float:
        """Wait until every SuperNode is online; the seconds since :meth:`start` began."""
        deadline = time.monotonic() + timeout
        while self.online_nodes() < self.nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not all {self.nodes} SuperNodes online after {timeout:.0f} s"
                                   f"; see {self.work / 'logs'}")
            time.sleep(0.5)
        return time.perf_counter() - self._t0

    def stop(self) -> None:
        for name in [n for n in self.procs if n.startswith("node-")] + ["superlink"]:
            self._reap(name)

    def __enter__(self) -> LocalFederation:
        # SIGTERM (a CI timeout, `kill`) would end Python without running `finally`; while the
        # federation runs it raises SystemExit instead, so __exit__ still stops every process
        self._old_sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_exit)
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    # -- the flwr CLI -------------------------------------------------------------------------
    @property
    def cli_home(self) -> Path:
        return self.work / "cli"

    def _write_cli_config(self) -> None:
        conn: dict[str, Any] = {"address": f"{self.host}:{self.port}"}
        if self.certs is None:
            conn["insecure"] = True
        else:
            conn["root-certificates"] = str(self.certs.ca_cert)
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": PROFILE, PROFILE: conn}}))

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run one ``flwr`` CLI command against this federation; its output (raises on error)."""
        res = subprocess.run([flower_command("flwr"), *args], env=flower_env(self.cli_home),
                             cwd=self.cli_home, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}")
        return res.stdout

    def submit(self, config_text: str, run_dir: Path, *, timeout: float = 3600.0,
               echo: bool = False, on_wait: Callable[[], None] | None = None,
               poll_s: float = 1.0) -> int:
        """Run one fedtune config on this federation (``flwr run --stream``); its exit code.

        The run directory is written by the ServerApp (here: on this machine); a run directory
        holding a checkpoint resumes from its last completed round. Flower's own output goes to
        ``WORK/logs/run-N.log`` (:attr:`run_log`), or to this console with ``echo``;
        ``on_wait`` is called every ``poll_s`` seconds while the run goes on (to show progress).
        """
        self._runs += 1
        name = f"run-{self._runs}"
        run_cfg = self.work / f"{name}-config.toml"
        run_cfg.write_text(tomli_w.dumps({"fedtune-config": config_text,
                                          "run-dir": str(run_dir.resolve())}))
        cmd = [flower_command("flwr"), "run", str(APP_DIR), PROFILE, "--stream",
               "--run-config", str(run_cfg)]
        if self.simulation:
            cmd += ["--federation-config",
                    f"num-supernodes={self.nodes} client-resources-num-cpus=1"]
        log_path = self.run_log = self.work / "logs" / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=None if echo else out,
                                    stderr=None if echo else subprocess.STDOUT,
                                    env=self._env(self.cli_home), cwd=self.cli_home,
                                    start_new_session=True)
            deadline = time.monotonic() + timeout
            try:
                while True:
                    try:
                        return proc.wait(timeout=min(poll_s, max(0.0, deadline -
                                                                  time.monotonic())))
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= deadline:
                            raise
                        if on_wait is not None:
                            on_wait()
            finally:
                if proc.poll() is None:
                    stop_tree(proc.pid, grace=0.0)
                    proc.wait()
