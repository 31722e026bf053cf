"""Diffusion glue on ``diffusers`` schedulers: DDPM noise for training, DDIM / DPM-Solver (or
DDPM) for sampling, and classifier-free guidance. No diffusion maths of its own beyond the guidance
mix eps = eps_null + s * (eps_cond - eps_null) (Ho & Salimans 2022).

Shape legend: B batch, C channels, Hi x Wi image size.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

# predict(x_t (B, C, Hi, Wi), t (B,) long, labels (B,) long) -> predicted noise (B, C, Hi, Wi)
NoisePredictor = Callable[[Tensor, Tensor, Tensor], Tensor]

SCHEDULERS = ("ddim", "dpm", "ddpm")  # sampling schedulers by name


def training_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                       beta_end: float = 0.02):
    """The DDPM forward process DiT trains with (linear betas 1e-4 .. 0.02 over 1000 steps).
    ``clip_sample`` is off: moh's images are standardised per channel, not in [-1, 1]."""
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be an integer >= 2")
    valid = ("linear", "scaled_linear", "squaredcos_cap_v2")
    if beta_schedule not in valid:
        raise ValueError(f"beta_schedule={beta_schedule!r}; valid choices: {list(valid)}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                         beta_end=beta_end, clip_sample=False, prediction_type="epsilon")


def sampling_scheduler(train_scheduler, name: str = "ddim", steps: int = 50):
    """A sampler with the training noise schedule, its ``steps`` timesteps set."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "ddpm": DDPMScheduler}
    if name not in classes:
        raise ValueError(f"scheduler={name!r}; valid choices: {list(SCHEDULERS)}")
    check_sampling(steps=steps)
    sched = classes[name].from_config(train_scheduler.config)
    sched.set_timesteps(steps)
    return sched


def check_sampling(*, steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                   labels: Optional[Sequence[int]] = None, num_classes: Optional[int] = None) -> None:
    """ValueError naming the value: steps <= 0, cfg scale < 0, a class index outside [0, num_classes)."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if cfg_scale is not None and not (isinstance(cfg_scale, (int, float)) and cfg_scale >= 0):
        raise ValueError(f"cfg scale={cfg_scale!r} must be a number >= 0 (1: conditional, 0: unconditional)")
    if labels is not None and num_classes is not None:
        for c in labels:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < num_classes:
                raise ValueError(f"class index {c!r} is not in [0, {num_classes}) (the model has {num_classes} classes)")


def guided_noise(predict: NoisePredictor, x_t: Tensor, t_B: Tensor, labels_B: Tensor, null_class: int,
                 cfg_scale: float) -> Tensor:
    """Classifier-free guided noise prediction (B, C, Hi, Wi). Scale 1 is the plain conditional
    prediction (one forward), 0 the unconditional one; otherwise conditional and null-class rows
    run as one batch of 2B."""
    if cfg_scale == 1:
        return predict(x_t, t_B, labels_B)
    null = torch.full_like(labels_B, null_class)
    if cfg_scale == 0:
        return predict(x_t, t_B, null)
    eps = predict(torch.cat([x_t, x_t]), torch.cat([t_B, t_B]), torch.cat([labels_B, null]))
    cond, uncond = eps.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample_images(predict: NoisePredictor, labels_B: Tensor, shape: tuple[int, int, int], *, train_scheduler,
                  null_class: int, cfg_scale: float = 4.0, steps: int = 50, scheduler: str = "ddim",
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Generate one image per label: x_T ~ N(0, I) from ``generator`` (a CPU generator, so a seed
    gives the same noise on every device), then ``steps`` steps of ``scheduler`` with guidance
    ``cfg_scale``. Returns x_0 (B, C, Hi, Wi) on the labels' device, in the training data's scale."""
    check_sampling(steps=steps, cfg_scale=cfg_scale)
    sched = sampling_scheduler(train_scheduler, scheduler, steps)
    device = labels_B.device
    x = torch.randn((labels_B.shape[0], *shape), generator=generator).to(device) * sched.init_noise_sigma
    for t in sched.timesteps:
        t_B = torch.full((labels_B.shape[0],), int(t), dtype=torch.long, device=device)
        eps = guided_noise(predict, sched.scale_model_input(x, t), t_B, labels_B, null_class, cfg_scale)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x


__all__ = ["SCHEDULERS", "training_scheduler", "sampling_scheduler", "check_sampling", "guided_noise", "sample_images"]
