"""The ClientApp: read the context, decode the task, call the node's round, encode the reply.

The node's settings come from its node config (:class:`fedtune.federation.flower.node.
NodeSettings`); the work is :func:`fedtune.federation.flower.node.node_round`, the same
device-half call the in-process engine makes. An exception becomes a Flower error
reply, which the server counts as a failed client.

With ``federation.secure_aggregation`` the task arrives inside SecAgg+'s masked-vector stage:
``secaggplus_mod`` (only for SecAgg+'s messages) answers the protocol's other stages itself,
and masks the update this handler returns (:func:`fedtune.federation.flower.node.
secure_node_round`) before anything leaves the node.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.federation.flower import messages as wire
from fedtune.federation.flower.node import NodeSettings, node_round, secure_node_round
from fedtune.federation.flower.secure import is_secagg, only_secagg

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    settings = NodeSettings.from_node_config(context.node_config)
    return Message(wire.partition_answer(settings.partition_id), reply_to=msg)


@app.train(mods=[only_secagg])
def train(msg: Message, context: Context) -> Message:
    settings = NodeSettings.from_node_config(context.node_config)
    if is_secagg(msg):  # SecAgg+'s masked-vector stage: the mod masks what this returns
        task = wire.Task.read_fit_ins(msg)
        update, holds = secure_node_round(settings, task.config_sha256, task.config, task.round,
                                          task.client_id, task.seed, task.payload)
        reply = wire.SecureReply(task.round, task.client_id, holds, update.info.num_samples,
                                 float(update.info.train_loss), update.weight, update.names)
        return Message(reply.content(update.arrays), reply_to=msg)
    task = wire.Task.read(msg)
    up, holds = node_round(settings, task.config_sha256, task.config, task.round,
                           task.client_id, task.seed, task.payload)
    return Message(wire.Reply(task.round, task.client_id, up, holds).content(), reply_to=msg)
