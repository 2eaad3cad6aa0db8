"""msfp_jax: 4-bit mixup-sign FP quantization of diffusion models (MSFP) in JAX/Flax."""

__version__ = "0.1.0"
