"""Patches of fast-reid's evaluation: re-ranking without a GPU and on the features' device, and
no compilation (or `sys.exit`) inside an evaluation."""
from __future__ import annotations

import contextvars
import warnings
from typing import List

import torch


def patch_jaccard_search_device() -> List[str]:
    """Let k-reciprocal re-ranking run without a GPU.

    `fastreid.utils.compute_dist.build_dist(..., metric="jaccard")` hard-codes
    `search_option=0` (faiss GPU resources, `features.cuda()`), so `TEST.RERANK.ENABLED` crashes on
    a CPU machine or with the faiss CPU build, and that path fills two dense N x N matrices (35 GB
    each at MSMT17 size). We route it to the project's sparse re-ranking: faiss CPU search for CPU
    features, a blocked torch pass on the device of others.
    """
    import fastreid.utils.compute_dist as compute_dist

    from adaptive_l2.evaluation.rerank import jaccard_distance

    host_build_dist = compute_dist.build_dist

    def build_dist(feat_1, feat_2, metric="euclidean", **kwargs):
        if metric != "jaccard":
            return host_build_dist(feat_1, feat_2, metric, **kwargs)
        feat = torch.cat((feat_1, feat_2), dim=0)
        return jaccard_distance(feat, k1=kwargs["k1"], k2=kwargs["k2"], num_query=feat_1.size(0))

    compute_dist.build_dist = build_dist
    import fastreid.evaluation.reid_evaluation as reid_evaluation

    reid_evaluation.build_dist = build_dist
    return ["jaccard_on_cpu"]


# The re-ranked distance `ReidEvaluator.evaluate` is computing, while it runs (see below).
_EVALUATOR_RERANK: contextvars.ContextVar = contextvars.ContextVar("evaluator_rerank",
                                                                   default=None)


def patch_evaluator_rerank() -> List[str]:
    """Re-rank in fast-reid's evaluator in the configured variant, on the features' device.

    fast-reid's `ReidEvaluator.process` copies every feature batch to the CPU, so re-ranking never
    saw CUDA features (a faiss GPU build changed nothing), and `evaluate` always combines
    fast-reid's variant. With TEST.RERANK.ENABLED, `process` keeps the features on their device
    (one process without AQE: AQE's host code needs CPU tensors, and several processes gather
    pickled CPU tensors) and `evaluate` re-ranks on the device the features came from. The host's
    `evaluate` then runs on a copy of the config with re-ranking off, while its one `build_dist`
    call returns the re-ranked distance of TEST.RERANK.VARIANT; the caller's config is untouched.
    """
    import fastreid.evaluation.reid_evaluation as reid_evaluation
    from fastreid.utils import comm

    from adaptive_l2.evaluation.rerank import evaluator_rerank_distance

    evaluator = reid_evaluation.ReidEvaluator
    host_process, host_evaluate = evaluator.process, evaluator.evaluate
    metric_distance = reid_evaluation.build_dist

    def process(self, inputs, outputs):
        self._feature_device = outputs.device
        rerank = self.cfg.TEST.RERANK.ENABLED
        if not (rerank and not self.cfg.TEST.AQE.ENABLED and comm.get_world_size() == 1):
            return host_process(self, inputs, outputs)
        host_process(self, inputs, torch.empty(0))  # ids to the CPU, as the host does
        self._predictions[-1]["feats"] = outputs.to(torch.float32)

    def evaluate(self):
        settings = self.cfg.TEST.RERANK
        if not settings.ENABLED:
            return host_evaluate(self)
        device = getattr(self, "_feature_device", torch.device("cpu"))

        def reranked(query, gallery, metric):
            return evaluator_rerank_distance(
                query.to(device), gallery.to(device), metric, metric_distance,
                variant=settings.get("VARIANT", "fastreid"), k1=settings.K1, k2=settings.K2,
                lambda_value=settings.LAMBDA,
            )

        host_cfg = self.cfg
        self.cfg = host_cfg.clone()
        self.cfg.defrost()
        self.cfg.TEST.RERANK.ENABLED = False
        token = _EVALUATOR_RERANK.set(reranked)
        try:
            return host_evaluate(self)
        finally:
            _EVALUATOR_RERANK.reset(token)
            self.cfg = host_cfg

    def build_dist(feat_1, feat_2, metric="euclidean", **kwargs):
        reranked = _EVALUATOR_RERANK.get()
        if reranked is None or metric == "jaccard":
            return metric_distance(feat_1, feat_2, metric, **kwargs)
        return reranked(feat_1, feat_2, metric)

    evaluator.process, evaluator.evaluate = process, evaluate
    reid_evaluation.build_dist = build_dist
    return ["evaluator_rerank_on_feature_device"]


def patch_rank_evaluator_compile() -> List[str]:
    """Never compile, and never `sys.exit`, inside an evaluation.

    fast-reid compiles its Cython rank evaluator at the first evaluation by running `make` in
    site-packages with whatever `python3` is first on PATH, and calls `sys.exit(1)` if that fails,
    after training has finished. The project builds the extension at install time (`make
    install`); if it is missing anyway, evaluation warns once and uses fast-reid's pure-Python
    evaluator, which gives the same numbers, more slowly.
    """
    import fastreid.evaluation.reid_evaluation as reid_evaluation

    def rank_evaluator_is_compiled() -> bool:
        try:
            from fastreid.evaluation.rank_cylib.rank_cy import evaluate_cy  # noqa: F401
        except ImportError:
            return False
        return True

    def compile_dependencies(self) -> None:
        if not rank_evaluator_is_compiled() and not getattr(compile_dependencies, "warned", False):
            warnings.warn(
                "fast-reid's Cython rank evaluator is not built; evaluating with the slower Python "
                "evaluator. Build it with `make install` (see README).",
                RuntimeWarning,
            )
            compile_dependencies.warned = True

    def refuse_runtime_compile() -> None:
        raise RuntimeError(
            "adaptive_l2 does not compile fast-reid's rank evaluator during a run; "
            "build it at install time with `make install`."
        )

    reid_evaluation.ReidEvaluator._compile_dependencies = compile_dependencies
    reid_evaluation.compile_helper = refuse_runtime_compile
    return ["rank_evaluator_no_runtime_compile"]
