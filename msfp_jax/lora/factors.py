"""LoRA factors for Dense and Conv kernels, stacked into K banks.

A Flax kernel stores the output features last: Dense [in, out], Conv [kh, kw, in, out]. A LoRA pair of rank r
is A with the kernel's shape up to the last axis plus r ([in, r] or [kh, kw, in, r]: for a conv, a conv with the
layer's kernel size and r output channels) and B of shape [r, out] (a 1x1 conv). Their merged update, a kernel
of the layer's own shape, is

    dW[..., i, o] = sum_r A[..., i, r] B[r, o]

which is exactly the conv "A then 1x1 B" written as one kernel, so it can be added to W before the weight is
fake-quantized: W_q = Q(W + scale * dW) (EfficientDM's merge-then-quantize).

Banks stack K such pairs on a leading axis: a [K, ..., r], b [K, r, out].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _check_kernel_shape(kernel_shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(d) for d in kernel_shape)
  if len(shape) < 2:
    raise ValueError(
        f"LoRA needs a Dense [in, out] or Conv [..., in, out] kernel; got kernel shape {shape}.")
  return shape


def init_lora_bank(rng: jax.Array, kernel_shape: Sequence[int], *, rank: int,
                   num_banks: int = 1, dtype=jnp.float32) -> dict[str, jax.Array]:
  """K LoRA pairs for one kernel: {"a": [K, *kernel_shape[:-1], r], "b": [K, r, out]}.

  A is Kaiming-uniform with a = sqrt(5) (PyTorch's default for Linear/Conv, the convention of LoRA and
  EfficientDM): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = prod(kernel_shape[:-1]). B is zero, so a fresh
  bank leaves the layer unchanged. Each of the K banks gets its own A.
  """
  shape = _check_kernel_shape(kernel_shape)
  if int(rank) < 1:
    raise ValueError(f"LoRA rank must be >= 1; got {rank}. Set the config's lora.rank to a positive integer.")
  if int(num_banks) < 1:
    raise ValueError(
        f"The number of LoRA banks K must be >= 1 (K = 1 is plain LoRA); got {num_banks}. "
        "Set the config's lora.num_banks.")
  fan_in = math.prod(shape[:-1])
  bound = 1.0 / math.sqrt(fan_in)
  a = jax.random.uniform(rng, (num_banks, *shape[:-1], rank), dtype, -bound, bound)
  b = jnp.zeros((num_banks, rank, shape[-1]), dtype)
  return {"a": a, "b": b}


def lora_delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """The merged update of one pair: a [..., in, r], b [r, out] -> dW [..., in, out]."""
  return jnp.tensordot(a, b, axes=1)


def mixed_lora_delta(bank: dict[str, jax.Array], bank_weights: jax.Array) -> jax.Array:
  """sum_k w_k A_k B_k: the update of a weighted mix of the K pairs of one layer.

  With w a (straight-through) one-hot this is the update of the chosen pair in the forward pass, while
  the router gets the gradient <dL/dW, A_k B_k> for every k. Mixing the products (not the factors) keeps
  that gradient free of cross terms A_j B_k.
  """
  a, b = bank["a"], bank["b"]
  if bank_weights.shape != (a.shape[0],):
    raise ValueError(f"bank_weights must have shape ({a.shape[0]},) (one weight per bank); "
                     f"got {bank_weights.shape}.")
  # Weight the (small) B factors first: sum_k A_k (w_k B_k) costs one batched contraction.
  weighted_b = b * bank_weights[:, None, None].astype(b.dtype)
  return jnp.einsum("k...r,kro->...o", a, weighted_b)
