"""Full-precision DDPM training of the built-in default model.

  python -m msfp_jax.train_fp --config=configs/default_fp.py --workdir=DIR

Standard epsilon-prediction training (Ho et al.): t uniform in [0, T), x_t = sqrt(abar) x_0 +
sqrt(1 - abar) eps, loss = mean((eps_theta(x_t, t) - eps)^2); Adam with linear warmup and gradient
clipping; an EMA of the weights is what gets exported. Step checkpoints (orbax, via
msfp_jax.checkpoint) make a killed run resume where it stopped; the batch of step s depends only on the
seed and s, so a resumed run ends where an uninterrupted one ends. Metrics go to TensorBoard and
DIR/metrics.jsonl (msfp_jax.metrics).

The guards of fine-tuning apply (msfp_jax.guards): a NaN loss, or one above train.divergence_factor x its running
median (checked at logged and checkpoint steps, and on the state about to be saved), stops the run naming the last
good checkpoint; SIGINT / SIGTERM save and stop at the next step ("interrupted at step N"); a resume restores the
newest checkpoint that reads and drops the metrics logged past it.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from msfp_jax import checkpoint, cli, config_record, guards, metrics, plotting
from msfp_jax.data import cifar10, digits
from msfp_jax.diffusion import SamplerConfig, make_schedule, sample
from msfp_jax.models import build_model, save_converted
from msfp_jax.models import load as load_model
from msfp_jax.run import lock
from msfp_jax.run import workdir as workdir_lib

# The loss became NaN / Inf or rose far above its running median (the class fine-tuning raises too).
TrainingDivergedError = guards.TrainingDivergedError

DIVERGENCE_HINT = ("Lower train.learning_rate or train.grad_clip_norm, in a new --workdir (a resumed run must keep "
                   "them); or, if such a loss is expected, raise train.divergence_factor (0 turns the "
                   "running-median check off) and rerun the same command: it resumes from the last good "
                   "checkpoint, if there is one.")


DATASETS = ("digits16", "cifar10")


def load_data(config, workdir: pathlib.Path, split: str = "train") -> np.ndarray:
  """The training images: float32 in [-1, 1] (digits16) or uint8 (cifar10; scaled inside the step)."""
  data_dir = pathlib.Path(config.data.data_dir) if config.data.data_dir else workdir / "tfds"
  if config.data.name == "digits16":
    images, _ = digits.load_split(split, data_dir)
    return images
  if config.data.name == "cifar10":
    images, _ = cifar10.load_cifar10(split, archive=config.data.get("archive") or None, data_dir=data_dir,
                                     source=config.data.get("source", "auto"))
    return images
  raise ValueError(f"unknown dataset {config.data.name!r}; train_fp knows {list(DATASETS)}.")


def save_grid_png(images: np.ndarray, path: pathlib.Path, scale: int = 4) -> None:
  """[N, H, W, C] images in [-1, 1] as one PNG grid (black 1-pixel gaps), each pixel `scale` x `scale`."""
  grid = plotting.image_grid(images)
  grid = grid[..., 0] if grid.shape[-1] == 1 else grid
  Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def _make_train_step(model, tx, schedule, config):
  sqrt_abar = jnp.asarray(np.sqrt(schedule.alphas_cumprod), jnp.float32)
  sqrt_one_minus_abar = jnp.asarray(np.sqrt(1 - schedule.alphas_cumprod), jnp.float32)
  num_timesteps = schedule.num_timesteps
  batch_size = config.train.batch_size
  ema_decay = config.train.ema_decay
  random_flip = bool(config.train.get("random_flip", False))

  def loss_fn(params, x0, t, noise):
    x_t = sqrt_abar[t][:, None, None, None] * x0 + sqrt_one_minus_abar[t][:, None, None, None] * noise
    eps = model.apply({"params": params}, x_t, t)
    return jnp.mean(jnp.square(eps - noise))

  @jax.jit
  def train_step(state, images, base_rng):
    # The batch is a function of (seed, step) only: resuming reproduces the uninterrupted run.
    rng = jax.random.fold_in(base_rng, state["step"])
    k_idx, k_t, k_noise = jax.random.split(rng, 3)
    x0 = images[jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])]
    if x0.dtype == jnp.uint8:  # kept as uint8 on the device: a quarter of the memory of float32
      x0 = x0.astype(jnp.float32) / 127.5 - 1.0
    if random_flip:
      flip = jax.random.bernoulli(jax.random.fold_in(k_idx, 1), 0.5, (batch_size, 1, 1, 1))
      x0 = jnp.where(flip, x0[:, :, ::-1, :], x0)
    t = jax.random.randint(k_t, (batch_size,), 0, num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], x0, t, noise)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # EMA with a warm start (decay grows to ema_decay), so short runs are not dominated by the init.
    step = state["step"] + 1
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema_params"], params)
    new_state = {"step": step, "params": params, "ema_params": ema, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  return train_step


# Jitted (initial_state, train_step) per training setup, so repeated runs in one process (a resumed run,
# tests) trace them once.
_COMPILED: dict[str, tuple] = {}


def _compiled_functions(config):
  # What the compiled functions depend on: the model, schedule and train fields a resumed run must keep.
  kept = config_record.kept_fields(config_record.json_config(config), config_record.TRAIN_FP_CHECKPOINT)
  key = json.dumps({k: v for k, v in kept.items() if k.split(".", 1)[0] in ("model", "schedule", "train")},
                   sort_keys=True)
  if key not in _COMPILED:
    model, _ = build_model(config.model.architecture, config.model.config.to_dict())
    schedule = make_schedule(**config.schedule.to_dict())
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, config.train.learning_rate, config.train.warmup_steps),
         optax.constant_schedule(config.train.learning_rate)], [config.train.warmup_steps])
    tx = optax.chain(optax.clip_by_global_norm(config.train.grad_clip_norm), optax.adam(lr))

    @jax.jit
    def initial_state(rng):
      # One jitted function: eager init would compile every op of the model separately.
      params = model.init(rng, *model.example_inputs(1))["params"]
      return {"step": jnp.asarray(0, jnp.int32), "params": params,
              "ema_params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params)}

    _COMPILED[key] = (initial_state, _make_train_step(model, tx, schedule, config))
  return _COMPILED[key]


def warm_start(state: dict, config, model_path: str) -> tuple[dict, dict]:
  """`state` with params and EMA set to an exported model's (EMA) weights and the step counter at its
  training step, so a stretch on a machine without the checkpoints goes on from the shipped model.

  Returns (state, the model's recorded training dict). Adam's moments are not exported: they start at zero,
  and the learning-rate warm-up (counted by the optimizer) runs again, which is what protects them.
  """
  _, variables, meta = load_model(model_path)
  if meta["architecture"] != config.model.architecture:
    raise ValueError(f"train.init_from={model_path!r} is a {meta['architecture']!r} model; the config trains "
                     f"{config.model.architecture!r}. Warm-start from a model of this config, or leave init_from "
                     "empty.")
  want = dataclasses.asdict(build_model(config.model.architecture, config.model.config.to_dict())[1])
  have = dataclasses.asdict(build_model(meta["architecture"], meta["config"])[1])
  if want != have:
    diffs = [f"{k}: {have.get(k)!r} (model) vs {want.get(k)!r} (config)" for k in sorted(want)
             if want.get(k) != have.get(k)]
    raise ValueError(f"train.init_from={model_path!r} is another architecture than the config: "
                     f"{'; '.join(diffs)}. Warm-start from a model of this config, or leave init_from empty.")
  params = jax.tree.map(lambda p, q: jnp.asarray(q, p.dtype), state["params"], variables["params"])
  training = meta.get("training", {})
  step = jnp.asarray(int(training.get("steps", 0)), jnp.int32)
  return {**state, "step": step, "params": params, "ema_params": jax.tree.map(jnp.copy, params)}, training


def train_and_evaluate(config, workdir) -> dict[str, Any]:
  """Trains (resuming from WORKDIR/checkpoints), exports the EMA model and writes sample/data grids."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_dict = config.to_dict()
  images = jnp.asarray(load_data(config, workdir))
  model_config = config.model.config.to_dict()
  model, _ = build_model(config.model.architecture, model_config)
  schedule = make_schedule(**config.schedule.to_dict())

  base_rng = jax.random.key(config.seed)
  init_rng, train_rng, sample_rng = jax.random.split(base_rng, 3)
  initial_state, train_step = _compiled_functions(config)
  state = initial_state(init_rng)
  params = state["params"]

  manager = checkpoint.CheckpointManager(workdir / "checkpoints", max_to_keep=2)
  earlier_training: dict = {}

  def check_saved_config(saved_config, step):
    # The config first: another architecture must be named field by field, not as an orbax tree mismatch.
    del step
    diffs = ([] if saved_config is None else
             config_record.differences(saved_config, config_dict, config_record.TRAIN_FP_CHECKPOINT))
    if diffs:
      raise checkpoint.CheckpointError(
          f"{workdir / 'checkpoints'} was written with a different config; these fields differ: "
          f"{config_record.describe(diffs)}. Use a new --workdir or the original config.")

  # The newest checkpoint that reads (an unreadable one is named and set aside).
  restored = manager.restore_newest(target=state, check_config=check_saved_config)
  latest = restored.step
  if latest is not None:
    state = jax.tree.map(jnp.asarray, restored.state)
    print(f"Resuming from step {latest}.", flush=True)
  elif config.train.get("init_from"):
    state, earlier_training = warm_start(state, config, config.train.init_from)
    print(f"Warm start from {config.train.init_from} (its step {int(state['step'])}; Adam moments and the "
          "learning-rate warm-up start afresh).", flush=True)

  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  # What a killed run logged past the step it resumes from is logged again: drop it first.
  writer = metrics.create_writer(workdir, resume_step=int(state["step"]))
  guard = guards.DivergenceGuard(float(config.train.get("divergence_factor", guards.DEFAULT_DIVERGENCE_FACTOR)),
                                 what="Training", hint=DIVERGENCE_HINT)
  guard.seed(metrics.read_losses(workdir)[-guards.DEFAULT_WINDOW:])
  if latest is None:
    writer.write_hparams({"num_params": num_params, "batch_size": config.train.batch_size,
                          "num_steps": config.train.num_steps})
  num_steps = config.train.num_steps
  report = metrics.progress(num_steps, writer, name="train_fp")
  start_step = int(state["step"])
  start_time = time.time()
  # Wall time of earlier stretches, so the model card states the whole cost.
  wall_file = workdir / "train_wall_seconds.json"
  if latest is not None:
    earlier = checkpoint.load_json(wall_file) if wall_file.is_file() else {}
  else:
    earlier = {"seconds": earlier_training.get("wall_seconds", 0.0)} if config.train.get("init_from") else {}
  stop_after = float(config.train.get("stop_after_seconds", 0) or 0)
  last = {}
  step = start_step
  last_saved = latest

  def last_good() -> str:
    return (f"step {last_saved} in {workdir / 'checkpoints'}" if last_saved is not None
            else "no checkpoint was written yet")

  def fetch_and_check(step: int, step_metrics) -> dict:
    # The loss is fetched (a device sync) only on logged and checkpoint steps.
    current = {k: float(v) for k, v in step_metrics.items()}
    guard.check(step, current["loss"], last_good=last_good())
    return current

  # SIGINT / SIGTERM: save at the next step boundary and stop (msfp_jax.guards).
  with guards.interruptible("train_fp", enabled=jax.process_count() == 1) as interrupts:
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = train_step(state, images, train_rng)
      out_of_time = bool(stop_after) and time.time() - start_time > stop_after
      logged = step % config.train.log_every == 0 or step == num_steps or out_of_time
      if logged:
        last = fetch_and_check(step, step_metrics)
        writer.write_scalars(step, last)
      report.report(step)
      if (step % config.train.checkpoint_every == 0 or step == num_steps or out_of_time
          or interrupts.requested):
        if not logged:
          last = fetch_and_check(step, step_metrics)
        # The loss of step s is that of the state before its update: check the state to be saved (on the next
        # batch; the result is dropped) so a diverged state is never checkpointed.
        _, probe = train_step(state, images, train_rng)
        guard.check(step, float(probe["loss"]), last_good=last_good(), accept=False,
                    note="(the state after this step, checked before it is saved)")
        interrupts.activity = f"the save of step {step}"
        manager.save(step, state, config=config_dict)
        manager.wait_until_finished()
        last_saved = step
        interrupts.activity = "the current step"
        interrupts.resume_hint = f"The newest checkpoint is step {step}"
        checkpoint.save_json(wall_file, {"step": step, "seconds": earlier.get("seconds", 0.0)
                                         + time.time() - start_time})
      if interrupts.requested:
        writer.flush()
        manager.close()
        interrupts.stop(step)
      if out_of_time:
        print(f"train.stop_after_seconds={stop_after:g} reached at step {step}; rerun with the same command to "
              "go on.", flush=True)
        break
    if interrupts.requested:  # a signal during the last save: the model is not exported in this run
      writer.flush()
      manager.close()
      interrupts.stop(step)
  final_step = int(state["step"])
  manager.wait_until_finished()
  manager.close()
  writer.flush()
  train_seconds = time.time() - start_time
  total_seconds = earlier.get("seconds", 0.0) + train_seconds

  # Export the EMA weights as a converted model, loadable with msfp_jax.models.load.
  export_dir = pathlib.Path(config.export_dir) if config.export_dir else workdir / "model"
  save_converted(export_dir, config.model.architecture, model_config, state["ema_params"],
                 extra_config={"schedule": config.schedule.to_dict(), "data": config.data.name,
                               "training": {"steps": final_step, "seed": config.seed,
                                            "batch_size": config.train.batch_size,
                                            "images_seen": final_step * config.train.batch_size,
                                            "wall_seconds": round(total_seconds, 1)}})

  samples = None
  if config.sample.num_samples:
    ema_variables = {"params": state["ema_params"]}
    eps_fn = lambda x, t: model.apply(ema_variables, x, t)
    cfg = config.model.config
    x_T = jax.random.normal(sample_rng, (config.sample.num_samples, cfg.resolution, cfg.resolution,
                                         cfg.in_channels), jnp.float32)
    sampler = SamplerConfig(kind=config.sample.kind, num_steps=config.sample.num_steps,
                            eta=config.sample.eta, skip=config.sample.skip)
    samples = np.asarray(sample(eps_fn, x_T, schedule, sampler, sample_rng))
    save_grid_png(samples, workdir / "samples.png")
    data = np.asarray(images[: config.sample.num_samples])
    save_grid_png(data.astype(np.float32) / 127.5 - 1 if data.dtype == np.uint8 else data, workdir / "data.png")
  result = {"final_step": final_step, "images_seen": final_step * config.train.batch_size,
            "wall_seconds_all_runs": total_seconds, "final_loss": last.get("loss"), "num_params": num_params,
            "train_seconds_this_run": train_seconds, "export_dir": str(export_dir),
            "samples_finite": None if samples is None else bool(np.all(np.isfinite(samples)))}
  checkpoint.save_json(workdir / "result.json", result)
  return result


def main(argv):
  del argv
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    workdir_lib.check_workdir_path(workdir)
  except app.UsageError as e:  # a file in the way
    raise SystemExit(f"error: {e}") from None
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    # One training per workdir: a second process fails at once, naming the holder (only process 0 locks).
    with lock.hold(workdir, enabled=jax.process_index() == 0):
      result = train_and_evaluate(_CONFIG.value, workdir)
  except lock.WorkdirLockedError as e:
    raise SystemExit(f"WorkdirLockedError: {e}") from None
  except guards.TrainingDivergedError as e:  # one line, no traceback (its message says what to change)
    raise SystemExit(f"TrainingDivergedError: {e}") from None
  print(result, flush=True)


if __name__ == "__main__":  # the flags are defined only when this is the program (see tests/test_imports.py)
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Training config file, e.g. configs/default_fp.py (a relative path that does not exist in the "
      "current directory is taken inside the package: msfp_jax/configs/default_fp.py).", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, the exported model.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)  # bad flags, an unknown config field: one line, no traceback
