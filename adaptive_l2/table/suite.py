"""The table's rows: the suites (paper, synthetic, study) with the paper's numbers and each
suite's reference row, the `--rows` selection, the `--seeds` copies of a row, and where a row's run
lives (its OUTPUT_DIR, its status, the checkpoint a dagger row evaluates)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from adaptive_l2.config import load_config, shipped_configs_dir
from adaptive_l2.run_files import FINAL_MODEL, LAST_CHECKPOINT, RESULTS_FILE

# Ni et al. 2020, results table (mAP, Rank-1); None where the paper has no such row.
PAPER_NUMBERS = {
    ("Market1501", "conventional_l2_R50"): (87.2, 94.6),
    ("Market1501", "adaptive_l2_R50"): (88.3, 95.3),
    ("Market1501", "adaptive_l2_R101"): (88.6, 94.8),
    ("Market1501", "adaptive_l2_R152"): (88.9, 95.6),
    ("Market1501", "adaptive_l2_R152_rerank"): (94.4, 96.0),
    ("DukeMTMC", "conventional_l2_R50"): (78.9, 88.0),
    ("DukeMTMC", "adaptive_l2_R50"): (79.9, 88.9),
    ("DukeMTMC", "adaptive_l2_R101"): (80.6, 89.2),
    ("DukeMTMC", "adaptive_l2_R152"): (81.0, 90.2),
    ("DukeMTMC", "adaptive_l2_R152_rerank"): (90.7, 92.2),
    ("MSMT17", "conventional_l2_R50"): (57.7, 79.1),
    ("MSMT17", "adaptive_l2_R50"): (59.4, 79.6),
    ("MSMT17", "adaptive_l2_R101"): (61.9, 81.3),
    ("MSMT17", "adaptive_l2_R152"): (62.2, 81.7),
    ("MSMT17", "adaptive_l2_R152_rerank"): (76.7, 84.9),
}
PAPER_ROWS = ("conventional_l2_R50", "adaptive_l2_R50", "adaptive_l2_R101", "adaptive_l2_R152",
              "adaptive_l2_R152_rerank")
RERANK_SUFFIX = "_rerank"
SYNTHETIC_ROWS = ("baseline", "conventional_l2", "adaptive_l2")
SYNTHETIC_SGP_ROWS = ("sgp", "adaptive_l2_sgp", "at")
# The multi-seed study of the adaptive term's dynamics (configs/Study/, README "Multi-seed study")
STUDY_ROWS = ("none", "conventional", "adaptive", "adaptive_decoupled")
SUITES = ("paper", "synthetic", "study")
# Each suite's reference row: every other row's paired difference over seeds is taken against it
# (per dataset). The paper has no row without an L2 term: its reference is conventional L2.
REFERENCE_ROWS = {"paper": "conventional_l2_R50", "synthetic": "baseline", "study": "none"}


@dataclass(frozen=True)
class Row:
    """One line of the table: a config file, trained (or, for a dagger row, evaluated) in its own
    OUTPUT_DIR under the suite's root."""

    dataset: str
    name: str
    config: str
    # a row that trains nothing: it evaluates this row's final checkpoint with its own config
    # (the dagger row: k-reciprocal re-ranking of the R152 model, as in the paper)
    evaluates: Optional[str] = None
    # --seeds: this run of the row uses SEED `seed` and its own folder (None: the config's SEED)
    seed: Optional[int] = None

    @property
    def key(self) -> str:
        key = f"{self.dataset}/{self.name}"
        return key if self.seed is None else f"{key}/{seed_folder(self.seed)}"

    @property
    def evaluated_key(self) -> Optional[str]:
        """The key of the row this row evaluates, with the same seed; None for a training row."""
        if self.evaluates is None:
            return None
        return dataclasses.replace(self, name=self.evaluates, evaluates=None).key


