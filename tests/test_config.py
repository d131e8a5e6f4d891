import re
from pathlib import Path

import pytest

from fedtune.config import describe_fields, load_config, save_config
from fedtune.configbase import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.algorithm.name == "fedkseed" and cfg.model.path == "smollm2-135m"
    assert cfg.data.format == "generated"


def test_toml_and_overrides(tmp_path):
    p = write(tmp_path, "[federation]\nrounds = 7\n[algorithm]\nname = 'fedit'\n"
                        "[algorithm.lora]\nr = 4\n")
    cfg = load_config(p, ["federation.rounds=5", "algorithm.lr=0.01", "model.path=some/dir",
                          "algorithm.lora.target_modules=['q_proj']"])
    assert cfg.federation.rounds == 5
    assert cfg.algorithm.lr == 0.01
    assert cfg.algorithm.name == "fedit"
    assert cfg.algorithm.lora.r == 4
    assert cfg.algorithm.lora.target_modules == ["q_proj"]
    assert cfg.model.path == "some/dir"


def test_int_accepted_for_float():
    assert load_config(None, ["algorithm.lr=1"]).algorithm.lr == 1.0


@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        (["federation.rounds=-1"], "federation.rounds", -1),
        (["data.alpha=0"], "data.alpha", 0.0),
        (["data.alpha=-0.5"], "data.alpha", -0.5),
        (["data.num_clients=3", "federation.clients_per_round=4"],
         "federation.clients_per_round", 4),
        (["federation.rounds='many'"], "federation.rounds", "many"),
        (["federation.rounds=true"], "federation.rounds", True),
        (["federation.roundz=3"], "federation.roundz", 3),
        (["algorithm.name=fedsomething"], "algorithm.name", "fedsomething"),
        (["algorithm.lora.r=0"], "algorithm.lora.r", 0),
        (["data.format=dolly"], "data.path", ""),
    ],
)
def test_bad_values_name_key_and_value(overrides, key, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert info.value.value == value
    assert key in str(info.value) and repr(value) in str(info.value)


def test_unknown_section_and_key_in_file(tmp_path):
    with pytest.raises(ConfigError, match="'federaton'"):
        load_config(write(tmp_path, "[federaton]\nrounds = 2\n"))
    with pytest.raises(ConfigError, match="'data.partitions'"):
        load_config(write(tmp_path, "[data]\npartitions = 'iid'\n"))


def test_malformed_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[data\n"))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.toml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["federation.rounds=9", "algorithm.name=fedit"])
    save_config(cfg, tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml") == cfg


def test_every_field_has_help():
    rows = describe_fields()
    assert len(rows) > 30
    for key, _tp, _default, help_text in rows:
        assert help_text.strip(), key


@pytest.mark.parametrize("key", ["federation.seed", "data.seed", "evaluation.seed",
                                 "algorithm.fedkseed.seed", "algorithm.fedpt.distill_seed"])
def test_a_negative_seed_is_refused_before_any_work(key):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}.*-1.*must be >= 0"):
        load_config(None, [f"{key}=-1"])
