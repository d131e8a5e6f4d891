"""The README's promises: two set-up commands, and the config table matches the code."""

from pathlib import Path

from fedtune.cli import fields_markdown, methods_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_table_is_current():
    readme = (ROOT / "README.md").read_text()
    assert fields_markdown() in readme, "regenerate with `fedtune config --markdown`"


def test_readme_methods_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert methods_markdown() in readme, "regenerate with `fedtune config --methods`"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "./dev.sh run" in readme and "./dev.sh test" in readme
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text()
