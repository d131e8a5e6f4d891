"""fedtune on Flower (>= 1.41, < 1.42): the same algorithm code behind a ServerApp and a ClientApp.

Layout:

* :mod:`.node`: what a SuperNode does with one round's message, without Flower: rebuild its data
  partition and model from the run config and its node config, call the method's device half.
* :mod:`.messages`: the one place that knows the Flower record layout of a message.
* :mod:`.engine`: :class:`FlowerEngine`, the in-process engine's contract over a Flower ``Grid``.
* :mod:`.server_app` / :mod:`.client_app`: the entry points (read the context, decode, call,
  encode); ``app/`` is the Flower project (``pyproject.toml``) that names them.
* :mod:`.local`: start a SuperLink and SuperNodes on loopback (``fedtune flower local``).
* :mod:`.certs`: a CA, a server certificate and SuperNode keys for a TLS + node-auth test.

Only :mod:`.messages`, :mod:`.engine` and the two apps import ``flwr``; the extra installs it:
``pip install 'fedtune[flower]'``.
"""

from __future__ import annotations

from pathlib import Path

APP_DIR = Path(__file__).parent / "app"

# Set in every Flower process fedtune starts: no telemetry, no update check, no `uv sync` of app
# dependencies at run time (nodes already have fedtune and torch installed), no Ray usage stats.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
