"""Model, synthetic data and local training, shared by the ClientApp and the ServerApp.

Everything is deterministic: the true model comes from a fixed seed and each partition's
data from a seed derived from its partition id, so runs are reproducible without downloads.
"""

from __future__ import annotations

import numpy as np

TRUE_SEED = 20240611
NOISE = 0.1


def true_model(num_features: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(TRUE_SEED)
    return rng.normal(0.0, 1.0, size=num_features), float(rng.normal())


def initial_model(num_features: int) -> list[np.ndarray]:
    """Zero weights and bias: the global model before round 1."""
    return [np.zeros(num_features, dtype=np.float64), np.zeros(1, dtype=np.float64)]


def partition_data(
    partition_id: int, num_partitions: int, num_features: int, samples: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test) for one partition; features shifted per partition (non-IID)."""
    w, b = true_model(num_features)
    rng = np.random.default_rng(1000 + partition_id * 7919 + num_partitions)
    shift = (partition_id - (num_partitions - 1) / 2.0) * 0.5
    x = rng.normal(shift, 1.0, size=(samples, num_features))
    y = x @ w + b + rng.normal(0.0, NOISE, size=samples)
    split = int(samples * 0.8)
    return (x[:split], y[:split]), (x[split:], y[split:])


def mse(model: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    w, b = model
    return float(np.mean((x @ w + b[0] - y) ** 2))


def train(
    model: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    proximal_mu: float,
    seed: int,
) -> tuple[list[np.ndarray], float]:
    """Mini-batch SGD on the MSE (+ FedProx proximal term); returns (model, mean batch loss)."""
    w, b = model[0].copy(), model[1].copy()
    w_global, b_global = model[0], model[1]
    rng = np.random.default_rng(seed)
    losses = []
    n = len(y)
    for _ in range(max(1, epochs)):
        order = rng.permutation(n)
        for start in range(0, n, max(1, batch_size)):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            err = xb @ w + b[0] - yb
            losses.append(float(np.mean(err**2)))
            grad_w = 2.0 * xb.T @ err / len(idx) + proximal_mu * (w - w_global)
            grad_b = 2.0 * np.mean(err) + proximal_mu * (b[0] - b_global[0])
            w -= lr * grad_w
            b[0] -= lr * grad_b
    return [w, b], float(np.mean(losses))
