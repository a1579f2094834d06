"""Adversarial-robustness evaluation of re-ID models, for SGP (reconstructed from the abstract).

SGP's abstract claims gains in "generalization and adversarial robustness" but publishes no
protocol, so this one is the project's own (``shared/reference/sgp.md``): untargeted metric
attacks (:func:`adaptive_l2.adversarial.attacks.metric_attack`, cosine distance to the clean
embedding) on the QUERY images only, the gallery clean; L-infinity budgets 2, 4, 8 on the 0-255 scale; FGSM and
PGD-10 (step eps/4, random start). Rank-1 and mAP come from fast-reid's own ``build_dist`` (cosine)
and ``evaluate_rank``, so the clean row equals fast-reid's evaluation of the same features.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from adaptive_l2.adversarial.attacks import attack_with, embed
from adaptive_l2.modeling.model_state import model_device, restore_modes, save_modes, unwrap_model

__all__ = [
    "STANDARD_ATTACKS",
    "AttackSpec",
    "RobustnessResult",
    "evaluate_robustness",
    "format_robustness_comparison",
    "format_robustness_table",
]

logger = logging.getLogger(__name__)

_ATTACK_KINDS = ("clean", "fgsm", "pgd")


@dataclass(frozen=True)
class AttackSpec:
    """One row of the protocol: ``kind`` "clean", "fgsm" or "pgd" with its budget.

    ``step_size`` / ``start_radius`` None take :func:`metric_attack`'s defaults (FGSM: step eps,
    start radius eps/4; PGD: step eps/4, start radius eps).
    """

    kind: str
    eps: float = 0.0
    steps: int = 0
    step_size: Optional[float] = None
    start_radius: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in _ATTACK_KINDS:
            raise ValueError(f"AttackSpec kind must be one of {_ATTACK_KINDS}, got {self.kind!r}")
        if self.kind == "clean" and (self.eps != 0 or self.steps != 0):
            raise ValueError(
                f"AttackSpec 'clean' takes no eps/steps, got eps={self.eps}, steps={self.steps}"
            )
        if self.kind != "clean" and self.eps <= 0:
            raise ValueError(f"AttackSpec {self.kind!r} needs eps > 0, got {self.eps!r}")
        if self.kind == "fgsm" and self.steps != 1:
            raise ValueError(f"AttackSpec 'fgsm' has steps=1, got {self.steps!r}")
        if self.kind == "pgd" and self.steps < 1:
            raise ValueError(f"AttackSpec 'pgd' needs steps >= 1, got {self.steps!r}")

    @classmethod
    def clean(cls) -> "AttackSpec":
        return cls("clean")

    @classmethod
    def fgsm(cls, eps: float) -> "AttackSpec":
        return cls("fgsm", eps=float(eps), steps=1)

    @classmethod
    def pgd(cls, eps: float, steps: int = 10) -> "AttackSpec":
        return cls("pgd", eps=float(eps), steps=int(steps))

    @property
    def name(self) -> str:
        """"clean", "FGSM" or "PGD-k"."""
        return {"clean": "clean", "fgsm": "FGSM"}.get(self.kind, f"PGD-{self.steps}")

    @property
    def label(self) -> str:
        """Unique key of the row, e.g. "PGD-10 eps=8"."""
        return "clean" if self.kind == "clean" else f"{self.name} eps={self.eps:g}"

    def apply(
        self, model: nn.Module, images: Tensor, generator: Optional[torch.Generator]
    ) -> Tensor:
        """The attacked images (the images themselves for "clean")."""
        if self.kind == "clean":
            return images
        return attack_with(self, model, images, generator)


STANDARD_ATTACKS: Tuple[AttackSpec, ...] = (
    AttackSpec.clean(),
    AttackSpec.fgsm(2),
    AttackSpec.fgsm(4),
    AttackSpec.fgsm(8),
    AttackSpec.pgd(2),
    AttackSpec.pgd(4),
    AttackSpec.pgd(8),
)


@dataclass(frozen=True)
class RobustnessResult:
    """Retrieval accuracy under one attack, in percent like fast-reid's evaluator."""

    attack: str
    eps: float
    steps: int
    rank1: float
    rank5: Optional[float]
    rank10: Optional[float]
    mAP: float
    mINP: float

    def as_dict(self) -> Dict[str, object]:
        """fast-reid-style keys ("Rank-1", "mAP", ...), for JSON or the event storage."""
        row: Dict[str, object] = {"attack": self.attack, "eps": self.eps, "steps": self.steps}
        row["Rank-1"] = self.rank1
        if self.rank5 is not None:
            row["Rank-5"] = self.rank5
        if self.rank10 is not None:
            row["Rank-10"] = self.rank10
        row["mAP"] = self.mAP
        row["mINP"] = self.mINP
        return row


def _attack_seed(seed: int, spec: AttackSpec) -> int:
    # Per-attack stream keyed by its label: adding or reordering attacks changes no other row.
    return (int(seed) * 1_000_003 + zlib.crc32(spec.label.encode())) % (2**63)


def _as_numpy(values: object) -> np.ndarray:
    return torch.as_tensor(values).detach().cpu().numpy()


