"""Dataset variants the paper's protocol needs."""
from __future__ import annotations

from fastreid.data.datasets import DATASET_REGISTRY
from fastreid.data.datasets.msmt17 import MSMT17


@DATASET_REGISTRY.register()
class MSMT17TrainVal(MSMT17):
    """MSMT17 V2 with its validation identities merged into training, as the paper did.

    fast-reid merges them only under DATASETS.COMBINEALL, which also merges query and gallery into
    the training set (test leakage); this keeps the test split apart.
    """

    def __init__(self, root: str = "datasets", **kwargs):
        kwargs.pop("combineall", None)
        super().__init__(root=root, **kwargs)
        val = self.process_dir(self.train_dir, self.list_val_path)
        self._train = list(self.train) + val
