"""The shared timestep router of TALoRA (method.md section 5).

sinusoidal embedding of t -> Dense -> SiLU -> Dense -> K logits. The forward pass uses the hard one-hot of the
argmax; the backward pass uses the softmax's gradient (straight-through).

Initialization (our choice, a config field): the K banks start with contiguous, equal shares of [0, T). The last
layer sees the normalized timestep u = (t + 0.5) / T besides the MLP's hidden features. At init its weights on the
hidden features are zero and its weight on u and its bias are 2 c_k s and -c_k^2 s, with c_k = (k + 1/2) / K the
centre of bank k's share and s a sharpness. Then

    logit_k(u) = s (2 c_k u - c_k^2) = s (u^2 - (u - c_k)^2) ,

whose argmax is the bank with the nearest centre: bank k owns exactly t in [k T / K, (k + 1) T / K). The
allocation is exact from the first step, with no pretraining pass; every weight stays trainable, so the router
is free to move the boundaries (or use the sinusoidal features) during fine-tuning.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
  num_banks: int = 4            # K; 1 gives plain LoRA (the router then always picks bank 0).
  num_timesteps: int = 1000     # T of the diffusion schedule; routed timesteps lie in [0, T).
  embed_dim: int = 64           # width of the sinusoidal timestep embedding.
  hidden_dim: int = 64          # width of the router MLP's hidden layer.
  init_sharpness: float = 50.0  # s above: how decisive the initial piecewise allocation is.

  def __post_init__(self):
    if int(self.num_banks) < 1:
      raise ValueError(f"TALoRA needs K >= 1 banks (K = 1 is plain LoRA); got num_banks={self.num_banks}.")
    if int(self.num_timesteps) < 1:
      raise ValueError(f"num_timesteps must be >= 1; got {self.num_timesteps}.")
    if self.embed_dim < 2 or self.embed_dim % 2:
      raise ValueError(f"embed_dim must be an even number >= 2; got {self.embed_dim}.")


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
  """[sin, cos] embedding of timesteps t [B] with frequencies exp(-log(10000) k / (dim/2 - 1))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def check_timesteps(t, num_timesteps: int) -> jax.Array:
  """The router's input must be integer timesteps, shape [] or [B], inside [0, T) (checked when concrete)."""
  if isinstance(t, (bool, float, complex, np.floating, str)) or t is None:
    raise ValueError(
        f"The timestep router takes integer diffusion timesteps in [0, {num_timesteps}); got {type(t).__name__} "
        f"{t!r}. Pass the sampler's int32 timesteps, not a noise level or an embedding.")
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(
        f"The timestep router takes integer diffusion timesteps in [0, {num_timesteps}); got dtype {t.dtype} "
        f"with shape {t.shape}. Pass the sampler's int32 timesteps, not a noise level, an image or an embedding.")
  if t.ndim > 1:
    raise ValueError(
        f"The timestep router takes timesteps of shape [] or [batch]; got shape {t.shape}. "
        "Pass the sampler's timesteps, not an image or an embedding.")
  if not isinstance(t, jax.core.Tracer):
    values = np.asarray(t)
    if values.size and (values.min() < 0 or values.max() >= num_timesteps):
      raise ValueError(f"Timesteps must lie in [0, {num_timesteps}); got values in "
                       f"[{values.min()}, {values.max()}].")
  return t.reshape(-1).astype(jnp.int32)


class TimestepRouter(nn.Module):
  """t [B] (int) -> K logits [B, K]; see the module docstring for the architecture and its initialization."""

  config: RouterConfig

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    cfg = self.config
    t = check_timesteps(t, cfg.num_timesteps)
    k = int(cfg.num_banks)
    emb = sinusoidal_embedding(t, cfg.embed_dim)
    hidden = nn.silu(nn.Dense(cfg.hidden_dim, name="hidden")(emb))
    u = ((t.astype(jnp.float32) + 0.5) / cfg.num_timesteps)[:, None]
    centres = (np.arange(k, dtype=np.float32) + 0.5) / k
    s = float(cfg.init_sharpness)

    def head_kernel_init(rng, shape, dtype=jnp.float32):
      del rng
      kernel = np.zeros(shape, np.float32)
      kernel[0, :] = 2.0 * centres * s  # row 0 multiplies u; the hidden-feature rows start at zero.
      return jnp.asarray(kernel, dtype)

    def head_bias_init(rng, shape, dtype=jnp.float32):
      del rng
      return jnp.asarray(-(centres ** 2) * s, dtype).reshape(shape)

    features = jnp.concatenate([u, hidden], axis=-1)
    return nn.Dense(k, kernel_init=head_kernel_init, bias_init=head_bias_init, name="head")(features)


def straight_through_one_hot(logits: jax.Array) -> jax.Array:
  """Forward: one_hot(argmax(logits)); backward: the gradient of softmax(logits)."""
  soft = jax.nn.softmax(logits, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=soft.dtype)
  return hard + soft - jax.lax.stop_gradient(soft)


def balance_loss(logits: jax.Array) -> jax.Array:
  """Switch-Transformer load-balancing term over a set of timesteps: K * sum_k f_k p_k.

  f_k is the fraction of timesteps routed to bank k (hard, no gradient), p_k the mean softmax probability of
  bank k (differentiable). It is 1 for a perfectly even allocation and K when one bank takes everything.
  """
  k = logits.shape[-1]
  soft = jax.nn.softmax(logits, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), k, dtype=soft.dtype)
  return k * jnp.sum(jnp.mean(hard, axis=0) * jnp.mean(soft, axis=0))


def init_router(rng: jax.Array, config: RouterConfig) -> dict:
  """Router parameters (a Flax params dict)."""
  return TimestepRouter(config).init(rng, jnp.zeros((1,), jnp.int32))["params"]


def route(router_params: dict, config: RouterConfig, t) -> jax.Array:
  """Bank weights [B, K] for timesteps t (straight-through one-hot)."""
  logits = TimestepRouter(config).apply({"params": router_params}, t)
  return straight_through_one_hot(logits)


def allocation(router_params: dict, config: RouterConfig) -> np.ndarray:
  """The bank the router picks for every t in [0, T): int array [T] (for logging and plots)."""
  t = jnp.arange(config.num_timesteps, dtype=jnp.int32)
  logits = TimestepRouter(config).apply({"params": router_params}, t)
  return np.asarray(jnp.argmax(logits, axis=-1))
