"""Diffusion: beta schedules, DDIM / DDPM samplers (jitted over the trajectory), gamma_t, DFA loss."""
from msfp_jax.diffusion.losses import dfa_loss, dfa_weight, gamma_normalizer
from msfp_jax.diffusion.samplers import (
                                         GuidedEpsFn,
                                         SamplerConfig,
                                         Trajectory,
                                         guided_eps_fn,
                                         noise_coefficients,
                                         sample,
                                         sampling_timesteps,
)
from msfp_jax.diffusion.schedules import Schedule, make_schedule

__all__ = [
    "GuidedEpsFn", "SamplerConfig", "Schedule", "Trajectory", "dfa_loss", "dfa_weight",
    "gamma_normalizer", "guided_eps_fn", "make_schedule", "noise_coefficients", "sample",
    "sampling_timesteps",
]
