"""`adaptive-l2-train` (and tools/train_net.py): training or evaluation, in one or many processes.

fast-reid's conventions: --config-file, --eval-only, --resume, --num-gpus (processes per machine;
CPU processes with MODEL.DEVICE cpu), --num-machines, --machine-rank, --dist-url, then KEY VALUE
config overrides. Under torchrun, start one process per GPU without --num-gpus.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from fastreid.engine import default_argument_parser, default_setup

from adaptive_l2.checkpoint import load_for_evaluation
from adaptive_l2.config import config_file_path, load_config
from adaptive_l2.distributed import launch, started_by_torchrun
from adaptive_l2.run_lock import claim_output_dir
from adaptive_l2.trainer import Trainer, prepare_run, write_results

logger = logging.getLogger(__name__)

__all__ = ["main", "train_or_evaluate"]


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)  # logs the environment and the command line
    prepare_run(cfg)  # OUTPUT_DIR, log.txt for the project's messages too, SEED
    return cfg


def evaluation_config(cfg):
    """The config an --eval-only run builds its model with: every tensor comes from MODEL.WEIGHTS,
    so no ImageNet weights are needed (a paper config asks for them through PRETRAIN_PATH)."""
    if not cfg.MODEL.BACKBONE.PRETRAIN:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.freeze()
    return cfg


def train_or_evaluate(args):
    """One process's work: train (or resume), or evaluate MODEL.WEIGHTS with --eval-only."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(evaluation_config(cfg))
        load_for_evaluation(model, cfg.MODEL.WEIGHTS)
        results = Trainer.test(cfg, model)
        write_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()  # writes final_results.json


def build_argument_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser()
    parser.set_defaults(dist_url="auto")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished run in OUTPUT_DIR (refused without it)")
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """The command line: the config is loaded (and refused) before any process is spawned."""
    args = build_argument_parser().parse_args(argv)
    if not args.config_file:
        raise ValueError("--config-file is required (e.g. configs/Synthetic/Base-Synthetic.yml): "
                         "without it fast-reid's defaults would train a CUDA ResNet50 on Market1501")
    args.config_file = config_file_path(args.config_file)  # the shipped copy if not here
    cfg = load_config(args.config_file, args.opts)  # fail fast, before any process is spawned
    # One run per OUTPUT_DIR, locked before anything is written there (by the first process only).
    lock = None
    first = int(os.environ["RANK"]) == 0 if started_by_torchrun() else args.machine_rank == 0
    if first:
        lock = claim_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=args.overwrite)
    try:
        launch(train_or_evaluate, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,),
               use_cuda=str(cfg.MODEL.DEVICE).startswith("cuda"))
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
