"""ClientApp (Message API): trains and evaluates on this node's synthetic partition."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlinreg import task

app = ClientApp()


def _setting(context: Context, key: str, default):
    value = context.run_config.get(key, default)
    return type(default)(value)


def _data(context: Context):
    # node_config comes from `flower-supernode --node-config`; a node without it is
    # partition 0 of 1, which still trains (on the full synthetic set).
    num_partitions = int(context.node_config.get("num-partitions", 1))
    partition_id = int(context.node_config.get("partition-id", 0))
    if num_partitions < 1:
        num_partitions = 1
    partition_id %= num_partitions
    return partition_id, task.partition_data(
        partition_id,
        num_partitions,
        _setting(context, "num-features", 4),
        _setting(context, "samples-per-partition", 128),
    )


def _model(msg: Message) -> list:
    return msg.content["arrays"].to_numpy_ndarrays()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id, ((x, y), _) = _data(context)
    config = msg.content.get("config", {})
    lr = float(config.get("lr", _setting(context, "client-lr", 0.05)))
    mu = float(config.get("proximal-mu", 0.0))
    model, loss = task.train(
        _model(msg),
        x,
        y,
        lr=lr,
        epochs=_setting(context, "local-epochs", 2),
        batch_size=_setting(context, "batch-size", 16),
        proximal_mu=mu,
        seed=partition_id * 100 + int(config.get("server-round", 0)),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, (_, (x, y)) = _data(context)
    loss = task.mse(_model(msg), x, y)
    content = RecordDict(
        {"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(y)})}
    )
    return Message(content=content, reply_to=msg)
