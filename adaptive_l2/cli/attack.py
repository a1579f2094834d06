"""`adaptive-l2-attack` (and tools/attack_eval.py): a checkpoint's Rank-1 / mAP clean and under metric attacks.

The attacks (FGSM and PGD-10 at eps 2, 4, 8 on the 0-255 scale, query images only, gallery clean)
are the project's own protocol, written for comparing the baseline, adaptive L2, SGP
(reconstructed from the abstract) and adversarial training side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from fastreid.utils.logger import setup_logger

from adaptive_l2.checkpoint import load_for_evaluation
from adaptive_l2.config import load_config
from adaptive_l2.run_files import ROBUSTNESS_FILE
from adaptive_l2.evaluation.robustness import (STANDARD_ATTACKS, AttackSpec, evaluate_robustness,
                                        format_robustness_table)
from adaptive_l2.trainer import Trainer



def parse_attacks(names: List[str]) -> List[AttackSpec]:
    """"clean", "fgsm:EPS", "pgd:EPS" or "pgd:EPS:STEPS"; empty: the standard list."""
    if not names:
        return list(STANDARD_ATTACKS)
    specs = [AttackSpec.clean()]
    for name in names:
        kind, *values = name.lower().split(":")
        if kind == "clean":
            continue
        if kind not in ("fgsm", "pgd") or not values:
            raise ValueError(f"--attack '{name}': use fgsm:EPS, pgd:EPS or pgd:EPS:STEPS")
        eps = float(values[0])
        specs.append(AttackSpec.fgsm(eps) if kind == "fgsm" else
                     AttackSpec.pgd(eps, steps=int(values[1]) if len(values) > 1 else 10))
    return specs


def attack_evaluation(config_file: str, opts: List[str], attacks: List[AttackSpec],
                      seed: int = 0) -> Dict[str, Dict[str, Dict[str, float]]]:
    cfg = load_config(config_file, opts)
    cfg.freeze()
    setup_logger(cfg.OUTPUT_DIR or None)
    model = Trainer.build_model(cfg)
    load_for_evaluation(model, cfg.MODEL.WEIGHTS)
    report = {}
    for dataset_name in cfg.DATASETS.TESTS:
        loader, num_query = Trainer.build_test_loader(cfg, dataset_name)
        results = evaluate_robustness(model, loader, num_query, attacks, seed=seed)
        print(f"{dataset_name}: {cfg.MODEL.WEIGHTS}\n{format_robustness_table(results)}")
        report[dataset_name] = {label: r.as_dict() for label, r in results.items()}
    if cfg.OUTPUT_DIR:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, ROBUSTNESS_FILE), "w") as handle:
            json.dump(report, handle, indent=2)
    return report


def main(argv: Optional[List[str]] = None) -> None:
    """`--config-file CFG [--attack fgsm:4 ...] MODEL.WEIGHTS run/model_final.pth [KEY VALUE ...]`"""
    parser = argparse.ArgumentParser(description="Rank-1 / mAP clean and under metric attacks")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--attack", action="append", default=[],
                        help="fgsm:EPS | pgd:EPS[:STEPS] (repeatable; default: FGSM and PGD-10 at "
                             "eps 2, 4, 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE overrides; MODEL.WEIGHTS names the checkpoint")
    args = parser.parse_args(argv)
    attack_evaluation(args.config_file, args.opts, parse_attacks(args.attack), args.seed)


if __name__ == "__main__":
    sys.exit(main())
