"""msfp_jax: 4-bit mixup-sign FP quantization of diffusion models (Zhao et al., CVPR 2025) in JAX/Flax.

    import msfp_jax
    model, variables, meta = msfp_jax.models.load("builtin:cifar10")
    qstate = msfp_jax.quant.calibrate(model, variables, batches, msfp_jax.quant.QuantConfig(weight_bits=4, act_bits=4))

The subpackages (docs/architecture.md): quant and lora (the method, knowing nothing of diffusion), models,
diffusion, data, evaluation (FID/sFID/IS), train (calibration and fine-tuning stages), run (the main job's
orchestration), configs, bench, diagnostics. They load on first use, so that `import msfp_jax` (or
a config file) costs nothing and the command-line tools can refuse bad input before jax and TensorFlow load.
"""
import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("bench", "configs", "data", "diagnostics", "diffusion", "evaluation", "lora", "models", "quant",
                "run", "train")
__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str):
  if name not in _SUBPACKAGES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return importlib.import_module(f"{__name__}.{name}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
