"""Every shipped config loads and validates."""

from pathlib import Path

import pytest

from fedtune.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path):
    load_config(path)
    assert f"fedtune run configs/{path.name}" in path.read_text()
