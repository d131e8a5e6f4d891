"""One SecAgg+ round over the engine's Grid, with Flower's own protocol (flwr 1.41).

Server: :class:`flwr.server.workflow.SecAggPlusWorkflow` drives a legacy Strategy through a
:class:`flwr.server.LegacyContext`: it asks ``configure_fit`` for each sampled node's FitIns, runs
the protocol's four stages with ``grid.send_and_receive`` (public keys; encrypted key shares;
masked vectors, whose message carries the FitIns and so the training task; unmasking) and hands
``aggregate_fit`` the replies' clear parts with the unmasked weighted mean as their parameters.
:class:`_Round` is that strategy and nothing more: it hands out fedtune's tasks and keeps what
``aggregate_fit`` gets. The maths (quantisation, weights, precision) is in
:mod:`fedtune.federation.secagg`.

Device: :func:`only_secagg` puts ``secaggplus_mod`` in front of the ClientApp's train handler
for SecAgg+'s messages only (the mod raises on any other TRAIN message).

What the server still sees per device: every record of its reply but the ArrayRecords (which the
mod clears): here the ``fitres.metrics`` fields (round, client id, sample count, train loss) and
the weight. Dropouts: a device that fails or stays silent while training (the masked-vector
stage) or while unmasking is left out of the mean as long as enough of its neighbours answer
(the reconstruction threshold); in flwr 1.41 a device lost during the two key stages halts the
whole round (the server then has no shares of its keys), and a halted round has no mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Parameters,
    ReconnectIns,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import ClientManager, LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from fedtune.federation.secagg import MODULUS, SecAggParams


def is_secagg(msg: Message) -> bool:
    """Whether ``msg`` is one of SecAgg+'s (it carries the protocol's config record)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def only_secagg(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: ``secaggplus_mod`` for SecAgg+'s messages, plain tasks pass through."""
    if is_secagg(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@dataclass
class Outcome:
    """What one SecAgg+ round gave the server."""

    mean: list[np.ndarray] | None  # None: the protocol halted before unmasking
    replies: list[tuple[int, FitRes]] = field(default_factory=list)  # (node id, clear part)
    failures: int = 0


def secure_round(grid: Grid, tasks: dict[int, FitIns], round_: int, params: SecAggParams,
                 timeout: float) -> Outcome:
    """Run SecAgg+ over the nodes of ``tasks`` (node id -> its FitIns) for ``round_``."""
    strategy = _Round(tasks)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    SecAggPlusWorkflow(
        float(params.num_shares), float(params.reconstruction_threshold),
        max_weight=params.max_weight, clipping_range=params.clipping_range,
        quantization_range=params.quantization_range, modulus_range=MODULUS,
        timeout=timeout)(grid, context)
    return strategy.outcome or Outcome(None, [], len(tasks))


class _NodeProxy(ClientProxy):
    """A node id where Flower's legacy API wants a client proxy (SecAgg+ reads only that)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins: GetPropertiesIns, timeout: float | None,
                       group_id: int | None) -> GetPropertiesRes:
        raise NotImplementedError

    def get_parameters(self, ins: GetParametersIns, timeout: float | None,
                       group_id: int | None) -> GetParametersRes:
        raise NotImplementedError

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        raise NotImplementedError

    def evaluate(self, ins: EvaluateIns, timeout: float | None,
                 group_id: int | None) -> EvaluateRes:
        raise NotImplementedError

    def reconnect(self, ins: ReconnectIns, timeout: float | None,
                  group_id: int | None) -> DisconnectRes:
        raise NotImplementedError


class _Round(Strategy):
    """The strategy of one round: fedtune's tasks out, the mean and the clear parts kept."""

    def __init__(self, tasks: dict[int, FitIns]) -> None:
        self.tasks = tasks
        self.outcome: Outcome | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(_NodeProxy(node), ins) for node, ins in self.tasks.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # every result's parameters are the same unmasked mean by now
        mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        self.outcome = Outcome(mean, [(p.node_id, r) for p, r in results], len(failures))
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Scalar]] | None:
        return None
