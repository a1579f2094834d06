"""Pictures of the L2 factors a run saved (OUTPUT_DIR/l2_factors.jsonl): the paper's "Histogram"."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from adaptive_l2.hooks import read_json_lines
from adaptive_l2.regularizers.adaptive import THETA_DEAD
from adaptive_l2.run_files import (CONFIG_FILE, FACTOR_DYNAMICS, FACTOR_HISTOGRAM,
                                   FACTOR_TRAJECTORIES, FACTORS_FILE)

KIND_COLOURS = {"kernel": "tab:blue", "bias": "tab:orange", "norm_weight": "tab:green",
                "norm_bias": "tab:red"}


def read_factor_log(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, FACTORS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: the run in {run_dir} did not train with an L2 term (MODEL.REG.NAME "
            "adaptive or conventional), or is not a run folder")
    records = read_json_lines(path)
    if not records:
        raise ValueError(f"{path} holds no record")
    return records


def run_name(run_dir: str) -> str:
    """The run folder's name; ROW/seedS for one seed of the table tool's --seeds."""
    path = os.path.normpath(os.path.abspath(run_dir))
    name = os.path.basename(path)
    if name.startswith("seed") and name[4:].isdigit():
        return f"{os.path.basename(os.path.dirname(path))}/{name}"
    return name


def plot_factors(run_dir: str, out_dir: str = "") -> List[str]:
    """Write factor_histogram.png (final factors per kind) and factor_trajectories.png, and for
    an adaptive run that logged its thetas' learning rates, factor_dynamics.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_factor_log(run_dir)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    last = records[-1]
    kinds = np.array(last["kinds"])
    final = np.array(last["factors"])
    title = f"{run_name(run_dir)}: {last['penalty']}"

    fig, ax = plt.subplots(figsize=(7, 4))
    low, high = float(final.min()), float(final.max())
    margin = max((high - low) * 0.05, abs(high) * 0.01, 1e-12)
    bins = np.linspace(low - margin, high + margin, 30)
    present = [k for k in KIND_COLOURS if (kinds == k).any()]
    ax.hist([final[kinds == k] for k in present], bins=bins, stacked=True,
            color=[KIND_COLOURS[k] for k in present],
            label=[f"{k} ({int((kinds == k).sum())})" for k in present])
    histogram = _finish(fig, ax, "factor lambda_n = A * hard_sigmoid(theta_n)", "tensors",
                        f"{title}, epoch {last['epoch'] + 1}",
                        os.path.join(out_dir, FACTOR_HISTOGRAM))

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = np.array([r["epoch"] + 1 for r in records])
    trajectory = np.array([r["factors"] for r in records])
    for index, kind in enumerate(last["kinds"]):
        ax.plot(epochs, trajectory[:, index], color=KIND_COLOURS.get(kind, "grey"), alpha=0.35,
                linewidth=0.8)
    for kind in present:
        ax.plot([], [], color=KIND_COLOURS[kind], label=kind)
    trajectories = _finish(fig, ax, "epoch", "factor", f"{title}: every tensor's factor",
                           os.path.join(out_dir, FACTOR_TRAJECTORIES))
    paths = [histogram, trajectories]
    if records[0].get("thetas") is not None and records[0].get("theta_lr_sum") is not None:
        paths.append(plot_theta_dynamics(records, os.path.join(out_dir, FACTOR_DYNAMICS),
                                         title, freeze_iters(run_dir)))
    return paths


def theta_predictions(records: Sequence[Dict]) -> Tuple[List[int], List[List[float]],
                                                        List[List[float]]]:
    """(iterations, thetas, predictions) per record: the prediction of theta_n is its first
    logged value minus its summed learning rate so far (theta_lr_sum, logged by the run from its
    optimizer's groups): where a theta falls by its learning rate each step, as under Adam with a
    gradient large against eps and of one sign (dPenalty/dtheta = 0.2 A ||W||^2 >= 0)."""
    if any(r.get("theta_lr_sum") is None or r.get("thetas") is None for r in records):
        raise ValueError("the factor log has no thetas or no theta_lr_sum: an adaptive run "
                         "logged by this version of the project is needed")
    start = records[0]["thetas"]
    iterations = [r["iteration"] for r in records]
    thetas = [r["thetas"] for r in records]
    predictions = [[t0 - lr for t0, lr in zip(start, r["theta_lr_sum"])] for r in records]
    return iterations, thetas, predictions


def freeze_iters(run_dir: str) -> int:
    """SOLVER.FREEZE_ITERS of the run (its config.yaml), 0 when unknown: the end of phase A."""
    import yaml

    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return 0
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    return int(config.get("SOLVER", {}).get("FREEZE_ITERS", 0) or 0)


def plot_theta_dynamics(records: Sequence[Dict], path: str, title: str,
                        phase_a_iters: int = 0) -> str:
    """One panel per kind: every tensor's theta (thin lines) and its prediction theta_0 - sum(lr)
    (dashed); phase A (frozen tensors) shaded; theta = -2.5 (factor 0, gradient 0) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    iterations, thetas, predictions = theta_predictions(records)
    iterations = np.array(iterations)
    thetas, predictions = np.array(thetas), np.array(predictions)
    kinds = np.array(records[-1]["kinds"])
    present = [k for k in KIND_COLOURS if (kinds == k).any()]
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3.4), sharey=True,
                             squeeze=False)
    for ax, kind in zip(axes[0], present):
        chosen = np.flatnonzero(kinds == kind)
        ax.plot(iterations, thetas[:, chosen], color=KIND_COLOURS[kind], alpha=0.3, linewidth=0.7)
        # tensors of one optimizer group share a prediction: draw each distinct curve once
        curves = np.unique(np.round(predictions[:, chosen].T, 9), axis=0)
        for curve in curves:
            ax.plot(iterations, curve, color="black", linestyle="--", linewidth=1.0)
        if phase_a_iters > 0:
            ax.axvspan(iterations[0], min(phase_a_iters, iterations[-1]), color="grey", alpha=0.12)
        ax.axhline(THETA_DEAD, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{kind} ({len(chosen)})")
        ax.set_xlabel("iteration")
    axes[0][0].set_ylabel("theta (factor = A * clip(0.2 theta + 0.5, 0, 1))")
    axes[0][0].plot([], [], color="black", linestyle="--", label="theta_0 - sum(lr)")
    if phase_a_iters > 0:
        axes[0][0].fill_between([], [], color="grey", alpha=0.12, label="phase A (frozen)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{title}: thetas against the prediction", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    """Label, save as PNG and close one figure; returns its path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
