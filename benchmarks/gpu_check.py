#!/usr/bin/env python3
"""One-GPU check of the paper's setting, in at most 8 minutes: one JSON of figures.

Parts, each with its own time budget, each in try/except (a failure is recorded, the rest runs):
  data             the project's SyntheticReID at the paper's 384x128, generated once
  train_<variant>  AMP training of the paper model (TwoBranchReID, R50 from scratch, batch 64) with
                   the Trainer, a few hundred steps each: adaptive L2, SGP, AT; losses finite,
                   factors logged, AT's adversarial loss above the clean one
  step_ratios      step time with the L2 term on / off and SGP on / off (interleaved, medians),
                   images per second
  amp_penalty      the adaptive penalty's value under fp16 autocast and with fp16 weights: finite
  rerank           k-reciprocal re-ranking of GPU features vs CPU features: same ranks, both times
  ddp_nccl         a 1-process DDP run (NCCL; gloo on a CPU) with the L2 penalty: every tensor on
                   the device (a buffer left on the CPU breaks NCCL), losses finite

    python benchmarks/gpu_check.py --out gpu_check.json               # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --out x.json   # every part, tiny, seconds
Exit status 1 when a part failed or a check is false.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List

import numpy as np
import torch

import adaptive_l2  # noqa: F401  (fast-reid patches, registrations)
from adaptive_l2.config import load_config, shipped_configs_dir
from adaptive_l2.table.cost import (device_synchronizer, fixed_batch_train_step,
                                    machine_description, median_step_seconds, synthetic_batch)

PAPER = os.path.join(shipped_configs_dir(), "Paper", "Market1501")
VARIANTS = {"adaptive_l2": "adaptive_l2_R50.yml", "sgp": "sgp_R50.yml", "at": "at_R50.yml"}

# Paper size (the default) and a tiny CPU size that runs every part in seconds.
SETTINGS = {
    "full": {"depth": "50x", "feat_dim": 2048, "batch": 64, "size": [384, 128],
             "synthetic": {"NUM_TRAIN_IDS": 32, "NUM_TEST_IDS": 16, "NUM_DISTRACTORS": 20,
                           "IMAGES_PER_ID": 8, "NUM_CAMERAS": 6},
             "iters_per_epoch": 100, "epochs": {"adaptive_l2": 3, "sgp": 3, "at": 2},
             "workers": 8, "ratio_rounds": 15, "ratio_warmup": 3,
             "rerank": (1000, 5000, 2048), "ddp_batch": 16, "ddp_steps": 4,
             "budgets": {"data": 90, "train_adaptive_l2": 75, "train_sgp": 60, "train_at": 75,
                         "step_ratios": 50, "amp_penalty": 20, "rerank": 45, "ddp_nccl": 40}},
    "tiny": {"depth": "18x", "feat_dim": 512, "batch": 8, "size": [64, 32],
             "synthetic": {"NUM_TRAIN_IDS": 4, "NUM_TEST_IDS": 4, "NUM_DISTRACTORS": 4,
                           "IMAGES_PER_ID": 4, "NUM_CAMERAS": 2},
             "iters_per_epoch": 1, "epochs": {"adaptive_l2": 2, "sgp": 2, "at": 2},
             "workers": 0, "ratio_rounds": 1, "ratio_warmup": 1,
             "rerank": (30, 120, 32), "ddp_batch": 8, "ddp_steps": 2,
             "budgets": {"data": 60, "train_adaptive_l2": 60, "train_sgp": 60, "train_at": 60,
                         "step_ratios": 60, "amp_penalty": 30, "rerank": 30, "ddp_nccl": 60}},
}


class PartTimeout(Exception):
    """A part ran past its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds`: one part cannot eat the others'
    time, and a hang (a stuck rendezvous, a dead loader) becomes a recorded failure."""
    def expire(signum, frame):
        raise PartTimeout(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, budget: float, function: Callable[[dict], None], report: dict,
             deadline: float) -> None:
    """Run one part into report["parts"][name]; what it recorded before a failure is kept."""
    record: Dict[str, object] = {"budget_s": budget}
    report["parts"][name] = record
    remaining = deadline - time.monotonic()
    if remaining < 1:
        record.update(ok=False, error="skipped: the total time budget is spent")
        return
    budget = min(budget, remaining)
    start = time.perf_counter()
    try:
        with time_limit(budget):
            function(record)
        record["ok"] = True
    except Exception as error:  # noqa: BLE001  (every failure is recorded, the rest still runs)
        record.update(ok=False, error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc(limit=6)[-3000:])
    record["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()  # the part's models, trainers and loader workers go before the next part
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def paper_config(args, variant: str, extra: List[str] = ()):
    """The paper's row config (configs/Paper/Market1501) on the synthetic data at this size."""
    s = args.settings
    syn = [item for key, value in s["synthetic"].items()
           for item in (f"DATASETS.SYNTHETIC.{key}", str(value))]
    height, width = s["size"]
    return load_config(os.path.join(PAPER, VARIANTS[variant]), [
        "MODEL.DEVICE", args.device, "MODEL.BACKBONE.PRETRAIN", "False",
        "MODEL.BACKBONE.DEPTH", s["depth"], "MODEL.BACKBONE.FEAT_DIM", str(s["feat_dim"]),
        # ResNet v1 strides (the paper rows) need bottlenecks: R18 (tiny) has none
        "MODEL.BACKBONE.STRIDE_IN_1X1", str(s["depth"] not in ("18x", "34x")),
        "DATASETS.NAMES", '("SyntheticReID",)', "DATASETS.TESTS", '("SyntheticReID",)',
        "DATASETS.ROOT", os.path.join(args.work_dir, "datasets"), *syn,
        "DATASETS.SYNTHETIC.HEIGHT", str(height), "DATASETS.SYNTHETIC.WIDTH", str(width),
        "INPUT.SIZE_TRAIN", f"[{height},{width}]", "INPUT.SIZE_TEST", f"[{height},{width}]",
        "SOLVER.IMS_PER_BATCH", str(s["batch"]), "DATALOADER.NUM_WORKERS", str(s["workers"]),
        "SEED", "0", *extra])


def check_data(args, record: dict) -> None:
    from adaptive_l2.data.build import build_dataset

    cfg = paper_config(args, "adaptive_l2")
    start = time.perf_counter()
    data = build_dataset(cfg, "SyntheticReID")
    record.update(generate_s=round(time.perf_counter() - start, 2), train_images=len(data.train),
                  query_images=len(data.query), gallery_images=len(data.gallery),
                  size=list(cfg.INPUT.SIZE_TRAIN))


def _training_config(args, variant: str):
    s = args.settings
    per_epoch = s["iters_per_epoch"]
    return paper_config(args, variant, [
        "SOLVER.ITERS_PER_EPOCH", str(per_epoch), "SOLVER.MAX_EPOCH", str(s["epochs"][variant]),
        "SOLVER.FREEZE_ITERS", str(per_epoch),  # phase A = epoch 0, as the paper's first 20
        "SOLVER.EPOCH_LR.RESTART_EPOCH", "1", "SOLVER.EPOCH_LR.WARMUP_EPOCHS", "1",
        "MODEL.REG.SGP.START_ITER", str(per_epoch),
        "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "1000", "SOLVER.LOG_PERIOD", "20",
        "OUTPUT_DIR", os.path.join(args.work_dir, f"train_{variant}")])


def _read_jsonl(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_training(args, variant: str, record: dict) -> None:
    from fastreid.utils.env import seed_all_rng

    from adaptive_l2.run_files import FACTORS_FILE
    from adaptive_l2.trainer import Trainer

    cfg = _training_config(args, variant)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    seed_all_rng(0)
    trainer = Trainer(cfg)
    record.update(amp=bool(trainer.cfg.SOLVER.AMP.ENABLED), iterations=trainer.max_iter,
                  batch=cfg.SOLVER.IMS_PER_BATCH)
    start = time.perf_counter()
    results = trainer.train()
    seconds = time.perf_counter() - start
    losses = [r["total_loss"] for r in _read_jsonl(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
              if "total_loss" in r]
    record.update(train_s=round(seconds, 2),
                  s_per_iteration_with_eval=round(seconds / trainer.max_iter, 4),
                  total_loss_first=losses[0] if losses else None,
                  total_loss_last=losses[-1] if losses else None,
                  mAP=float(results.get("mAP", float("nan"))) if results else None)
    checks = {"losses_finite": bool(losses) and all(math.isfinite(v) for v in losses)}
    if variant == "adaptive_l2":
        factors = _read_jsonl(os.path.join(cfg.OUTPUT_DIR, FACTORS_FILE))
        if factors:
            first, last = np.array(factors[0]["factors"]), np.array(factors[-1]["factors"])
            record.update(factor_logs=len(factors), factors_changed=int((first != last).sum()),
                          factor_min=float(last.min()), factor_median=float(np.median(last)),
                          factor_max=float(last.max()))
        checks["factors_logged"] = len(factors) >= 2 and bool(np.isfinite(last).all()) \
            and record["factors_changed"] > 0 if factors else False
    if variant == "at":
        clean, adversarial = adversarial_vs_clean_loss(trainer)
        record.update(clean_loss=clean, adversarial_loss=adversarial)
        if not args.tiny:  # after 1-2 steps the model is random: the attack has nothing to break
            checks["adversarial_loss_above_clean"] = adversarial > clean
    record["checks"] = checks


def adversarial_vs_clean_loss(trainer) -> tuple:
    """The trained model's data loss (L2 term excluded) on one training batch, clean and under
    the run's own attack; each on a copy, so BN statistics of the model are untouched."""
    from fastreid.utils.events import EventStorage

    from adaptive_l2.adversarial import AdversarialTraining

    cfg = trainer.cfg
    model = getattr(trainer.model, "module", trainer.model)
    batch = next(trainer._trainer._data_loader_iter)  # the run's loader: no new workers
    device = torch.device(cfg.MODEL.DEVICE)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    attack = AdversarialTraining(eps=cfg.MODEL.REG.AT.EPS, steps=cfg.MODEL.REG.AT.STEPS)
    generator = torch.Generator(device=device).manual_seed(0)

    def data_loss(images) -> float:
        copy_ = copy.deepcopy(model).train()
        with EventStorage(0), torch.no_grad(), \
                torch.autocast("cuda", enabled=bool(cfg.SOLVER.AMP.ENABLED)):
            losses = copy_(dict(batch, images=images))
        return float(sum(v.float() for k, v in losses.items() if "l2" not in k))

    attacker = copy.deepcopy(model).train()
    adversarial_images = attack.attack(attacker, batch["images"], generator)
    return data_loss(batch["images"]), data_loss(adversarial_images)


def check_step_ratios(args, record: dict) -> None:
    """The trainer's step on one fixed batch: none, L2 term on, SGP on; interleaved rounds."""
    s = args.settings
    common = ["MODEL.HEADS.NUM_CLASSES", "751", "MODEL.REG.SGP.START_ITER", "0"]
    configs = {"none": paper_config(args, "adaptive_l2", [*common, "MODEL.REG.NAME", "none"]),
               "adaptive_l2": paper_config(args, "adaptive_l2", common),
               "sgp": paper_config(args, "sgp", common)}
    from fastreid.utils.events import EventStorage

    synchronize = device_synchronizer(args.device)
    steps = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        steps[name] = fixed_batch_train_step(cfg, s["batch"])
    record["amp"] = bool(steps["none"].amp)
    samples = {name: [] for name in steps}
    with EventStorage(0):
        for step in steps.values():
            median_step_seconds(step.run_step, warmup=s["ratio_warmup"], steps=1,
                                synchronize=synchronize)
        for _ in range(s["ratio_rounds"]):
            for name, step in steps.items():
                samples[name].append(median_step_seconds(step.run_step, warmup=0, steps=1,
                                                         synchronize=synchronize))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    record.update(rounds=s["ratio_rounds"], batch=s["batch"],
                  step_s={k: round(v, 5) for k, v in medians.items()},
                  images_per_s={k: round(s["batch"] / v, 1) for k, v in medians.items()},
                  ratio_l2_on_off=round(medians["adaptive_l2"] / medians["none"], 4),
                  ratio_sgp_on_off=round(medians["sgp"] / medians["none"], 4))


def check_amp_penalty(args, record: dict) -> None:
    """The penalty sums squared norms in fp32 whatever the weights' dtype: finite in fp16 too
    (a naive fp16 sum of squares overflows past 65504)."""
    from fastreid.utils.events import EventStorage

    from adaptive_l2.regularizers import find_l2_penalty
    from adaptive_l2.trainer import Trainer

    cfg = paper_config(args, "adaptive_l2", ["MODEL.HEADS.NUM_CLASSES", "751"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).train()
    penalty = find_l2_penalty(model)
    reference = float(penalty.penalty())
    device_type = torch.device(args.device).type
    with torch.autocast(device_type, dtype=torch.float16), EventStorage(0):
        in_forward = model(synthetic_batch(cfg, 4))[penalty.loss_name]
    half = copy.deepcopy(model).half()
    half_value = float(find_l2_penalty(half).penalty())
    naive = sum(float((p.detach().half() ** 2).sum()) for p in half.parameters()
                if p.dtype == torch.float16)
    record.update(fp32=reference, autocast_fp16=float(in_forward), fp16_weights=half_value,
                  naive_fp16_sum_of_squares=naive, autocast_dtype=str(in_forward.dtype))
    record["checks"] = {
        "finite_under_autocast": math.isfinite(float(in_forward)),
        "finite_with_fp16_weights": math.isfinite(half_value),
        "autocast_equals_fp32": math.isclose(float(in_forward), reference, rel_tol=1e-5),
        "fp16_weights_close_to_fp32": math.isclose(half_value, reference, rel_tol=1e-2)}


def rerank(query: torch.Tensor, gallery: torch.Tensor, original) -> np.ndarray:
    """The one call into adaptive_l2.evaluation.rerank's public API (it may change)."""
    from adaptive_l2.evaluation.rerank import rerank_distance

    return np.asarray(rerank_distance(query, gallery, original, k1=20, k2=6, lambda_value=0.3))


def check_rerank(args, record: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_rerank import clustered_features

    num_query, num_gallery, dim = args.settings["rerank"]
    features = torch.from_numpy(clustered_features(num_query + num_gallery, dim, seed=0))
    synchronize = device_synchronizer(args.device)
    distances, seconds = {}, {}
    for side in dict.fromkeys((args.device, "cpu")):
        feats = features.to(side)
        synchronize()
        start = time.perf_counter()
        query, gallery = feats[:num_query], feats[num_query:]
        distances[side] = rerank(query, gallery, 1 - query @ gallery.T)
        synchronize()
        seconds[side] = round(time.perf_counter() - start, 3)
    record["rerank_s"] = seconds
    ranks = {side: np.argsort(d, axis=1, kind="stable") for side, d in distances.items()}
    device_ranks, cpu_ranks = ranks[args.device], ranks["cpu"]
    record.update(num_query=num_query, num_gallery=num_gallery, dim=dim,
                  max_abs_difference=float(np.abs(distances[args.device] - distances["cpu"]).max()),
                  top1_agreement=float((device_ranks[:, 0] == cpu_ranks[:, 0]).mean()))
    record["checks"] = {"same_ranks": bool(np.array_equal(device_ranks, cpu_ranks))}


def check_ddp(args, record: dict) -> None:
    """DDP over one process with the penalty attached: NCCL refuses a CPU tensor in the model, so
    a buffer created without the model's device shows up here and not in single-GPU runs."""
    import itertools

    import torch.distributed as dist
    from fastreid.engine.launch import _find_free_port
    from fastreid.utils import comm
    from fastreid.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    from adaptive_l2.compat import create_local_group
    from adaptive_l2.trainer import Trainer, resolve_amp

    cuda = args.device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    record["backend"] = backend
    cfg = resolve_amp(paper_config(args, "adaptive_l2", ["MODEL.HEADS.NUM_CLASSES", "751"]))
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    device = torch.device(args.device)
    record["off_device"] = [name for name, t in itertools.chain(model.named_parameters(),
                                                                 model.named_buffers())
                            if t.device.type != device.type]
    optimizer, _ = Trainer.build_optimizer(cfg, model)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_find_free_port()}",
                            rank=0, world_size=1)
    try:
        create_local_group(1, 1, 0)
        wrapped = DistributedDataParallel(model, device_ids=[device.index or 0] if cuda else None,
                                          broadcast_buffers=True)
        step = Trainer.build_train_step(cfg, wrapped, itertools.repeat(
            synthetic_batch(cfg, args.settings["ddp_batch"])), optimizer)
        before = [p.detach().clone() for p in model.parameters()]
        with EventStorage(0) as storage:
            for step.iter in range(args.settings["ddp_steps"]):
                step.run_step()
            losses = storage.history("total_loss").values()
        record.update(total_losses=[float(v) for v, _ in losses],
                      tensors_changed=sum(not torch.equal(a, p) for a, p in
                                          zip(before, model.parameters())))
    finally:
        dist.destroy_process_group()
        comm._LOCAL_PROCESS_GROUP = None
    record["checks"] = {"all_on_device": not record["off_device"],
                        "losses_finite": all(math.isfinite(v) for v in record["total_losses"]),
                        "weights_updated": record["tensors_changed"] > 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check's target) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: every part in seconds")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON of figures goes")
    parser.add_argument("--work-dir", default="", help="datasets and runs (default: a temp dir)")
    parser.add_argument("--budget", type=float, default=470.0,
                        help="total seconds; a part that would start past it is skipped")
    parser.add_argument("--parts", default="", help="comma-separated subset of the parts")
    args = parser.parse_args(argv)
    args.settings = SETTINGS["tiny" if args.tiny else "full"]
    started = time.monotonic()
    deadline = started + args.budget
    report = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__,
              "cuda": torch.version.cuda, "parts": {}}
    parts = {"data": lambda r: check_data(args, r),
             **{f"train_{v}": (lambda r, v=v: check_training(args, v, r)) for v in VARIANTS},
             "step_ratios": lambda r: check_step_ratios(args, r),
             "amp_penalty": lambda r: check_amp_penalty(args, r),
             "rerank": lambda r: check_rerank(args, r),
             "ddp_nccl": lambda r: check_ddp(args, r)}
    wanted = [p for p in args.parts.split(",") if p] or list(parts)
    unknown = sorted(set(wanted) - set(parts))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; valid: {list(parts)}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temp:
        args.work_dir = args.work_dir or temp
        try:
            report["machine"] = machine_description(args.device)
        except Exception as error:  # noqa: BLE001  (no GPU: recorded, the parts say the rest)
            report["machine"] = f"unknown ({type(error).__name__}: {error})"
        for name in wanted:
            run_part(name, args.settings["budgets"][name], parts[name], report, deadline)
            print(f"[gpu_check] {name}: {'ok' if report['parts'][name]['ok'] else 'FAILED'} "
                  f"in {report['parts'][name].get('seconds', 0)} s", flush=True)
    report["failed"] = [name for name, r in report["parts"].items()
                        if not r["ok"] or not all(r.get("checks", {}).values())]
    report["total_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2, default=str)
    with open(args.out, "w") as handle:
        handle.write(text + "\n")
    print(text)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
