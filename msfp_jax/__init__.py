"""msfp_jax: 4-bit mixup-sign FP quantization of diffusion models (Zhao et al., CVPR 2025) in JAX/Flax."""

__version__ = "0.1.0"
