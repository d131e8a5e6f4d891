"""The shipped configs: each loads, names its command and its model truthfully, the repository's
configs/ are copies of the package's, `fedtune config --example` writes them, and relative data
paths resolve against the config file's folder (or data.root)."""

import os
import re
from pathlib import Path

import pytest

from fedtune import configs
from fedtune.cli import main
from fedtune.config import load_config, save_config
from fedtune.data.loaders import DataError
from fedtune.data.pipeline import load_records

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "fedtune" / "configs").glob("*.toml"))
SHARED = ROOT.parent / "shared" / "data"


def test_the_repository_configs_are_the_shipped_ones():
    copies = {p.name: p.read_bytes() for p in (ROOT / "configs").glob("*.toml")}
    assert copies == {p.name: p.read_bytes() for p in SHIPPED}, (
        "fedtune/configs/ is the source: cp fedtune/configs/*.toml configs/")
    assert configs.names() == sorted(p.stem for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_config_loads_and_names_its_commands(path):
    load_config(path)
    text = path.read_text()
    assert f"fedtune run configs/{path.name}" in text
    assert f"fedtune config --example {path.stem}" in text


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_config_says_which_model_it_uses(path):
    # defect 7: tiny-fedit.toml, named for a tiny model built for the run, used `small`
    model = load_config(path).model.path
    header = " ".join(line.lstrip("#").strip() for line in path.read_text().splitlines()
                      if line.startswith("#"))
    says_tiny = "tiny" in path.stem or re.search(r"tiny (random )?model", header) is not None
    assert says_tiny == (model == "tiny"), f"{path.name} uses model.path = {model!r}"
    if model in ("small", "smollm2-135m"):
        assert {"small": "small", "smollm2-135m": "SmolLM2"}[model] in header


def test_config_example_lists_and_writes(tmp_path, capsys):
    assert main(["config", "--example"]) == 0
    listing = capsys.readouterr().out
    for name in configs.names():
        assert re.search(rf"^{re.escape(name)} +\S", listing, re.M)
    assert main(["config", "--example", "small-fedit", "--out", str(tmp_path)]) == 0
    written = tmp_path / "small-fedit.toml"
    assert written.read_text() == (ROOT / "configs" / "small-fedit.toml").read_text()
    assert main(["config", "--example", "small-fedit", "--out", str(tmp_path)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["config", "--example", "ni-fedit", "--out", str(written), "--force"]) == 0
    assert written.read_text() == configs.text("ni-fedit")
    assert main(["config", "--example", "nope"]) == 1
    assert "no example config 'nope'; the examples are: dolly-fedavg" in capsys.readouterr().err


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    cfg_file = write(tmp_path / "exp" / "run.toml",
                     '[data]\nformat = "dolly"\npath = "data/d.jsonl"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(cfg_file).data.path == str(tmp_path / "exp" / "data" / "d.jsonl")
    # --set data.root (relative: to the current folder) moves the data, not the config
    cfg = load_config(cfg_file, ["data.root=../store"])
    assert cfg.data.root == str(tmp_path / "store")
    assert cfg.data.path == str(tmp_path / "store" / "data" / "d.jsonl")
    # a data.root in the file is relative to the file's folder
    cfg_file.write_text('[data]\nformat = "dolly"\nroot = "../store"\npath = "d.jsonl"\n')
    assert load_config(cfg_file).data.path == str(tmp_path / "store" / "d.jsonl")
    # a path given by --set (and any path without a config file) is relative to here
    assert load_config(None, ["data.format=dolly", "data.path=d.jsonl"]).data.path == str(
        elsewhere / "d.jsonl")
    assert load_config(cfg_file, ["data.root=", "data.path=d.jsonl"]).data.path == str(
        elsewhere / "d.jsonl")
    # absolute paths and hub ids stay as they are; the saved config loads to the same
    hub = load_config(None, ["data.format=hub", "data.path=org/name",
                             "data.fields={instruction = 'q', output = 'a'}"])
    assert hub.data.path == "org/name"
    cfg = load_config(cfg_file)
    (tmp_path / "saved").mkdir()
    save_config(cfg, tmp_path / "saved" / "config.toml")
    assert load_config(tmp_path / "saved" / "config.toml") == cfg


def test_fedpt_distill_path_resolves_like_data_path(tmp_path, monkeypatch):
    cfg_file = write(tmp_path / "exp" / "run.toml", '[algorithm.fedpt]\ndistill_path = "p.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(cfg_file).algorithm.fedpt.distill_path == str(tmp_path / "exp" / "p.jsonl")


def test_a_missing_data_file_says_how_the_path_was_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "dolly-fedit.toml")
    assert cfg.data.path == str(ROOT / "configs" / "dolly" / "databricks-dolly-15k.jsonl.gz")
    with pytest.raises(DataError, match="resolves against data.root, else the config file's "
                                        "folder; set data.root"):
        load_records(cfg.data)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")
@pytest.mark.parametrize("name", ["dolly-fedit", "ni-fedit"])
def test_a_shipped_config_finds_the_shared_data_from_any_folder(tmp_path, monkeypatch, name):
    # defect 6: the Dolly/NI configs found their data relative to the current folder only
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / f"{name}.toml", [f"data.root={SHARED}"])
    assert Path(cfg.data.path).exists()
    configs.write(name, tmp_path)  # a copy written elsewhere, its data root given relative
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    rel = Path(os.path.relpath(SHARED, tmp_path / "sub"))
    assert load_config(tmp_path / f"{name}.toml", [f"data.root={rel}"]).data.path == cfg.data.path


def test_the_readme_names_only_configs_that_exist():
    named = set(re.findall(r"configs/([\w-]+\.toml)", (ROOT / "README.md").read_text()))
    assert named and named <= {p.name for p in SHIPPED}
