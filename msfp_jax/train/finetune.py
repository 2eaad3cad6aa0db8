"""Data-free TALoRA + DFA fine-tuning of a calibrated quantized diffusion model (method.md sections 5-7).

Per optimizer step s:
  * trajectory j = s // n (n = visited steps trained per trajectory): starting noise (and labels) are a pure
    function of (seed, j); the FP teacher's DDIM trajectory is computed once per j (and recomputed after a
    restart, identically);
  * visited step i = order_j[s % n] (order_j a seeded permutation, or the sampler's order): teacher and student
    predict eps on the same x_t (teacher forcing), all samples at the same t, so the router picks one bank;
  * loss = DFA (w(gamma_t) * MSE) [+ balance_weight * router load balance], AdamW per parameter group.

Trainable: LoRA banks, router, weight and activation maxvals / zero points. Frozen: the base weights (they are
not even in the optimizer state). The batch is sharded over the "data" mesh axis, everything else replicated;
each process feeds its own rows of the global batch. Checkpoints every `checkpoint_every` steps and at the end;
a restart resumes from the latest and ends bit-identical to an uninterrupted run.

Faults (msfp_jax.guards, docs/reliability.md): a NaN loss, or one above `finetune.divergence_factor` x its running
median, stops the run naming the last good checkpoint, and the state of a checkpoint step is checked (its loss on
the step's batch) before it is saved, so no diverged state is checkpointed. SIGINT / SIGTERM stop at the next step
boundary after saving ("interrupted at step N"). A resumed run restores the newest checkpoint that reads (an
unreadable one is named and set aside) and first drops the metrics an earlier run logged past that step.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from msfp_jax import checkpoint, config_record, diffusion, guards, lora, metrics, parallel, plotting, quant
from msfp_jax.train import calibration, pipeline
from msfp_jax.train import optimizer as optimizer_lib
from msfp_jax.train import state as state_lib

CHECKPOINT_DIR = "finetune_checkpoints"
ROUTER_PLOT = "router_allocation.png"
ROUTER_JSON = "router_allocation.json"


# The loss became NaN / Inf or rose far above its running median (one class for every training loop).
TrainingDivergedError = guards.TrainingDivergedError

DIVERGENCE_HINT = (
    "Lower the learning rates (finetune.lr.lora / router / weight_scale / act_quant) or set "
    "finetune.grad_clip_norm > 0, in a new --workdir (a resumed run must keep those fields); or, if such a loss "
    "is expected, raise finetune.divergence_factor (0 turns the running-median check off) and rerun the same "
    "command: it resumes from the last good checkpoint, if there is one.")


class ConfigMismatchError(ValueError):
  """The workdir holds a fine-tuning run of a different config."""


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
  step: int
  params: Any            # trained {"banks", "router", "quant"} (numpy)
  qstate: Any            # the trained QuantState
  talora_config: lora.TALoRAConfig
  last_loss: float | None


# ----------------------------------------------------------------------------------------------- config checks
def _check_finetune_config(config) -> None:
  f = config.finetune
  problems = []
  for name in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
    if int(f[name]) < 1:
      problems.append(f"finetune.{name} must be >= 1 (got {f[name]})")
  if int(f.steps_per_trajectory) < 0:
    problems.append(f"finetune.steps_per_trajectory must be >= 0 (0 = all steps; got {f.steps_per_trajectory})")
  factor = f.get("divergence_factor", guards.DEFAULT_DIVERGENCE_FACTOR)
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 0:
    problems.append(f"finetune.divergence_factor must be a number >= 0 (0 = no running-median check; got {factor!r})")
  if f.timestep_order not in ("shuffle", "sampler"):
    problems.append(f"finetune.timestep_order must be 'shuffle' or 'sampler' (got {f.timestep_order!r})")
  if problems:
    raise ValueError("Invalid fine-tuning config: " + "; ".join(problems) + ".")


# ----------------------------------------------------------------------------------------------- the schedule
def visit_plan(config, num_sampler_steps: int) -> tuple[int, Any]:
  """(n, order_fn): n visited steps trained per trajectory; order_fn(j) -> indices into the trajectory."""
  f = config.finetune
  n = int(f.steps_per_trajectory) or num_sampler_steps
  n = min(n, num_sampler_steps)

  def order(j: int) -> np.ndarray:
    if f.timestep_order == "shuffle":
      rng = pipeline.purpose_rng(int(config.seed), pipeline.NoisePurpose.FINETUNE_VISIT_ORDER, j)
      return rng.permutation(num_sampler_steps)[:n]
    return np.round(np.linspace(0, num_sampler_steps - 1, n)).astype(np.int32)
  return n, order


# ----------------------------------------------------------------------------------------------- the train step
def make_loss_fn(bundle: pipeline.ModelBundle, quant_metadata: dict, talora_config: lora.TALoRAConfig, *,
                 weighting: str, normalizer: float | None, balance_weight: float, all_timesteps: np.ndarray):
  """loss(params, variables, x_t, t, gamma, labels) -> (loss, aux)."""
  apply = pipeline.eps_fn_with_labels(bundle)
  all_timesteps = np.asarray(all_timesteps, np.int32)

  def loss_fn(params, variables, x_t, t, gamma, labels):
    qstate = quant.QuantState.from_dict({"metadata": quant_metadata, "arrays": params["quant"]})
    t_batch = jnp.full((x_t.shape[0],), t, jnp.int32)
    teacher = pipeline.guided(lambda x, tt, y: apply(variables, x, tt, y), bundle)
    eps_teacher = jax.lax.stop_gradient(teacher(x_t, t_batch, labels))
    # One bank for the whole call: every sample of this batch is at sampler step t.
    kernel_update = lora.make_kernel_update(params, talora_config, t_batch)

    def student_apply(x, tt, y):
      if bundle.conditional:
        return quant.quantized_apply(bundle.model, variables, qstate, x, tt, y, kernel_update=kernel_update)
      return quant.quantized_apply(bundle.model, variables, qstate, x, tt, kernel_update=kernel_update)
    eps_student = pipeline.guided(student_apply, bundle)(x_t, t_batch, labels)
    dfa = diffusion.dfa_loss(eps_student, eps_teacher, gamma, weighting=weighting, gamma_normalizer=normalizer)
    loss = dfa
    aux = {"dfa_loss": dfa}
    if balance_weight > 0:
      logits = lora.TimestepRouter(talora_config.router).apply({"params": params["router"]}, all_timesteps)
      balance = lora.balance_loss(logits)
      loss = loss + balance_weight * balance
      aux["balance_loss"] = balance
    aux["bank"] = jnp.argmax(lora.route_batch(params["router"], talora_config, t_batch[:1]))
    return loss, aux
  return loss_fn


def make_train_step(loss_fn, tx, mesh):
  """The jitted step: batch (x_t inside the trajectory, labels) sharded over "data", the rest replicated."""

  def step(state: state_lib.TrainState, variables, xs, ts, gammas, index, labels):
    x_t = xs[index]
    t, gamma = ts[index], gammas[index]
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, variables, x_t, t, gamma, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": loss, "t": t, **aux}

  repl = parallel.replicated_sharding(mesh)
  return jax.jit(step,
                 in_shardings=(repl, repl, parallel.batch_sharding(mesh, 1), repl, repl, repl,
                               parallel.batch_sharding(mesh, 0)),
                 out_shardings=(repl, repl), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------- the router
def write_router_allocation(workdir: pathlib.Path, router_params, talora_config: lora.TALoRAConfig, step: int,
                            writer=None) -> np.ndarray:
  """Bank per timestep in [0, T): JSON + PNG in workdir, bank shares to the metric writer."""
  alloc = lora.allocation(router_params, talora_config.router)
  k = talora_config.num_banks
  shares = np.bincount(alloc, minlength=k) / alloc.size
  if writer is not None:
    # To TensorBoard only: metrics.jsonl keeps exactly one record (with its loss) per logged step.
    tb_writer = getattr(writer, "progress_writer", writer)
    tb_writer.write_scalars(step, {f"router/bank_{i}_share": float(s) for i, s in enumerate(shares)})
  if jax.process_index() == 0:
    checkpoint.save_json(workdir / ROUTER_JSON, {"step": int(step), "num_banks": k,
                                                 "bank_per_timestep": alloc.tolist()})
    plotting.plot_router_allocation(alloc, k, workdir / ROUTER_PLOT, title=f"TALoRA router allocation at step {step}")
  return alloc


# ----------------------------------------------------------------------------------------------- the loop
def finetune(config, workdir) -> FinetuneResult:
  """Runs (or resumes) fine-tuning in `workdir`; calibrates first if workdir has no calibration yet."""
  _check_finetune_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  f = config.finetune
  talora_config = pipeline.talora_config_from(config)
  bundle = pipeline.load_model(config)
  schedule = pipeline.schedule_from(config)
  sampler_config = pipeline.sampler_from(config)
  mesh = parallel.mesh_from_config(int(config.mesh.data))
  global_batch = int(f.batch_size)
  parallel.check_global_batch(global_batch, mesh)

  qstate = calibration.load_or_calibrate(config, workdir, bundle=bundle)
  quant_dict = qstate.to_dict()
  example = bundle.model.example_inputs(1)
  layers = quant.discover_layers(bundle.model, bundle.variables, *example, config=pipeline.quant_config_from(config))

  seed = int(config.seed)
  root = jax.random.key(seed)
  talora_params = lora.init_talora(jax.random.fold_in(root, 7), layers, talora_config)
  params = {"banks": talora_params["banks"], "router": talora_params["router"],
            "quant": jax.tree.map(jnp.asarray, quant_dict["arrays"])}
  opt_config = optimizer_lib.OptimizerConfig(
      learning_rates=dict(f.lr), num_steps=int(f.num_steps), warmup_steps=int(f.warmup_steps),
      end_factor=float(f.end_factor), weight_decay=float(f.weight_decay), grad_clip_norm=float(f.grad_clip_norm))
  tx = optimizer_lib.make_optimizer(opt_config)
  train_state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                     rng=jax.random.key_data(root))

  config_json = config_record.json_config(config)
  manager = checkpoint.CheckpointManager(workdir / CHECKPOINT_DIR, max_to_keep=int(f.max_checkpoints))

  def check_saved_config(saved_config, step):
    # Compared before the arrays are read: a different config usually also means differently shaped arrays,
    # and the field names say more than a shape mismatch.
    diffs = config_record.differences(saved_config or {}, config_json, config_record.FINETUNE_CHECKPOINT)
    if diffs:
      raise ConfigMismatchError(
          f"{workdir} holds a fine-tuning run of a different config (checkpoint step {step}); differing fields: "
          f"{config_record.describe(diffs, config_record.CHECKPOINT_VS_NOW)}. Use a new --workdir or the "
          "checkpoint's config.")

  # The newest checkpoint that reads: an unreadable one (a truncated file) is named, set aside and redone.
  restored = manager.restore_newest(target=state_lib.checkpoint_target(train_state),
                                    check_config=check_saved_config)
  latest = restored.step
  if latest is not None:
    train_state = state_lib.from_checkpoint(restored.state, train_state)
    logging.info("Resumed fine-tuning from step %d", latest)
  start = int(train_state.step)
  num_steps = int(f.num_steps)

  train_state = parallel.replicate(train_state, mesh)
  variables = parallel.replicate(bundle.variables, mesh)

  gammas_all = diffusion.noise_coefficients(schedule, sampler_config)
  normalizer = diffusion.gamma_normalizer(gammas_all, f.dfa_weighting) if f.dfa_weighting != "none" else None
  loss_fn = make_loss_fn(bundle, quant_dict["metadata"], talora_config, weighting=f.dfa_weighting,
                         normalizer=normalizer, balance_weight=float(f.balance_weight),
                         all_timesteps=diffusion.sampling_timesteps(schedule, sampler_config))
  train_step = make_train_step(loss_fn, tx, mesh)
  teacher = pipeline.TeacherSampler(bundle, schedule, sampler_config, mesh=mesh)
  n_per_traj, order = visit_plan(config, sampler_config.num_steps)

  # A killed run may have logged steps past the checkpoint it resumes from: they are logged again.
  writer = metrics.create_writer(workdir, just_logging=jax.process_index() > 0, resume_step=start)
  report = metrics.progress(num_steps, writer, name="finetune")
  guard = guards.DivergenceGuard(float(f.get("divergence_factor", guards.DEFAULT_DIVERGENCE_FACTOR)),
                                 what="Fine-tuning", hint=DIVERGENCE_HINT)
  if jax.process_count() == 1:  # (only process 0 has the file; every process must decide alike)
    guard.seed(metrics.read_losses(workdir)[-guards.DEFAULT_WINDOW:])
  cached_traj: tuple[int, Any] | None = None
  last_saved = latest
  last_loss = None
  label_sharding_dummy = np.zeros((global_batch,), np.int32)

  def last_good() -> str:
    return (f"step {last_saved} in {manager.directory}" if last_saved is not None
            else "no checkpoint was written yet")

  def save(step_done: int, st, probe_inputs=None) -> None:
    """Checkpoints `st` (the state after `step_done`); with `probe_inputs` (the step's batch), first checks its
    loss on that batch: the loss of step s was computed before step s's update, which may have diverged."""
    nonlocal last_saved
    host = parallel.to_host(st)
    if probe_inputs is not None:
      _, probe = train_step(parallel.replicate(host, mesh), variables, *probe_inputs)
      guard.check(step_done, float(probe["loss"]), last_good=last_good(), accept=False,
                  note="(the state after this step, on its batch, checked before it is saved)")
    interrupts.activity = f"the save of step {step_done}"
    manager.save(step_done, state_lib.to_checkpoint(host), config=config_json)
    manager.wait_until_finished()
    last_saved = step_done
    interrupts.activity = "the current step"
    interrupts.resume_hint = f"The newest checkpoint is step {last_saved}"
    write_router_allocation(workdir, host.params["router"], talora_config, step_done, writer)

  # SIGINT / SIGTERM: the loop stops at the next step boundary, after saving (one process only: see guards).
  with guards.interruptible("finetune", enabled=jax.process_count() == 1) as interrupts:
    if last_saved is not None:
      interrupts.resume_hint = f"The newest checkpoint is step {last_saved}"
    for s in range(start, num_steps):
      j, pos = divmod(s, n_per_traj)
      if cached_traj is None or cached_traj[0] != j:
        x_T, labels = pipeline.noise_batch(seed, pipeline.NoisePurpose.FINETUNE, j, global_batch, bundle.sample_shape,
                                           bundle.num_classes)
        labels = label_sharding_dummy if labels is None else labels
        x_T_global = parallel.host_local_to_global(x_T, mesh)
        labels_global = parallel.host_local_to_global(labels, mesh)
        traj = teacher(x_T_global, labels_global, jax.random.fold_in(jax.random.key(seed), j))
        cached_traj = (j, (traj, labels_global, order(j)))
      traj, labels_global, visit = cached_traj[1]
      inputs = (traj.xs, traj.ts, traj.gammas, jnp.asarray(visit[pos], jnp.int32), labels_global)
      train_state, step_metrics = train_step(train_state, variables, *inputs)
      step_done = s + 1
      loss = float(step_metrics["loss"])
      guard.check(step_done, loss, last_good=last_good())  # NaN / Inf, or far above the running median
      last_loss = loss
      if step_done % int(f.log_every) == 0 or step_done == num_steps:
        scalars = {k: float(v) for k, v in step_metrics.items()}
        writer.write_scalars(step_done, scalars)
      report.report(step_done)
      if (step_done % int(f.checkpoint_every) == 0 or step_done == num_steps
          or (interrupts.requested and last_saved != step_done)):
        save(step_done, train_state, inputs)
      if interrupts.requested:
        writer.flush()
        manager.close()
        interrupts.stop(step_done)

    host_state = parallel.to_host(train_state)
    final_step = int(host_state.step)
    if last_saved != final_step:
      save(final_step, train_state)
    writer.flush()
    manager.close()
    if interrupts.requested:  # a signal during the last save: finished, but the next stages must not run
      interrupts.stop(final_step)
  trained_q = quant.QuantState.from_dict({"metadata": quant_dict["metadata"], "arrays": host_state.params["quant"]})
  return FinetuneResult(step=final_step, params=host_state.params, qstate=trained_q, talora_config=talora_config,
                        last_loss=last_loss)


def load_finetuned(config, workdir) -> FinetuneResult:
  """The latest fine-tuned parameters of `workdir` (for the sample / eval / export stages)."""
  workdir = pathlib.Path(workdir)
  manager = checkpoint.CheckpointManager(workdir / CHECKPOINT_DIR)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No fine-tuning checkpoint in {workdir / CHECKPOINT_DIR}; run --mode=finetune first.")
  try:
    tree, _ = manager.restore(step)
  except checkpoint.CheckpointUnreadableError as e:
    reason = checkpoint._first_line(e.__cause__ or e)  # pylint: disable=protected-access
    raise checkpoint.CheckpointError(
        f"The fine-tuning checkpoint step {step} in {manager.directory} could not be read "
        f"({reason}). Rerun the fine-tuning stage (--mode=finetune, or "
        "the same --mode=all command): it resumes from the newest checkpoint that restores and recomputes the "
        "rest.") from e
  finally:
    manager.close()
  qstate = calibration.load_calibration(workdir)
  meta = qstate.to_dict()["metadata"]
  params = tree["params"]
  trained_q = quant.QuantState.from_dict({"metadata": meta, "arrays": params["quant"]})
  return FinetuneResult(step=int(tree["step"]), params=params, qstate=trained_q,
                        talora_config=pipeline.talora_config_from(config), last_loss=None)
