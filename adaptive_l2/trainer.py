"""`Trainer`: fast-reid's DefaultTrainer with builders that work on torch 2, on CPU or GPU.

Differences from the host, each for a reason:
- `build_optimizer`: per-tensor parameters (fast-reid's contiguous buffers never update on
  torch 2), weight decay off under an L2 penalty, the adaptive thetas in groups of their own.
- `build_model`: attaches the configured L2 penalty, so its thetas are model parameters.
- DDP gets `device_ids` only on GPUs (a CPU module with device_ids is refused by torch).
- AMP: torch.amp with a device-aware GradScaler; on a CPU it is switched off with a warning
  (fast-reid's AMPTrainer asserts CUDA).
- Iterations per epoch may be fixed (`SOLVER.ITERS_PER_EPOCH`), as the paper's 200 per epoch.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from fastreid.engine import hooks as fastreid_hooks
from fastreid.engine.defaults import DefaultTrainer
from fastreid.engine.train_loop import SimpleTrainer, TrainerBase
from fastreid.modeling.meta_arch import build_model as fastreid_build_model
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng
from fastreid.utils.events import get_event_storage
from fastreid.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from adaptive_l2.adversarial.training import AdversarialTraining
from adaptive_l2.checkpoint import RandomStreams, SafeCheckpointer
from adaptive_l2.compat import put_deferred_scalars, set_writer_period
from adaptive_l2.config import check_config
from adaptive_l2.data.build import build_test_loader, build_train_loader, train_sampler_of
from adaptive_l2.data.validation import VALIDATION_SET, validation_enabled
from adaptive_l2.global_batch import convert_to_global_batch_norm, use_per_process_statistics
from adaptive_l2.hooks import DivergenceGuard, EvalHistory, ResumableLayerFreeze, ResumedMetricsLog
from adaptive_l2.modeling.backbone_options import apply_backbone_options
from adaptive_l2.modeling.model_state import model_device
from adaptive_l2.modeling.pretrained import check_pretrain_config
from adaptive_l2.optim import build_optimizer
from adaptive_l2.regularizers.build import attach_l2_penalty, build_step_regularizers
from adaptive_l2.regularizers.l2_base import L2FactorLogger, find_l2_penalty
from adaptive_l2.regularizers.step import StepRegularizer
from adaptive_l2.run_files import CONFIG_FILE, RANK_FINGERPRINTS, RESULTS_FILE
from adaptive_l2.solver import build_lr_scheduler

logger = logging.getLogger(__name__)


class TrainStep(SimpleTrainer):
    """One optimisation step: forward, sum of the loss dict, backward, step; AMP where CUDA is.

    The step runs an ordered list of step regularizers (`adaptive_l2.regularizers.step`; built
    from the config by `build_step_regularizers`: adversarial training, then SGP-F or SGP-P):
    each is told the iteration before the batch is read, the one that replaces the forward
    computes the loss dict, and each acts on the gradients after the backward, before the
    optimizer step.

    Nothing in a step waits for the device: the losses, fast-reid's accuracy and the SGP
    statistics go to the event storage as tensors and become floats when a writer reads them
    (`adaptive_l2.compat.engine.patch_deferred_tensor_scalars`), with the same values and
    iterations fast-reid's per-step `.item()` gave. A non-finite loss is reported then, naming
    its iteration.
    """

    def __init__(self, model, data_loader, optimizer, amp: bool = False,
                 regularizers: Sequence[StepRegularizer] = ()):
        super().__init__(model, data_loader, optimizer, param_wrapper=None)
        self.amp = amp
        # autocast and the scaler follow the model's device (not a hard-coded "cuda")
        self.device_type = model_device(model).type
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if amp else None
        self.regularizers = list(regularizers)
        forward = [r for r in self.regularizers if r.replaces_forward]
        if len(forward) > 1:
            raise ValueError("more than one step regularizer computes the step's losses: "
                             f"{[type(r).__name__ for r in forward]}")
        self._forward = forward[0] if forward else None

    @property
    def adversarial(self) -> Optional[AdversarialTraining]:
        """The step's adversarial training (MODEL.REG.AT), None without it."""
        return getattr(self._forward, "training", None)

    def compute_losses(self, data):
        if self._forward is not None:
            return self._forward.losses(self.model, data)
        return self.model(data)

    def unscale_gradients(self) -> None:
        """Under AMP, divide the gradients by the loss scale now (GradScaler's unscale_, once per
        step), for a regularizer that needs their true size before the optimizer step."""
        if self.amp:
            self.grad_scaler.unscale_(self.optimizer)

    def run_step(self):
        assert self.model.training, "[TrainStep] model was changed to eval mode!"
        for regularizer in self.regularizers:
            regularizer.before_step(self.iter)
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, enabled=self.amp):
            loss_dict = self.compute_losses(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.amp:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self._write_metrics(loss_dict, data_time)
        for regularizer in self.regularizers:
            regularizer.after_backward(self)
        if self.amp:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def restart_data_stream(self) -> None:
        """Read the loader anew from its sampler's current position (after `start_at_batch`)."""
        self._data_loader_iter = iter(self.data_loader)

    def _write_metrics(self, loss_dict: Dict[str, torch.Tensor], data_time: float) -> None:
        """fast-reid's metrics (data_time, total_loss, each loss) without its per-step syncs.

        The host turns every loss into a float and gathers them across processes (pickled) at
        every step. Here one float64 vector per step (losses, then data_time) is gathered on the
        device and handed to the event storage as is; when a writer reads the storage it becomes
        exactly what the host would have put: max data_time and mean losses over the processes,
        their sum as total_loss.
        """
        names = list(loss_dict)
        row = torch.stack([value.detach().reshape(()).to(torch.float64)
                           for value in loss_dict.values()])
        row = torch.cat((row, torch.full((1,), data_time, dtype=torch.float64,
                                         device=row.device)))
        world_size = comm.get_world_size()
        if world_size > 1:
            rows = [torch.empty_like(row) for _ in range(world_size)]
            torch.distributed.all_gather(rows, row)
            row = torch.cat(rows)
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        iteration = self.iter

        def write(values: List[float]) -> None:
            width = len(names) + 1
            per_process = [values[rank * width:(rank + 1) * width] for rank in range(world_size)]
            storage.put_scalar("data_time", np.max([own[-1] for own in per_process]))
            metrics = {name: np.mean([own[index] for own in per_process])
                       for index, name in enumerate(names)}
            total = sum(metrics.values())
            if not np.isfinite(total):
                raise FloatingPointError(
                    f"Loss became infinite or NaN at iteration={iteration}!\nloss_dict = {metrics}")
            storage.put_scalar("total_loss", total)
            if len(metrics) > 1:
                storage.put_scalars(**metrics)

        put_deferred_scalars(storage, row, write)


def resolve_amp(cfg):
    """AMP needs CUDA: on a CPU run it is switched off, with a warning, never an assert."""
    if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        logger.warning("SOLVER.AMP.ENABLED is True but MODEL.DEVICE is '%s': AMP needs CUDA, "
                       "training in fp32 instead.", cfg.MODEL.DEVICE)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SOLVER.AMP.ENABLED = False
        cfg.freeze()
    return cfg


def check_device_for_processes(cfg) -> None:
    """`MODEL.DEVICE cuda:N` names one GPU: right for one process, ambiguous for several (each
    process trains on `cuda:local_rank` with `MODEL.DEVICE cuda`)."""
    index = torch.device(cfg.MODEL.DEVICE).index
    if comm.get_world_size() > 1 and index is not None:
        raise ValueError(
            f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' but {comm.get_world_size()} processes train: "
            "each would use that one device. Set MODEL.DEVICE cuda (process r uses cuda:r of its "
            "machine), or choose GPUs with CUDA_VISIBLE_DEVICES.")


def wrap_distributed(model, cfg):
    """DDP with rank 0's buffers (BN statistics) broadcast at every forward: fast-reid turns that
    off, and then each rank evaluates its share of the test set with its own statistics while the
    checkpoint holds rank 0's, so a run's metrics describe no saved model."""
    if comm.get_world_size() <= 1:
        return model
    if str(cfg.MODEL.DEVICE).startswith("cuda"):
        return DistributedDataParallel(model, device_ids=[comm.get_local_rank()],
                                       broadcast_buffers=True)
    return DistributedDataParallel(model, broadcast_buffers=True)


def use_global_batch_statistics(model, cfg):
    """Several processes train one experiment: BatchNorm and metric losses over the global batch,
    unless DISTRIBUTED.PER_PROCESS_STATISTICS asks otherwise (with a warning)."""
    per_process = bool(cfg.DISTRIBUTED.PER_PROCESS_STATISTICS)
    use_per_process_statistics(per_process)
    world = comm.get_world_size()
    if world <= 1:
        return model
    if per_process:
        logger.warning(
            "DISTRIBUTED.PER_PROCESS_STATISTICS is True: BatchNorm and batch-hard mining see each "
            "of the %d processes' %d images only, not the global batch of %d: results change "
            "with the number of processes.", world, cfg.SOLVER.IMS_PER_BATCH // world,
            cfg.SOLVER.IMS_PER_BATCH)
        return model
    logger.info("BatchNorm and metric losses use the global batch of %d images over %d processes",
                cfg.SOLVER.IMS_PER_BATCH, world)
    return convert_to_global_batch_norm(model)


def parameter_fingerprint(model) -> dict:
    """Order-sensitive sums of all parameters and buffers, and the adaptive thetas (float64)."""
    model = getattr(model, "module", model)
    total = torch.zeros((), dtype=torch.float64)
    weighted = torch.zeros((), dtype=torch.float64)
    for index, param in enumerate(list(model.parameters()) + list(model.buffers())):
        value = param.detach().double().sum().cpu()
        total += value
        weighted += value * (index + 1)
    penalty = find_l2_penalty(model)
    thetas = penalty.theta_vector().detach().double().cpu().tolist() \
        if hasattr(penalty, "thetas") else []
    return {"sum": float(total), "weighted_sum": float(weighted), "thetas": thetas}


def check_ranks_agree(model, output_dir: str) -> None:
    """After distributed training every rank must hold the same parameters; say so, or fail."""
    if comm.get_world_size() <= 1:
        return
    prints = comm.all_gather(parameter_fingerprint(model))
    if comm.is_main_process() and output_dir:
        with open(os.path.join(output_dir, RANK_FINGERPRINTS), "w") as handle:
            json.dump(prints, handle)
    if any(p != prints[0] for p in prints[1:]):
        raise RuntimeError(f"distributed ranks ended with different parameters: {prints}")
    logger.info("all %d ranks hold identical parameters", len(prints))


def prepare_run(cfg) -> None:
    """What a run needs before anything is built, however it is started (tools/train_net.py or
    `Trainer(cfg)` from Python): its OUTPUT_DIR with config.yaml, the console and OUTPUT_DIR/log.txt
    for fast-reid's and the project's messages, and every generator seeded with SEED + rank when
    SEED >= 0. Calling it again with the same config changes nothing (the loggers are cached by
    their arguments, the seed is the same)."""
    output_dir = cfg.OUTPUT_DIR
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        # fast-reid's auto_scale_hyperparams rewrites this file; its tools expect it
        with open(os.path.join(output_dir, CONFIG_FILE), "w") as handle:
            handle.write(cfg.dump())
    # the same arguments as fast-reid's default_setup, so its cached logger is reused, not doubled
    setup_logger(output_dir, distributed_rank=rank)
    setup_logger(output_dir, distributed_rank=rank, name="adaptive_l2")
    if cfg.SEED >= 0:
        # fast-reid's default_setup seeded from time and pid; a fixed seed makes runs repeatable
        seed_all_rng(cfg.SEED + rank)
        logger.info("Seeded every generator with SEED %d + rank %d", cfg.SEED, rank)


def write_results(cfg, results) -> None:
    """The run's final metrics as OUTPUT_DIR/final_results.json (main process): the file that
    marks a run as finished for the table tool and the run lock."""
    if comm.is_main_process() and cfg.OUTPUT_DIR and results:
        with open(os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE), "w") as handle:
            json.dump(results, handle, indent=2, default=float)


