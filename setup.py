"""adaptive_l2: adaptive L2 regularization and stochastic gradient perturbation for fast-reid.

fast-reid itself (PyPI `fastreid==1.4.0`) is not listed in install_requires: its metadata pins
torch 1.13.1, which does not exist for Python 3.11. Install it with `pip install --no-deps
fastreid==1.4.0` (the Makefile does); its real runtime needs are listed here instead.
"""
from setuptools import find_packages, setup

setup(
    name="adaptive_l2",
    version="0.1.0",
    description="Adaptive L2 regularization (Ni et al., ICPR 2020) and SGP for fast-reid",
    packages=find_packages(include=["adaptive_l2", "adaptive_l2.*"]),
    # the shipped YAMLs (configs/ in a clone is a link to them): a non-editable install has them
    package_data={"adaptive_l2": ["configs/*.yml", "configs/*/*.yml", "configs/*/*/*.yml"]},
    entry_points={
        "console_scripts": [
            "adaptive-l2-train=adaptive_l2.cli.train:main",
            "adaptive-l2-table=adaptive_l2.cli.table:main",
            "adaptive-l2-attack=adaptive_l2.cli.attack:main",
            "adaptive-l2-plot=adaptive_l2.cli.plot:main",
            "adaptive-l2-tune=adaptive_l2.cli.tune:main",
        ],
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<3",
        "torchvision>=0.16",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.2",
        "yacs>=0.1.8",
        "PyYAML>=6.0",
        "termcolor>=2.0",
        "tabulate>=0.9",
        "tensorboard>=2.12",
        "Pillow>=9.0",
        "matplotlib>=3.7",
        "optuna>=4.9",  # tools/tune.py; RetryHeartbeatStaleTrialCallback (tested: 5.0.0)
        "submitit>=1.5",  # Slurm (and local) jobs for the table and the tuning workers
        "Cython>=3.0",  # builds fast-reid's rank evaluator at install time
        "setuptools>=65",
    ],
    extras_require={
        # faiss is imported by fast-reid; pick exactly one build.
        "cpu": ["faiss-cpu>=1.7.4"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        "test": ["pytest>=7.4"],
    },
)