def suite_rows(suite: str, with_sgp: bool = False) -> List[Row]:
    """The rows of `suite` with their shipped configs; `with_sgp` adds the SGP and AT comparators."""
    if suite == "paper":
        names = PAPER_ROWS + (("sgp_R50", "adaptive_l2_sgp_R50", "at_R50") if with_sgp else ())
        return [Row(ds, name, os.path.join(shipped_configs_dir(), "Paper", ds, f"{name}.yml"),
                    evaluates=name[: -len(RERANK_SUFFIX)] if name.endswith(RERANK_SUFFIX) else None)
                for ds in ("Market1501", "DukeMTMC", "MSMT17") for name in names]
    if suite == "synthetic":
        names = SYNTHETIC_ROWS + (SYNTHETIC_SGP_ROWS if with_sgp else ())
        return [Row("Synthetic", name, os.path.join(shipped_configs_dir(), "Synthetic", f"{name}.yml"))
                for name in names]
    if suite == "study":
        return [Row("Study", name, os.path.join(shipped_configs_dir(), "Study", f"{name}.yml"))
                for name in STUDY_ROWS]
    raise ValueError(f"--suite must be one of {', '.join(SUITES)}, got '{suite}'")


def select_rows(rows: Sequence[Row], only: Sequence[str]) -> List[Row]:
    """The rows named in `only` (DATASET, ROW or DATASET/ROW names); every name must match one,
    so a typo is refused instead of silently dropping the row it meant."""
    if not only:
        return list(rows)
    unknown = [name for name in only
               if not any(name in (r.key, r.name, r.dataset) for r in rows)]
    if unknown:
        datasets = list(dict.fromkeys(r.dataset for r in rows))
        names = list(dict.fromkeys(r.name for r in rows))
        raise ValueError(
            f"--rows: unknown name(s) {unknown}. Valid names: datasets {datasets}, rows {names}, "
            f"or DATASET/ROW such as '{rows[0].key}'")
    return [r for r in rows if r.key in only or r.name in only or r.dataset in only]


def output_dir(row: Row, output_root: str) -> str:
    """A row's OUTPUT_DIR (ROOT/DATASET/ROW, or ROOT/DATASET/ROW/seedS for one seed of --seeds);
    a relative root is taken from the current folder, where runs execute."""
    directory = os.path.join(output_root, row.dataset, row.name)
    return directory if row.seed is None else os.path.join(directory, seed_folder(row.seed))


def row_status(directory: str) -> str:
    """'done' (final_results.json), 'interrupted' (a last checkpoint to resume) or 'todo'."""
    if os.path.isfile(os.path.join(directory, RESULTS_FILE)):
        return "done"
    if os.path.isfile(os.path.join(directory, LAST_CHECKPOINT)):
        return "interrupted"
    return "todo"


def evaluated_checkpoint(row: Row, output_root: str) -> str:
    """The final model a dagger row evaluates: its base row's, of the same seed."""
    base = dataclasses.replace(row, name=row.evaluates, evaluates=None)  # same seed
    return os.path.join(output_dir(base, output_root), FINAL_MODEL)


def iterations_of(row: Row, opts: Sequence[str]) -> int:
    """The row's training iterations (epochs x iterations per epoch), for the cost and the ETA."""
    cfg = load_config(row.config, [*opts, "MODEL.DEVICE", "cpu"])  # only counts: any machine
    per_epoch = cfg.SOLVER.ITERS_PER_EPOCH
    if per_epoch <= 0:
        syn = cfg.DATASETS.SYNTHETIC
        images = syn.NUM_TRAIN_IDS * syn.IMAGES_PER_ID
        per_epoch = max(1, images // cfg.SOLVER.IMS_PER_BATCH)
    return cfg.SOLVER.MAX_EPOCH * per_epoch


# ---- Several seeds per row (--seeds): each row once per seed, in its own folder


def seed_folder(seed: int) -> str:
    """The folder of one seed's run inside its row's folder (part of the row's key)."""
    return f"seed{seed}"


def parse_seeds(text: str) -> List[int]:
    """'0,1,2,3,4' -> [0, 1, 2, 3, 4]; distinct integers >= 0, or a ValueError naming --seeds."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or any(not p.isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise ValueError(
            f"--seeds must list distinct integers >= 0 such as 0,1,2,3,4, got '{text}'")
    return [int(p) for p in parts]


def seeded_rows(rows: Sequence[Row], seeds: Sequence[int]) -> List[Row]:
    """Every row once per seed, seed by seed (all rows of the first seed first), so a suite stopped
    early still has complete seeds to compare rows on."""
    return [dataclasses.replace(row, seed=seed) for seed in seeds for row in rows]
