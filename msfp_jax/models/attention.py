"""The attention matmuls as a module of their own.

Quantization interceptors only see module method calls, so QK^T and softmax(.)V must be module calls
to be observable (and, when a rule asks for it, quantized). The model code stays quantization-free.
"""
import flax.linen as nn
import jax.numpy as jnp


class MatMul(nn.Module):
  """`einsum(equation, a, b)`: the attention score (QK^T) or value (softmax(.)V) product."""

  equation: str

  @nn.compact
  def __call__(self, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum(self.equation, a, b)