class Trainer(DefaultTrainer):
    """DefaultTrainer whose builders are the project's; construction order as fast-reid's."""

    train_step_class = TrainStep

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        check_config(cfg)
        prepare_run(cfg)
        check_device_for_processes(cfg)
        cfg = resolve_amp(cfg)
        data_loader = self.build_train_loader(cfg)
        cfg = self.auto_scale_hyperparams(cfg, data_loader.dataset.num_classes)
        model = self.build_model(cfg)
        optimizer, _ = self.build_optimizer(cfg, model)
        model = wrap_distributed(model, cfg)
        self._trainer = self.build_train_step(cfg, model, data_loader, optimizer)

        per_epoch = cfg.SOLVER.ITERS_PER_EPOCH
        self.iters_per_epoch = per_epoch if per_epoch > 0 else \
            len(data_loader.dataset) // cfg.SOLVER.IMS_PER_BATCH
        if self.iters_per_epoch <= 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) exceeds the training set "
                f"({len(data_loader.dataset)} images): no full batch per epoch")
        self.scheduler = self.build_lr_scheduler(cfg, optimizer, self.iters_per_epoch)
        checkpointables = dict(self.scheduler)
        checkpointables["random_streams"] = RandomStreams()
        if self._trainer.grad_scaler is not None:
            checkpointables["grad_scaler"] = self._trainer.grad_scaler
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR,
                                             save_to_disk=comm.is_main_process(),
                                             optimizer=optimizer, **checkpointables)
        self.start_epoch = 0
        self.max_epoch = cfg.SOLVER.MAX_EPOCH
        self.max_iter = self.max_epoch * self.iters_per_epoch
        self.warmup_iters = cfg.SOLVER.WARMUP_ITERS
        self.delay_epochs = cfg.SOLVER.DELAY_EPOCHS
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def train(self):
        if self.start_epoch >= self.max_epoch:
            # resumed after the last checkpoint of a finished run (killed before its results
            # were written): nothing to train, evaluate the model as it stands
            logger.info("Training already reached epoch %d: evaluating the last checkpoint",
                        self.max_epoch)
            results = self.test(self.cfg, self.model)
        else:
            results = super().train()
        check_ranks_agree(self.model, self.cfg.OUTPUT_DIR)
        write_results(self.cfg, results)
        return results

    @classmethod
    def build_train_step(cls, cfg, model, data_loader, optimizer) -> TrainStep:
        return cls.train_step_class(model, data_loader, optimizer, amp=cfg.SOLVER.AMP.ENABLED,
                                    regularizers=build_step_regularizers(cfg, model))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer, iters_per_epoch):
        return build_lr_scheduler(cfg, optimizer, iters_per_epoch)

    def resume_or_load(self, resume: bool = True):
        """fast-reid's resume, plus the data stream continued at the resumed iteration: the
        sampler starts at that global batch and the loader's iterator (created, and possibly
        prefetching, when the step was built) is made anew."""
        checkpoint = super().resume_or_load(resume=resume)
        start_batch = self.start_epoch * self.iters_per_epoch
        sampler = train_sampler_of(self._trainer.data_loader)
        if start_batch and hasattr(sampler, "start_at_batch"):
            sampler.start_at_batch(start_batch)
            self._trainer.restart_data_stream()
            logger.info("Data stream continues at global batch %d", start_batch)
        return checkpoint

    @classmethod
    def build_model(cls, cfg):
        check_config(cfg)
        check_pretrain_config(cfg)  # fast-reid would download ImageNet weights without a path
        model = fastreid_build_model(cfg)
        apply_backbone_options(model, cfg)  # the original's BN, ResNet v1 strides, pixel format
        model = use_global_batch_statistics(model, cfg)  # after: it keeps the BN settings
        attach_l2_penalty(model, cfg)
        logger.info("Model %s: %d trainable tensors, %.2fM parameters", type(model).__name__,
                    sum(1 for p in model.parameters() if p.requires_grad),
                    sum(p.numel() for p in model.parameters()) / 1e6)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def test(cls, cfg, model):
        """fast-reid's evaluation on DATASETS.TESTS, or, while DATASETS.VALIDATION is on, on the
        validation split carved from the training identities (results named VALIDATION_SET)."""
        if not validation_enabled(cfg):
            return super().test(cfg, model)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATASETS.TESTS = (VALIDATION_SET,)
        cfg.freeze()
        logger.info("Evaluating on the validation split (DATASETS.VALIDATION), not DATASETS.TESTS")
        return super().test(cfg, model)

    def build_hooks(self):
        hooks = []
        for hook in super().build_hooks():
            if isinstance(hook, fastreid_hooks.LayerFreeze):
                hook = ResumableLayerFreeze(self.model, self.optimizer, hook.freeze_layers,
                                            hook.freeze_iters)
            elif isinstance(hook, fastreid_hooks.PeriodicWriter):
                set_writer_period(hook, self.cfg.SOLVER.LOG_PERIOD)
            hooks.append(hook)
        evaluation = next(i for i, h in enumerate(hooks) if isinstance(h, fastreid_hooks.EvalHook))
        hooks.insert(evaluation + 1, EvalHistory(self.cfg.OUTPUT_DIR))
        penalty = find_l2_penalty(self.model)
        if penalty is not None:
            # before the writers (the last hook), so the statistics are written the same epoch
            factor_logger = L2FactorLogger(penalty, self.cfg.MODEL.REG.LOG_PERIOD,
                                           self.cfg.OUTPUT_DIR)
            hooks.insert(len(hooks) - 1 if comm.is_main_process() else len(hooks), factor_logger)
            # its summed learning rates resume from the checkpoint, not from its coarser log
            self.checkpointer.checkpointables["l2_theta_lr_sum"] = factor_logger
        hooks.insert(0, ResumedMetricsLog(self.cfg.OUTPUT_DIR))
        if self.cfg.SOLVER.DIVERGENCE.ENABLED:
            hooks.append(DivergenceGuard(self.cfg.SOLVER.DIVERGENCE.FACTOR,
                                         self.cfg.SOLVER.DIVERGENCE.EARLY_ITERS,
                                         self.cfg.SOLVER.LOG_PERIOD))
        return hooks
