"""ServerApp: builds the strategy named in the run config and reports per-round metrics.

The run config comes from the FlowerCluster's `training` section (rendered by
`flower-reconcile submit` as `--run-config`). At the end the ServerApp prints one line
`FLOWER_RECONCILE_METRICS {json}`; stdout of a ServerApp is forwarded to `flwr run --stream`
and `flwr log`, which is how the submitting user (and `submit`) gets machine-readable metrics:
{"status": "completed", "rounds": [{"round": 1, "train": {...}, "evaluate": {...}}, ...]}
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    Krum,
)

from fedlinreg import task

METRICS_PREFIX = "FLOWER_RECONCILE_METRICS "

app = ServerApp()


def _cfg(context: Context, key: str, default):
    value = context.run_config.get(key, default)
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"run config `{key}`: expected {type(default).__name__}, got {value!r}")


def build_strategy(context: Context):
    """The strategy and its constructor arguments (Flower 1.25 names) from the run config."""
    name = _cfg(context, "strategy", "FedAvg")
    min_train = _cfg(context, "min-train-nodes", 0) or _cfg(context, "min-fit-clients", 2)
    common = dict(
        fraction_train=_cfg(context, "fraction-train", 1.0),
        fraction_evaluate=_cfg(context, "fraction-evaluate", 1.0),
        min_train_nodes=min_train,
        min_evaluate_nodes=_cfg(context, "min-evaluate-clients", 2),
        min_available_nodes=_cfg(context, "min-available-clients", 2),
    )
    if name == "FedAvg":
        return FedAvg(**common)
    if name == "FedProx":
        return FedProx(**common, proximal_mu=_cfg(context, "proximal-mu", 0.1))
    if name == "FedAdam":
        return FedAdam(
            **common,
            eta=_cfg(context, "server-lr", 0.1),
            eta_l=_cfg(context, "client-lr", 0.05),
        )
    if name == "Krum":
        return Krum(**common, num_malicious_nodes=_cfg(context, "num-malicious", 0))
    if name == "Bulyan":
        return Bulyan(**common, num_malicious_nodes=_cfg(context, "num-malicious", 0))
    if name == "FedTrimmedAvg":
        return FedTrimmedAvg(**common, beta=_cfg(context, "trim-beta", 0.2))
    raise ValueError(
        f"run config `strategy`: unknown strategy {name!r} "
        "(FedAvg, FedProx, FedAdam, Krum, Bulyan, FedTrimmedAvg)"
    )


def _finite(record: MetricRecord | None) -> dict[str, float]:
    """Scalar metrics of one round (JSON has no NaN/inf: those are left out)."""
    out: dict[str, float] = {}
    for key, value in (record or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _checkpoint_fn(context: Context):
    """Centralised hook: saves the global model every N rounds when checkpointing is on."""
    if not _cfg(context, "checkpoint-enabled", False):
        return None
    interval = max(1, _cfg(context, "checkpoint-interval", 5))
    path = _cfg(context, "checkpoint-path", "/opt/flower/checkpoints")
    final = _cfg(context, "num-server-rounds", 3)

    def save(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0 and (server_round % interval == 0 or server_round == final):
            os.makedirs(path, exist_ok=True)
            np.savez(
                os.path.join(path, f"checkpoint_round_{server_round}.npz"),
                *arrays.to_numpy_ndarrays(),
            )
        return None

    return save


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    num_rounds = _cfg(context, "num-server-rounds", 3)
    strategy = build_strategy(context)
    train_config = ConfigRecord({"lr": _cfg(context, "client-lr", 0.05)})
    initial = ArrayRecord(task.initial_model(_cfg(context, "num-features", 4)))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=_cfg(context, "round-timeout", 120.0),
        train_config=train_config,
        evaluate_fn=_checkpoint_fn(context),
    )
    rounds = [
        {
            "round": rnd,
            "train": _finite(result.train_metrics_clientapp.get(rnd)),
            "evaluate": _finite(result.evaluate_metrics_clientapp.get(rnd)),
        }
        for rnd in range(1, num_rounds + 1)
    ]
    completed = all(r["train"] and r["evaluate"] for r in rounds)
    report = {
        "app": "fedlinreg",
        "strategy": type(strategy).__name__,
        "num_rounds": num_rounds,
        "status": "completed" if completed else "incomplete",
        "seconds": round(time.monotonic() - started, 3),
        "rounds": rounds,
    }
    print(METRICS_PREFIX + json.dumps(report, separators=(",", ":")), flush=True)