def evaluate_robustness(
    model: nn.Module,
    data_loader: Iterable[Mapping[str, object]],
    num_query: int,
    attacks: Sequence[AttackSpec] = STANDARD_ATTACKS,
    seed: int = 0,
    max_rank: int = 50,
) -> Dict[str, RobustnessResult]:
    """Rank-1 / mAP of ``model`` clean and under each attack on the query images, keyed by label.

    ``data_loader`` yields fast-reid test batches (dicts with "images" on the 0-255 scale,
    "targets" = person ids, "camids"), the first ``num_query`` items being the queries, as
    ``build_reid_test_loader`` returns; a list of such dicts works too. One pass: the gallery is
    embedded clean, each query batch is attacked with every spec and embedded. Cosine distance
    (``build_dist``) and fast-reid's ``evaluate_rank``; no flip test, AQE or re-ranking.

    The model runs in eval mode (every submodule's mode is restored afterwards). Each attack draws
    its random start from its own generator seeded from ``seed`` and its label, so the numbers are
    repeatable. Runs on one process: call it from a non-distributed loader.
    """
    from fastreid.evaluation.rank import evaluate_rank
    from fastreid.utils import comm
    from fastreid.utils.compute_dist import build_dist

    if comm.get_world_size() > 1:
        raise RuntimeError(
            "evaluate_robustness runs on one process; call it on the main process with a loader "
            f"over the whole test set (world size is {comm.get_world_size()})"
        )
    if num_query <= 0:
        raise ValueError(f"num_query must be > 0, got {num_query!r}")
    labels = [spec.label for spec in attacks]
    if not labels:
        raise ValueError("attacks is empty: give at least AttackSpec.clean()")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"attacks has duplicate entries: {duplicates}")

    module = unwrap_model(model)
    device = model_device(module)
    generators: Dict[str, torch.Generator] = {}
    for spec in attacks:
        generators[spec.label] = torch.Generator(device=device)
        generators[spec.label].manual_seed(_attack_seed(seed, spec))

    query_features: Dict[str, List[Tensor]] = {label: [] for label in labels}
    gallery_features: List[Tensor] = []
    pids: List[np.ndarray] = []
    camids: List[np.ndarray] = []
    seen = 0
    start_time = time.perf_counter()
    modes = save_modes(module)
    module.eval()
    try:
        for batch in data_loader:
            images = torch.as_tensor(batch["images"]).to(device=device, dtype=torch.float32)
            pids.append(_as_numpy(batch["targets"]).reshape(-1))
            camids.append(_as_numpy(batch["camids"]).reshape(-1))
            size = images.shape[0]
            queries = min(max(num_query - seen, 0), size)
            if queries < size:
                with torch.no_grad():
                    gallery_features.append(embed(module, images[queries:]).float().cpu())
            if queries > 0:
                for spec in attacks:
                    attacked = spec.apply(module, images[:queries], generators[spec.label])
                    with torch.no_grad():
                        query_features[spec.label].append(embed(module, attacked).float().cpu())
            seen += size
    finally:
        restore_modes(modes)

    if seen <= num_query:
        raise ValueError(
            f"num_query={num_query} but the loader yielded {seen} images: no gallery left"
        )
    all_pids = np.concatenate(pids)
    all_camids = np.concatenate(camids)
    q_pids, g_pids = all_pids[:num_query], all_pids[num_query:]
    q_camids, g_camids = all_camids[:num_query], all_camids[num_query:]
    gallery = torch.cat(gallery_features)
    logger.info(
        "robustness: %d queries under %d attacks, %d gallery images embedded in %.1f s",
        num_query, len(attacks), seen - num_query, time.perf_counter() - start_time,
    )

    results: Dict[str, RobustnessResult] = {}
    for spec in attacks:
        distances = build_dist(torch.cat(query_features[spec.label]), gallery, "cosine")
        cmc, all_ap, all_inp = evaluate_rank(
            distances, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank
        )
        results[spec.label] = RobustnessResult(
            attack=spec.name,
            eps=spec.eps,
            steps=spec.steps,
            rank1=float(cmc[0]) * 100,
            rank5=float(cmc[4]) * 100 if len(cmc) >= 5 else None,
            rank10=float(cmc[9]) * 100 if len(cmc) >= 10 else None,
            mAP=float(np.mean(all_ap)) * 100,
            mINP=float(np.mean(all_inp)) * 100,
        )
    return results


def format_robustness_table(results: Mapping[str, RobustnessResult]) -> str:
    """A markdown table of one model's results: attack, eps (0-255 scale), Rank-1 and mAP in %."""
    lines = [
        "| attack | eps (0-255) | Rank-1 (%) | mAP (%) |",
        "|---|---:|---:|---:|",
    ]
    for result in results.values():
        lines.append(
            f"| {result.attack} | {result.eps:g} | {result.rank1:.2f} | {result.mAP:.2f} |"
        )
    return "\n".join(lines)


def format_robustness_comparison(
    results_by_model: Mapping[str, Mapping[str, RobustnessResult]]
) -> str:
    """A markdown table with the models side by side: one Rank-1 and one mAP column per model.

    Rows are the union of the attack labels in first-seen order; a model lacking a row shows "-".
    """
    models = list(results_by_model)
    rows: Dict[str, RobustnessResult] = {}
    for results in results_by_model.values():
        for label, result in results.items():
            rows.setdefault(label, result)
    header = ["attack", "eps (0-255)"]
    for model_name in models:
        header += [f"{model_name} Rank-1 (%)", f"{model_name} mAP (%)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:" + "|---:" * (2 * len(models)) + "|"]
    for label, first in rows.items():
        cells = [first.attack, f"{first.eps:g}"]
        for model_name in models:
            result = results_by_model[model_name].get(label)
            cells += ["-", "-"] if result is None else [f"{result.rank1:.2f}", f"{result.mAP:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
