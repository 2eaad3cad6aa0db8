"""Data of the built-in default model (a tfds builder of our own) and where its weights ship."""
from msfp_jax.data.default_model import default_model_path
from msfp_jax.data.digits import Digits16, digits16_source, load_split, split_indices, upscaled_digits

__all__ = ["Digits16", "default_model_path", "digits16_source", "load_split", "split_indices", "upscaled_digits"]
