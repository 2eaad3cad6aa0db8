"""Benchmark: one TALoRA (K=4) + W4A4 MSFP + DFA train step vs a plain FP forward+backward of the same UNet.

  python -m msfp_jax.bench finetune [--ch 64] [--resolution 32] [--batch 8] [--repeats 5]

Both are jitted on the same devices and timed after compilation (median of repeats). The train step includes
the teacher's FP forward on x_t, the student's fake-quantized forward with the merged LoRA bank, its backward,
and the AdamW update of all parameter groups. The teacher trajectory (one FP forward per visited step,
amortized over the steps trained from it) is timed separately.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from msfp_jax import diffusion, lora, models, parallel, quant
from msfp_jax.train import finetune, optimizer, pipeline
from msfp_jax.train.state import TrainState


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench finetune")
  parser.add_argument("--ch", type=int, default=64)
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv or [])

  unet = dict(resolution=args.resolution, ch=args.ch, ch_mult=(1, 2, 2), num_res_blocks=2,
              attn_resolutions=(args.resolution // 2,), dropout=0.0,
              num_groups=min(32, args.ch // 2))  # 32 groups as DDPM for ch >= 64; tiny models keep 2 per group
  model, _ = models.build_model("ddpm_unet", unet)
  x, t = model.example_inputs(args.batch)
  x = jax.random.normal(jax.random.key(0), x.shape)
  t = jnp.full((args.batch,), 500, jnp.int32)
  variables = model.init(jax.random.key(1), x, t)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables))
  qconfig = quant.QuantConfig(weight_bits=4, act_bits=4, rules=(
      quant.QuantRule(path=r"conv_in|temb_dense_\d+|conv_out", weight_bits=8, act_bits=8),), maxval_grid_size=20)
  qstate = quant.calibrate(model, variables, [(x, t)], qconfig)
  layers = quant.discover_layers(model, variables, x, t, config=qconfig)
  tcfg = lora.TALoRAConfig(num_banks=4, rank=args.rank, router=lora.RouterConfig(num_banks=4))
  talora = lora.init_talora(jax.random.key(2), layers, tcfg)
  qdict = qstate.to_dict()
  params = {"banks": talora["banks"], "router": talora["router"], "quant": jax.tree.map(jnp.asarray, qdict["arrays"])}
  tx = optimizer.make_optimizer(optimizer.OptimizerConfig(
      learning_rates={"lora": 1e-3, "router": 1e-3, "weight_scale": 1e-6, "act_quant": 5e-4}, num_steps=1000))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  bundle = pipeline.ModelBundle(model=model, variables=variables, meta={}, sample_shape=tuple(x.shape[1:]),
                                num_classes=0, null_label=-1, guidance_scale=1.0)
  schedule = diffusion.make_schedule()
  sampler = diffusion.SamplerConfig(num_steps=100)
  normalizer = diffusion.gamma_normalizer(diffusion.noise_coefficients(schedule, sampler))
  loss_fn = finetune.make_loss_fn(bundle, qdict["metadata"], tcfg, weighting="abs", normalizer=normalizer,
                                  balance_weight=0.0, all_timesteps=diffusion.sampling_timesteps(schedule, sampler))
  mesh = parallel.mesh_from_config(1)
  step = finetune.make_train_step(loss_fn, tx, mesh)
  xs = x[None]
  ts = jnp.asarray([500], jnp.int32)
  gammas = jnp.asarray([0.05], jnp.float32)
  labels = jnp.zeros((args.batch,), jnp.int32)
  holder = {"state": parallel.replicate(state, mesh)}

  def train_step():
    holder["state"], m = step(holder["state"], variables, xs, ts, gammas, jnp.int32(0), labels)
    return m["loss"]

  target = jax.random.normal(jax.random.key(3), x.shape)
  fp_tx = optax.adam(1e-4)
  fp_opt = fp_tx.init(variables)

  @jax.jit
  def fp_fwd_bwd(variables, opt_state):
    loss, grads = jax.value_and_grad(lambda v: jnp.mean((model.apply(v, x, t) - target) ** 2))(variables)
    updates, opt_state = fp_tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  fp_holder = {"v": variables, "o": fp_opt}

  def fp_step():
    fp_holder["v"], fp_holder["o"], loss = fp_fwd_bwd(fp_holder["v"], fp_holder["o"])
    return loss

  fp_forward = jax.jit(lambda v: model.apply(v, x, t))
  t_fp = _time(fp_step, args.repeats)
  t_train = _time(train_step, args.repeats)
  t_fwd = _time(lambda: fp_forward(variables), args.repeats)
  result = {"params": n_params, "batch": args.batch, "fp_fwd_bwd_s": t_fp, "talora_w4a4_dfa_step_s": t_train,
            "ratio": t_train / t_fp, "teacher_forward_s": t_fwd,
            "ratio_with_amortized_trajectory": (t_train + t_fwd) / t_fp, "device": str(jax.devices()[0].platform)}
  print(f"DDPM UNet {n_params / 1e6:.2f}M params, batch {args.batch}, {args.resolution}x{args.resolution}, "
        f"{result['device']}")
  print(f"{'FP forward+backward+Adam':42s} {t_fp * 1e3:9.1f} ms   1.00x")
  print(f"{'TALoRA K=4 W4A4 DFA train step':42s} {t_train * 1e3:9.1f} ms   {result['ratio']:.2f}x")
  print(f"{'  + teacher trajectory (1 FP fwd / step)':42s} {(t_train + t_fwd) * 1e3:9.1f} ms   "
        f"{result['ratio_with_amortized_trajectory']:.2f}x")
  return result


if __name__ == "__main__":
  run()
