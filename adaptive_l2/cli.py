"""What tools/train_net.py runs: config set-up, training or evaluation, in one or many processes."""
from __future__ import annotations

import argparse
import logging
import os
from typing import List, Optional

import yaml
from fastreid.config import get_cfg
from fastreid.engine import default_argument_parser, default_setup

from adaptive_l2.checkpoint import load_for_evaluation
from adaptive_l2.config import add_reg_config, check_config
from adaptive_l2.distributed import launch, started_by_torchrun
from adaptive_l2.run_lock import RESULTS_FILE, claim_output_dir
from adaptive_l2.trainer import Trainer, prepare_run, write_results

logger = logging.getLogger(__name__)

__all__ = ["RESULTS_FILE", "load_config", "main", "main_from_command_line"]


def _config_error(where: str, error: Exception) -> Exception:
    """yacs reports a typo as KeyError or AssertionError and a wrong type as ValueError or
    AssertionError; say where, and keep KeyError for unknown keys."""
    message = f"{where}: {error.args[0] if error.args else error}"
    return KeyError(message) if "Non-existent" in message else ValueError(message)


def load_config(config_file: str, opts: Optional[List[str]] = None):
    """fast-reid defaults + the project's keys + the YAML + command-line overrides, checked."""
    cfg = get_cfg()
    add_reg_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file '{config_file}' does not exist")
        try:
            cfg.merge_from_file(config_file)
        except (UnicodeDecodeError, yaml.YAMLError, AttributeError, TypeError) as error:
            # a binary file, broken YAML, or YAML that is not a mapping of keys
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"--config-file '{config_file}' is not a YAML config of KEY: value "
                             f"lines ({type(error).__name__}: {reason})") from error
        except (KeyError, AssertionError, ValueError) as error:
            raise _config_error(f"{config_file}", error) from error
    try:
        cfg.merge_from_list(opts or [])
    except (KeyError, AssertionError, ValueError) as error:
        raise _config_error("command-line override", error) from error
    check_config(cfg)
    return cfg


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


def main(args):
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


def main_from_command_line(argv: Optional[List[str]] = None) -> None:
    args = build_argument_parser().parse_args(argv)
    if not args.config_file:
        raise ValueError("--config-file is required (e.g. configs/Synthetic/Base-Synthetic.yml): "
                         "without it fast-reid's defaults would train a CUDA ResNet50 on Market1501")
    cfg = load_config(args.config_file, args.opts)  # fail fast, before any process is spawned
    # One run per OUTPUT_DIR, locked before anything is written there (by the first process only).
    lock = None
    first = int(os.environ["RANK"]) == 0 if started_by_torchrun() else args.machine_rank == 0
    if first:
        lock = claim_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=args.overwrite)
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,),
               use_cuda=str(cfg.MODEL.DEVICE).startswith("cuda"))
    finally:
        if lock is not None:
            lock.release()
