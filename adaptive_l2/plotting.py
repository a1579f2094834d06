"""Pictures of the L2 factors a run saved (OUTPUT_DIR/l2_factors.jsonl): the paper's "Histogram"."""
from __future__ import annotations

import os
from typing import Dict, List

from adaptive_l2.hooks import read_json_lines
from adaptive_l2.run_files import FACTOR_HISTOGRAM, FACTOR_TRAJECTORIES, FACTORS_FILE

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


def plot_factors(run_dir: str, out_dir: str = "") -> List[str]:
    """Write factor_histogram.png (final factors per kind) and factor_trajectories.png."""
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
    title = f"{os.path.basename(os.path.normpath(run_dir))}: {last['penalty']}"

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
    return [histogram, trajectories]


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
