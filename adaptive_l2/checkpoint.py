"""Loading weights for evaluation, refusing checkpoints of another model.

fast-reid's Checkpointer loads non-strictly and only logs skipped or mismatched tensors, so a
checkpoint of another model evaluates random weights in silence. For evaluation every model tensor
must come from the file and every tensor of the file must fit the model, except the L2 penalty's
thetas (a checkpoint trained without the penalty
evaluates the same: thetas do not touch the features).
"""
from __future__ import annotations

import os

from fastreid.utils.checkpoint import Checkpointer
from torch import nn

from adaptive_l2.regularizers.l2 import PENALTY_ATTRIBUTE


def load_for_evaluation(model: nn.Module, path: str) -> None:
    """Load `path` into `model`; raise if any non-penalty tensor is missing or of another shape."""
    if not path:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to evaluate")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS '{path}' does not exist")
    checkpointer = Checkpointer(model)
    checkpoint = checkpointer._load_file(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"MODEL.WEIGHTS '{path}' is not a fast-reid checkpoint (no 'model' entry)")
    incompatible = checkpointer._load_model(checkpoint)
    ours = PENALTY_ATTRIBUTE + "."
    # A classifier built with MODEL.HEADS.NUM_CLASSES 0 (the number is learnt from the training
    # set) is empty at evaluation, where it plays no part: its size may differ from the file's.
    classes_unknown = {k for k, _, model_shape in incompatible.incorrect_shapes if 0 in model_shape}
    incompatible = incompatible._replace(incorrect_shapes=[
        entry for entry in incompatible.incorrect_shapes if entry[0] not in classes_unknown])
    missing = [k for k in incompatible.missing_keys
               if not k.startswith(ours) and k not in classes_unknown]
    unexpected = [k for k in incompatible.unexpected_keys if not k.startswith(ours)]
    if incompatible.incorrect_shapes or missing or unexpected:
        shapes = ", ".join(f"{k}: {a} in file vs {b} in model"
                           for k, a, b in incompatible.incorrect_shapes[:5])
        raise ValueError(
            f"MODEL.WEIGHTS '{path}' does not match the configured model "
            f"({len(incompatible.incorrect_shapes)} tensors of another shape{': ' + shapes if shapes else ''}; "
            f"{len(missing)} missing{': ' + ', '.join(missing[:5]) if missing else ''}; "
            f"{len(unexpected)} unknown to the model{': ' + ', '.join(unexpected[:5]) if unexpected else ''}). "
            "Was it trained with another MODEL.META_ARCHITECTURE / MODEL.BACKBONE config?")
