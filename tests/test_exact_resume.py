"""A run killed at any point after its first checkpoint and resumed ends with the same weights,
bit for bit on the CPU, as the uninterrupted run with the same SEED."""
import os
import random
import signal
import subprocess
import sys
import time

import torch
from conftest import REPO, SYNTHETIC_BASE, TRAIN_NET, run_train_net, tiny_opts

from adaptive_l2.regularizers.step import iteration_seed

# adaptive L2 + SGP-F and AT (their own random streams) + augmentation (flip, pad + crop,
# erasing) on; 4 epochs x 3 iterations, a checkpoint every epoch
RUN = ["MODEL.REG.NAME", "adaptive", "MODEL.REG.SGP.ENABLED", "True",
       "MODEL.REG.AT.ENABLED", "True",
       "DATALOADER.SAMPLER_TRAIN", "StrictIdentitySampler", "INPUT.REA.ENABLED", "True",
       "SOLVER.ITERS_PER_EPOCH", "3", "SOLVER.MAX_EPOCH", "4", "TEST.EVAL_PERIOD", "2"]
KILL_POINTS = 2


def _final_weights(output_dir):
    return torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu",
                      weights_only=False)["model"]


def _start_and_kill(args, output_dir, delay_s: float) -> None:
    """Start train_net, SIGKILL it `delay_s` seconds after its first checkpoint appears."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen([sys.executable, TRAIN_NET, *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(output_dir, "last_checkpoint")
    deadline = time.monotonic() + 240
    try:
        while not os.path.exists(marker):
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        time.sleep(delay_s)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_killed_and_resumed_runs_end_bit_identical_to_the_uninterrupted_run(dataset_root,
                                                                            tmp_path):
    reference = tmp_path / "uninterrupted"
    run_train_net(["--config-file", SYNTHETIC_BASE, *tiny_opts(dataset_root, reference, *RUN)])
    expected = _final_weights(reference)
    rng = random.Random(0)
    for point in range(KILL_POINTS):
        out = tmp_path / f"killed{point}"
        # the resumed half runs with data-loader workers: augmentation is seeded per sample
        _start_and_kill(["--config-file", SYNTHETIC_BASE, *tiny_opts(dataset_root, out, *RUN)],
                        str(out), delay_s=rng.uniform(0.0, 3.0))
        assert not (out / "model_final.pth").exists(), "killed too late to test a resume"
        run_train_net(["--config-file", SYNTHETIC_BASE, "--resume",
                       *tiny_opts(dataset_root, out, *RUN, "DATALOADER.NUM_WORKERS", "2")])
        resumed = _final_weights(out)
        assert resumed.keys() == expected.keys()
        differing = [k for k in expected if not torch.equal(resumed[k], expected[k])]
        assert differing == [], f"kill point {point}: {len(differing)} tensors differ"


def test_random_streams_of_sgp_and_at_are_keyed_by_the_iteration():
    from adaptive_l2.regularizers.sgp import ParameterGradientPerturbation

    noise = ParameterGradientPerturbation(alpha=0.5, prob=1.0, noise="gaussian", seed=3)
    draws = {}
    for iteration in (5, 6, 5):
        noise.start_iteration(iteration)
        grad = torch.ones(8)
        param = torch.nn.Parameter(torch.zeros(8))
        param.grad = grad.clone()
        noise.apply([param])
        draws.setdefault(iteration, []).append(param.grad.clone())
    assert torch.equal(draws[5][0], draws[5][1])  # the same iteration draws the same noise
    assert not torch.equal(draws[5][0], draws[6][0])
    assert iteration_seed(4321, 7) == iteration_seed(4321, 7) != iteration_seed(4321, 8)
