"""Data for the project: a seeded synthetic person re-id dataset in Market-1501 format.

The machines have no real re-id datasets, so experiments train and test on data generated here.
Importing this package registers ``SyntheticReID`` in fast-reid's ``DATASET_REGISTRY``.
"""
from adaptive_l2.data.datasets import SyntheticReID
from adaptive_l2.data.synthetic import generate_synthetic_market

__all__ = ["SyntheticReID", "generate_synthetic_market"]
