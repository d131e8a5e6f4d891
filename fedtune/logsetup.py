"""The one logging set-up of fedtune's entry points (the CLI, the Flower ServerApp)."""

from __future__ import annotations

import logging

NOISY = ("httpx", "urllib3", "filelock", "huggingface_hub", "absl", "matplotlib")


def configure_logging() -> None:
    """INFO lines as ``LEVEL name: message``; chatty third-party loggers at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
