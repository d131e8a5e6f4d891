"""``fedtune flower``: certificates, the app folder, refusals before any process starts, and
stopping what was started."""

import contextlib
import os
import subprocess
import sys
import time

import psutil
import pytest

pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import (  # noqa: E402
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from fedtune.cli import main  # noqa: E402
from fedtune.federation.flower import APP_DIR  # noqa: E402
from fedtune.federation.flower.local import LocalFederation, stop_tree  # noqa: E402


def test_certs_make_a_chain_for_the_hosts_and_node_keys(tmp_path, capsys):
    assert main(["flower", "certs", str(tmp_path), "--nodes", "2", "--host", "10.1.2.3",
                 "--host", "link.example.org"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org"]
    key = load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()
    for i in range(2):
        private = load_ssh_private_key((tmp_path / f"node-{i}").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert private.public_key() == public
        assert (tmp_path / f"node-{i}").stat().st_mode & 0o077 == 0  # private: owner only


def test_app_prints_the_flower_project(capsys):
    assert main(["flower", "app"]) == 0
    assert capsys.readouterr().out.strip() == str(APP_DIR)
    text = (APP_DIR / "pyproject.toml").read_text()
    assert "fedtune.federation.flower.server_app:app" in text and (APP_DIR / "LICENSE").is_file()


def test_local_refuses_a_node_count_other_than_the_clients(tmp_path, capsys):
    assert main(["flower", "local", "--set", "data.num_clients=2", "--set",
                 "federation.clients_per_round=2", "--nodes", "3",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_run_needs_an_absolute_run_directory(capsys):
    assert main(["flower", "run", "--superlink", "x", "--out", "relative/dir"]) == 2
    assert "absolute" in capsys.readouterr().err


def test_local_federation_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        LocalFederation(tmp_path, 0)
    with pytest.raises(ValueError, match="simulation"):
        LocalFederation(tmp_path, 2, simulation=True, node_config={"model-dir": "x"})



def test_stop_tree_stops_descendants_in_sessions_of_their_own(tmp_path):
    """Flower detaches its SuperExec (``start_new_session``): a process-group signal misses it.
    ``stop_tree`` stops the process we started and a grandchild in another session, by pid."""
    pid_file = tmp_path / "grandchild.pid"
    child_code = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(g.pid)); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", child_code], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
        grandchild = psutil.Process(int(pid_file.read_text()))
        assert grandchild.ppid() == child.pid
        assert os.getsid(grandchild.pid) != os.getsid(child.pid)  # not in the child's group
        stop_tree(child.pid, grace=5.0)
        child.wait(timeout=5)
        with contextlib.suppress(psutil.NoSuchProcess):  # gone, or a zombie left to init
            assert grandchild.status() == psutil.STATUS_ZOMBIE
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_local_shows_the_round_table_and_summary_not_flowers_output(tmp_path, monkeypatch,
                                                                    capsys):
    """``fedtune flower local``'s console: fedtune's round table as rows arrive and the closing
    summary of ``fedtune run``; Flower's output goes to its log file (a stand-in federation
    plays the ServerApp: it writes the run directory while the CLI waits)."""
    import json

    from fedtune.federation.flower import local

    out = tmp_path / "run"
    rows = [{"round": r, "train_loss": None if r == 0 else 2.0 - r / 10, "eval_loss": 2.5,
             "rougeL": 0.1, "bytes_up_per_client": 100 * r, "bytes_down_per_client": 100 * r,
             "wall_s": 1.0, "peak_memory_mb": 50.0} for r in range(3)]
    summary = {"algorithm": "fedit", "rounds": 2, "rounds_run": 2, "clients_per_round": 2,
               "num_clients": 2, "base": {"rougeL": 0.1, "eval_loss": 2.5},
               "final": {"rougeL": 0.2, "eval_loss": 2.1},
               "bytes": {"up_per_client_round": 150, "down_per_client_round": 150,
                         "total": 1200},
               "wall_s": 3.0, "peak_memory_mb": 50.0, "run_dir": str(out),
               "model_dir": str(out / "model"), "plots": []}

    class Federation:
        def __init__(self, work, nodes, **kwargs):
            self.port, self.startup_s, self.run_log = 1234, 0.1, work / "logs" / "run-1.log"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def submit(self, text, run_dir, *, timeout, echo=False, on_wait=None, poll_s=1.0):
            assert not echo  # Flower's DEBUG lines, colours and bars stay in the log file
            self.run_log.parent.mkdir(parents=True)
            self.run_log.write_text("\x1b[92mINFO \x1b[0m: DEBUG flwr ... loading ████\n")
            run_dir.mkdir(parents=True, exist_ok=True)
            for row in rows:
                with (run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                on_wait()
            (run_dir / "summary.json").write_text(json.dumps(summary))
            return 0

    monkeypatch.setattr(local, "LocalFederation", Federation)
    assert main(["flower", "local", "--set", "data.num_clients=2", "--set",
                 "federation.clients_per_round=2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b[" not in printed and "DEBUG" not in printed and "█" not in printed
    table = [line.split() for line in printed.splitlines()]
    assert ["round", "train_loss", "eval_loss"] == table[1][:3]
    assert [t[0] for t in table if t and t[0].isdigit()] == ["0", "1", "2"]  # each row once
    assert "fedtune fedit: 2 rounds, 2 of 2 clients per round" in printed
    assert "eval loss  before 2.5000  after 2.1000" in printed
    assert f"run directory: {out}" in printed
