"""The methods, one folder each, and :data:`METHODS`, the one registry of them.

Adding a method: a folder with its halves and a ``method.py`` holding its :class:`Method` row
(see ``fedprompt/`` for the smallest one), its config sub-table if it has knobs (a field of
:class:`fedtune.algorithms.config.AlgorithmConfig`), and one line below. The config's choices,
the README's method table, the engines, the runner and the Flower node all read this table.
"""

from __future__ import annotations

from fedtune.algorithms.base import Device, DeviceEnv, Method, MethodContext, Server
from fedtune.algorithms.fedavg.method import FEDAVG, FEDIT
from fedtune.algorithms.fedkseed.method import FEDKSEED, FEDKSEED_PRO
from fedtune.algorithms.fedmezo.method import FEDMEZO
from fedtune.algorithms.fedprompt.method import FEDPROMPT, FEDPTUNING
from fedtune.algorithms.fedpt.method import FEDPT
from fedtune.algorithms.fedzo.method import FEDZO

METHODS: dict[str, Method] = {m.name: m for m in (
    FEDAVG, FEDIT, FEDKSEED, FEDKSEED_PRO, FEDMEZO, FEDZO, FEDPROMPT, FEDPTUNING, FEDPT)}

__all__ = ["METHODS", "Device", "DeviceEnv", "Method", "MethodContext", "Server"]
