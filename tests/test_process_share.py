"""SGP-F's noise and AT's random start are drawn for the global batch and sliced, so k processes
perturb and attack each sample as one process does (the same experiment, sample for sample)."""
import pytest
import torch
from torch import nn

from adaptive_l2.global_batch import check_process_share, draw_for_share
from adaptive_l2.adversarial import AdversarialTraining, metric_attack
from adaptive_l2.regularizers.sgp import FeatureGradientPerturbation
from small_models import small_batch, small_model


def _site_gradient_of_first_layer(rows, share, seed=5):
    """The first layer's weight gradient under SGP-F at site '1' (summed loss: every row's
    contribution is its own, as after DDP's all-reduce of the shares)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    noise = FeatureGradientPerturbation(model, sites=("1",), alpha=0.5, prob=0.5, seed=seed,
                                        rank=share[0], world_size=share[1],
                                        samples_per_process=len(rows))
    noise.start_iteration(3)
    model(rows).sum().backward()
    return model[0].weight.grad


def test_sgp_f_shares_add_up_to_the_one_process_gradient():
    rows = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    one = _site_gradient_of_first_layer(rows, (0, 1))
    halves = [_site_gradient_of_first_layer(rows[r * 4:(r + 1) * 4], (r, 2)) for r in (0, 1)]
    torch.testing.assert_close(halves[0] + halves[1], one, rtol=1e-5, atol=1e-6)
    # another noise seed gives another gradient: the equality above is about the noise
    plain = _site_gradient_of_first_layer(rows, (0, 1), seed=6)
    assert not torch.allclose(plain, one)
    # the old per-rank seeding (each share drawing its own rows) would not add up
    wrong = [_site_gradient_of_first_layer(rows[r * 4:(r + 1) * 4], (0, 1), seed=5 + r)
             for r in (0, 1)]
    assert not torch.allclose(wrong[0] + wrong[1], one, rtol=1e-3, atol=1e-5)


def test_attack_shares_start_where_the_one_process_attack_starts():
    model, images = small_model(), small_batch(size=4)["images"]
    model.eval()  # the attack runs in eval mode: every sample is attacked on its own

    def attack(part, share):
        generator = torch.Generator().manual_seed(11)
        return metric_attack(model, part, eps=4, steps=2, generator=generator,
                             process_share=share)

    one = attack(images, (0, 1))
    halves = torch.cat([attack(images[r * 2:(r + 1) * 2], (r, 2)) for r in (0, 1)])
    torch.testing.assert_close(halves, one, rtol=0, atol=1e-3)
    per_rank_seed = torch.cat([attack(images[r * 2:(r + 1) * 2], (0, 1)) for r in (0, 1)])
    assert (per_rank_seed - one).abs().max() > 0.5


@pytest.mark.parametrize("share", [(2, 2), (-1, 2), (0, 0)])
def test_bad_process_share_is_refused(share):
    with pytest.raises(ValueError, match="process_share"):
        check_process_share(share)
    with pytest.raises(ValueError, match="process_share"):
        AdversarialTraining(process_share=share)
    with pytest.raises(ValueError, match="process_share"):
        FeatureGradientPerturbation(nn.Sequential(nn.Linear(2, 2)), sites=("0",),
                                    rank=share[0], world_size=share[1])


def test_a_batch_of_blocks_keeps_each_blocks_share():
    """AT's [clean, adversarial] batch: 2 blocks, each this process's share of its global block;
    one process draws the same stream whatever the blocks."""
    def draw(lead):
        return torch.arange(float(torch.Size(lead).numel())).reshape(*lead, 1)

    one = draw_for_share(draw, 8, (0, 1), blocks=2).flatten()
    assert torch.equal(one, torch.arange(8.0))
    shares = [draw_for_share(draw, 4, (r, 2), blocks=2).flatten() for r in (0, 1)]
    # global rows [c0 c1 | a0 a1] of 2 rows each: rank 0 holds c0 and a0, rank 1 c1 and a1
    assert shares[0].tolist() == [0.0, 1.0, 4.0, 5.0] and shares[1].tolist() == [2.0, 3.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="blocks"):
        draw_for_share(draw, 5, (0, 2), blocks=2)


def test_derived_seeds_keep_the_streams_of_their_callers():
    """One helper for the sample and iteration seeds; the values are those the two former
    helpers gave (numpy SeedSequence, first word), so existing runs resume on the same streams."""
    import numpy as np

    from adaptive_l2.data.samplers import sample_seed
    from adaptive_l2.seeds import derived_seed
    from adaptive_l2.regularizers.step import iteration_seed

    expected_sample = int(np.random.SeedSequence([7, 3, 2]).generate_state(1, np.uint32)[0])
    expected_iteration = int(np.random.SeedSequence([7, 9]).generate_state(2, np.uint64)[0] >> 1)
    assert sample_seed(7, 3, 2) == expected_sample
    assert iteration_seed(7, 9) == expected_iteration
    assert 0 <= derived_seed([2**40 + 7, 9], bits=63) < 2**63
    assert derived_seed([2**32 + 7, 9], bits=63) == expected_iteration  # first key mod 2**32
    with pytest.raises(ValueError, match="bits"):
        derived_seed([1], bits=64)
