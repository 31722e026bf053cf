"""diffusers glue: the noise schedule round trip, samplers that land on x0 with an oracle, guidance."""
import pytest
import torch

from moh.diffusion import check_sampling, guided_noise, sample_images, sampling_scheduler, training_scheduler


def test_add_noise_round_trip():
    sched = training_scheduler()
    x0, noise = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 1, 250, 700, 999])
    xt = sched.add_noise(x0, noise, t)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close((xt - (1 - a).sqrt() * noise) / a.sqrt(), x0, atol=1e-4, rtol=1e-4)
    assert float(sched.alphas_cumprod[-1]) < 1e-4  # t = 999 is nearly pure noise


@pytest.mark.parametrize("name", ["ddim", "dpm", "ddpm"])
def test_samplers_reach_x0_with_an_oracle_denoiser(name):
    """With the exact noise of a known x0 every sampler ends at x0: the scheduler round trip."""
    sched = training_scheduler()
    x0 = torch.randn(3, 1, 4, 4)
    abar = sched.alphas_cumprod

    def oracle(x_t, t_B, labels_B):
        a = abar[t_B].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    out = sample_images(oracle, torch.zeros(3, dtype=torch.long), (1, 4, 4), train_scheduler=sched, null_class=1,
                        cfg_scale=1.0, steps=20, scheduler=name, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=1e-3)


def test_guidance_mix_and_scale_one_is_conditional():
    calls = []

    def predict(x, t, y):
        calls.append(y.clone())
        return x * (y.view(-1, 1, 1, 1).float() + 1)

    x, t, y = torch.randn(2, 1, 2, 2), torch.tensor([5, 5]), torch.tensor([1, 2])
    torch.testing.assert_close(guided_noise(predict, x, t, y, 9, 1.0), predict(x, t, y))
    assert len(calls) == 2 and torch.equal(calls[0], y)  # scale 1: one conditional pass, no null rows
    torch.testing.assert_close(guided_noise(predict, x, t, y, 9, 0.0), x * 10)  # unconditional
    cond, uncond = x * (y.view(-1, 1, 1, 1) + 1), x * 10
    torch.testing.assert_close(guided_noise(predict, x, t, y, 9, 4.0), uncond + 4.0 * (cond - uncond))


def test_sampling_is_deterministic_with_a_seed():
    sched = training_scheduler()

    def predict(x, t, y):
        return 0.5 * x + 0.01 * y.view(-1, 1, 1, 1)

    def run(seed):
        return sample_images(predict, torch.tensor([0, 1]), (1, 3, 3), train_scheduler=sched, null_class=2,
                             cfg_scale=3.0, steps=5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))


def test_bad_sampling_input_names_the_value():
    with pytest.raises(ValueError, match="steps=0"):
        check_sampling(steps=0)
    with pytest.raises(ValueError, match=r"cfg scale=-0.5"):
        check_sampling(cfg_scale=-0.5)
    with pytest.raises(ValueError, match=r"class index 10 is not in \[0, 10\)"):
        check_sampling(labels=[1, 10], num_classes=10)
    with pytest.raises(ValueError, match="scheduler='euler'"):
        sampling_scheduler(training_scheduler(), "euler", 10)
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        training_scheduler(beta_schedule="cosine")
