"""Where do fine-tuning runs on 1 and on N devices part? FP parts, 4-bit rounding flips, student, loss.

    python -m msfp_jax.diagnostics.device_agreement --config=configs/default.py --devices 1,8 --out DIR

Runs one subprocess per device count, one after the other (XLA_FLAGS=--xla_force_host_platform_device_count=N
has to be set before jax is imported). All of them use ONE calibration, made once on 1 device in DIR/calibrated.
Each runs the real train step (finetune.make_loss_fn + make_train_step, initial parameters) on the batch of
optimizer step --probe_step (default 1), with an interceptor around the loss function that records the student's
activation codes, and saves DIR/devices_N.npz. The parent compares every device count with the first, in float64:

  FP parts     the teacher's DDIM trajectory (xs, ts, gammas) and visited index, the FP teacher's eps, the
               quantized kernels (weight codes);
  act codes    per quantized layer (in call order), the student's fake-quantized input activations, one grid
               value per element (equal values are equal codes): "flipped" counts the elements whose code differs;
               every layer before the first flipped one has identical codes, so its input differs only by float
               noise, and a flip there needs that input within the noise of a rounding boundary ("margin");
  forced       the N-device step again on the reference's trajectory, with every student activation replaced by
               the reference run's quantized value: what is left is FP reassociation. "own flips" counts the codes
               that the forced run's own inputs round differently (decisions flipped by float noise alone);
  loss         the probe step's loss, the parameters after its update, and (--loss_steps K > 0) the losses that
               the real fine-tuning loop logs for its first K steps (run in DIR/run_N from the calibration).

The verdict is "only rounding flips" when the FP parts and the forced student agree to FP_RTOL (relative to the
values' scale) and the first flip sits within that of a rounding boundary; a real difference (other data rows, a
mean over a local shard, another visited step) breaks one of those, and `check` says which. The recording itself
changes how XLA fuses the step, hence which codes flip: compare the probe loss with the loop's (--loss_steps).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msfp_jax import cli

# The workers run in the checkout with it on PYTHONPATH, so they import this msfp_jax whatever the caller's cwd.
_REPO = cli.REPO

CALIBRATED = "calibrated"
FORCED = "device_agreement_forced"  # the collection of `variables` that carries the forced activations
# Tolerance of `check`, relative to each array's scale (max |diff| / max(max |ref|, 1)): float32 reassociation
# measures 1e-7..5e-7 on the built-in model (8 devices); a swapped row or a mean over half the batch is >= 1e-3.
FP_RTOL = 1e-5
_START = time.time()


def _log(msg: str) -> None:
  print(f"[device_agreement {time.time() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def npz_path(out, n: int) -> pathlib.Path:
  return pathlib.Path(out) / f"devices_{n}.npz"


# ------------------------------------------------------------------------------------------------ worker side
def _recorder(qstate, sink: dict, forced, top_type, record_inputs: bool):
  """Interceptor entered around make_loss_fn's loss (outside quantized_apply's, so it sees each layer's float
  input first). make_loss_fn calls the FP teacher, then the quantized student: the first call of a quantized
  layer is the teacher's, the second the student's, whose quantized inputs fake_quant(x) are recorded (and x
  itself with `record_inputs`) and, with `forced`, replaced by the forced grid values (the quantization
  interceptor rounds a grid value to itself). The model's outputs are recorded in call order (teacher eps,
  student eps). The order is verified: only the student's Conv / Dense calls go through the quantization
  interceptor's parameter-free clone.

  Recording x as well changes how XLA fuses (and so rounds) the step, enough to change which codes flip (on the
  built-in model it removed the one flip of the real step), so the free probe records only the codes, values the
  quantization interceptor computes anyway; its loss equals the real loop's (compare with --loss_steps)."""
  # jax (and what imports it) is imported only in the workers, after the parent set their XLA_FLAGS (device count).
  import flax.linen as nn

  from msfp_jax import quant
  from msfp_jax.quant import interceptor as qi
  calls: dict[str, int] = {}
  current: list = [None]  # (path, call number) of the quantized layer whose call is running
  cloned: set = set()

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or module.is_initializing():
      return next_fun(*args, **kwargs)
    if type(module) is top_type:
      out = next_fun(*args, **kwargs)
      sink.setdefault("model_out", []).append(out)
      return out
    path = qi.module_path(module)
    if not path:  # the quantization interceptor's parameter-free clone
      if current[0] is not None:
        cloned.add(current[0])
      return next_fun(*args, **kwargs)
    layer = qstate.layers.get(path)
    if layer is None:
      return next_fun(*args, **kwargs)
    number = calls[path] = calls.get(path, 0) + 1
    if number > 2:
      raise RuntimeError(f"layer {path!r} called {number} times in one loss; expected teacher + student")
    args = list(args)
    if number == 2:
      quantizers = [functools.partial(qi.quantize_layer_input, layer)]  # both parts of a split input
      if layer.is_matmul:
        quantizers.append(lambda x: quant.fake_quant(x, layer.rhs_act_format, layer.rhs_act_maxval, 0.0
                                                     if layer.rhs_act_zero_point is None else
                                                     layer.rhs_act_zero_point))
      for i, quantize in enumerate(quantizers):
        key = f"{path}:{i}"
        sink.setdefault("order", []).append(key)
        if record_inputs:
          sink[f"act_x/{key}"] = args[i]
        sink[f"act_q/{key}"] = quantize(args[i])
        if forced is not None:
          args[i] = forced[key].astype(args[i].dtype)
    current[0] = (path, number)
    try:
      return next_fun(*args, **kwargs)
    finally:
      current[0] = None
      if not layer.is_matmul and ((path, number) in cloned) != (number == 2):
        raise RuntimeError(f"call {number} of {path!r} was {'' if number == 1 else 'not '}quantized: make_loss_fn "
                           "no longer calls the teacher first and the student second; update the diagnostic")

  return nn.intercept_methods(intercept)


def _worker_calibrate(config, out: pathlib.Path) -> None:
  # In the worker only, after its XLA_FLAGS are set (see _recorder).
  import jax

  from msfp_jax.train import calibration, pipeline
  assert jax.device_count() == 1, jax.devices()  # one calibration, whatever the device counts compared
  calibration.load_or_calibrate(config, out / CALIBRATED, bundle=pipeline.load_model(config))


def _worker_run(config, out: pathlib.Path, n: int, reference: pathlib.Path | None, probe_step: int,
                loss_steps: int) -> None:
  # In the worker only, after its XLA_FLAGS are set (see _recorder).
  import jax
  import jax.numpy as jnp

  from msfp_jax import diffusion, lora, parallel, quant
  from msfp_jax.train import calibration, finetune, pipeline
  from msfp_jax.train import optimizer as optimizer_lib
  from msfp_jax.train import state as state_lib

  if jax.device_count() != n:
    raise RuntimeError(f"expected {n} devices, got {jax.devices()}")
  f = config.finetune
  bundle = pipeline.load_model(config)
  if reference is None and n == 1:
    calibration.load_or_calibrate(config, out / CALIBRATED, bundle=bundle)
  schedule = pipeline.schedule_from(config)
  sampler_config = pipeline.sampler_from(config)
  mesh = parallel.mesh_from_config(int(config.mesh.data))
  global_batch = int(f.batch_size)
  parallel.check_global_batch(global_batch, mesh)
  talora_config = pipeline.talora_config_from(config)
  qstate = calibration.load_calibration(out / CALIBRATED)
  quant_dict = qstate.to_dict()
  meta = quant_dict["metadata"]
  layers = quant.discover_layers(bundle.model, bundle.variables, *bundle.model.example_inputs(1),
                                 config=pipeline.quant_config_from(config))

  # The initial state and the train step, as msfp_jax.train.finetune.finetune builds them.
  seed = int(config.seed)
  root = jax.random.key(seed)
  talora = lora.init_talora(jax.random.fold_in(root, 7), layers, talora_config)
  params = {"banks": talora["banks"], "router": talora["router"],
            "quant": jax.tree.map(jnp.asarray, quant_dict["arrays"])}
  tx = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(
      learning_rates=dict(f.lr), num_steps=int(f.num_steps), warmup_steps=int(f.warmup_steps),
      end_factor=float(f.end_factor), weight_decay=float(f.weight_decay), grad_clip_norm=float(f.grad_clip_norm)))
  state = jax.tree.map(np.asarray, state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                                        opt_state=tx.init(params), rng=jax.random.key_data(root)))
  gammas_all = diffusion.noise_coefficients(schedule, sampler_config)
  normalizer = diffusion.gamma_normalizer(gammas_all, f.dfa_weighting) if f.dfa_weighting != "none" else None
  loss_fn = finetune.make_loss_fn(bundle, meta, talora_config, weighting=f.dfa_weighting, normalizer=normalizer,
                                  balance_weight=float(f.balance_weight),
                                  all_timesteps=diffusion.sampling_timesteps(schedule, sampler_config))

  def recorded_loss_fn(params, variables, x_t, t, gamma, labels):
    variables = dict(variables)
    forced = variables.pop(FORCED, None)
    q = quant.QuantState.from_dict({"metadata": meta, "arrays": params["quant"]})
    record: dict = {}
    with _recorder(q, record, forced, type(bundle.model), record_inputs=forced is not None):
      loss, aux = loss_fn(params, variables, x_t, t, gamma, labels)
    order = record.pop("order")
    return loss, {**aux, "record": record}, order

  orders = []

  def loss_for_step(*args):
    loss, aux, order = recorded_loss_fn(*args)
    orders.append(order)  # Python-side, at trace time
    return loss, aux
  train_step = finetune.make_train_step(loss_for_step, tx, mesh)

  # The probe step's batch, as the loop draws it: trajectory j, visited index order(j)[pos].
  n_per_traj, order_fn = finetune.visit_plan(config, sampler_config.num_steps)
  j, pos = divmod(probe_step - 1, n_per_traj)
  index = int(order_fn(j)[pos])
  x_T, labels = pipeline.noise_batch(seed, pipeline.NoisePurpose.FINETUNE, j, global_batch, bundle.sample_shape,
                                     bundle.num_classes)
  labels = parallel.host_local_to_global(np.zeros((global_batch,), np.int32) if labels is None else labels, mesh)
  teacher = pipeline.TeacherSampler(bundle, schedule, sampler_config, mesh=mesh)
  traj = teacher(parallel.host_local_to_global(x_T, mesh), labels, jax.random.fold_in(root, j))
  _log(f"{n} devices: teacher trajectory {j} done")

  def probe(xs, forced=None):
    variables = dict(bundle.variables)
    if forced is not None:
      variables[FORCED] = forced
    new_state, metrics = train_step(parallel.replicate(state, mesh), parallel.replicate(variables, mesh), xs,
                                    traj.ts, traj.gammas, jnp.asarray(index, jnp.int32), labels)
    return parallel.to_host(new_state.params), parallel.to_host(metrics)

  updated, metrics = probe(traj.xs)
  _log(f"{n} devices: train step done (loss {float(metrics['loss']):.6f})")
  record = metrics["record"]
  result = {"xs": traj.xs, "ts": traj.ts, "gammas": traj.gammas, "index": index, "loss": metrics["loss"],
            "eps_teacher": record["model_out"][0], "eps_student": record["model_out"][-1],
            "act_order": np.asarray(orders[-1])}
  result.update({k: v for k, v in record.items() if k.startswith("act_q/")})
  for k, v in jax.tree_util.tree_flatten_with_path(updated)[0]:
    result["updated/" + jax.tree_util.keystr(k)] = v

  # The weight codes: every quantized kernel as the interceptor computes it (W + B A at the initial banks).
  def quantized_kernels(params, variables):
    t_batch = jnp.full((1,), traj.ts[index], jnp.int32)
    update = lora.make_kernel_update(params, talora_config, t_batch)
    q = quant.QuantState.from_dict({"metadata": meta, "arrays": params["quant"]})
    return {path: quant.quantize_kernel(path, quant.params_at(variables["params"], path)["kernel"],
                                        layer, update)
            for path, layer in q.layers.items() if not layer.is_matmul}
  repl = parallel.replicated_sharding(mesh)
  kernels = jax.jit(quantized_kernels, in_shardings=(repl, repl))(parallel.replicate(params, mesh),
                                                                  parallel.replicate(bundle.variables, mesh))
  result.update({f"weight_q/{path}": w for path, w in parallel.to_host(kernels).items()})
  if reference is not None:
    ref = np.load(reference)
    forced = {key: ref[f"act_q/{key}"] for key in orders[-1]}
    _, forced_metrics = probe(parallel.host_local_to_global(ref["xs"], mesh, batch_axis=1), forced)
    _log(f"{n} devices: forced train step done")
    rec = forced_metrics["record"]
    result["forced/loss"], result["forced/eps_student"] = forced_metrics["loss"], rec["model_out"][-1]
    result.update({f"forced/{k}": v for k, v in rec.items() if k.startswith(("act_x/", "act_q/"))})
  if loss_steps > 0:
    run_dir = out / f"run_{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(out / CALIBRATED, run_dir)
    loop_config = config.copy_and_resolve_references()
    loop_config.finetune.num_steps = loss_steps
    loop_config.finetune.checkpoint_every = loss_steps
    loop_config.finetune.log_every = 1
    finetune.finetune(loop_config, run_dir)
    result["loop_losses"] = [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]
    _log(f"{n} devices: {loss_steps} fine-tuning steps done")
  np.savez(npz_path(out, n), **{k: np.asarray(v) for k, v in result.items()})


# ------------------------------------------------------------------------------------------------ comparison
def _maxdiff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def _scale(a) -> float:
  a = np.asarray(a, np.float64)
  return max(float(np.max(np.abs(a))) if a.size else 0.0, 1.0)


def _reldiff(a, b) -> float:
  """max |a - b| / max(max |a|, 1)."""
  return _maxdiff(a, b) / _scale(a)


def compare(ref, other) -> dict:
  """float64 comparison of two devices_N.npz contents (mappings of arrays); see the module docstring."""
  layers = {}
  first = None
  for key in [str(k) for k in np.asarray(ref["act_order"])]:
    q_ref, q = np.asarray(ref[f"act_q/{key}"], np.float64), np.asarray(other[f"act_q/{key}"], np.float64)
    flips = q_ref != q
    row = {"size": int(q_ref.size), "flipped": int(flips.sum()),
           "flipped_samples": np.flatnonzero(flips.reshape(flips.shape[0], -1).any(1)).tolist()}
    if f"forced/act_q/{key}" in other:
      x_own = np.asarray(other[f"forced/act_x/{key}"], np.float64)
      row["own_flipped"] = int(np.sum(np.asarray(other[f"forced/act_q/{key}"]) != q_ref))
      if first is None and flips.any():
        # Upstream codes are equal, so the forced run's input here is this layer's input up to float noise; a
        # flip between neighbouring codes needs it within that noise of their rounding boundary (the midpoint).
        margin = np.abs(x_own[flips] - (q_ref[flips] + q[flips]) / 2)
        first = {"layer": key, "flipped": int(flips.sum()), "margin": float(margin.max()),
                 "margin_rel": float(margin.max()) / _scale(x_own)}
    elif first is None and flips.any():
      first = {"layer": key, "flipped": int(flips.sum())}
    layers[key] = row
  weight_keys = sorted(k for k in ref if k.startswith("weight_q/"))
  updated_keys = sorted(k for k in ref if k.startswith("updated/"))
  report = {
      "xs_maxdiff": _maxdiff(ref["xs"], other["xs"]), "xs_reldiff": _reldiff(ref["xs"], other["xs"]),
      "ts_equal": bool(np.array_equal(ref["ts"], other["ts"])),
      "gammas_equal": bool(np.array_equal(ref["gammas"], other["gammas"])),
      "index_equal": int(ref["index"]) == int(other["index"]), "index": int(other["index"]),
      "eps_teacher_maxdiff": _maxdiff(ref["eps_teacher"], other["eps_teacher"]),
      "eps_teacher_reldiff": _reldiff(ref["eps_teacher"], other["eps_teacher"]),
      "eps_student_maxdiff": _maxdiff(ref["eps_student"], other["eps_student"]),
      "eps_student_reldiff": _reldiff(ref["eps_student"], other["eps_student"]),
      "weight_codes_flipped": int(sum(np.sum(np.asarray(ref[k]) != np.asarray(other[k])) for k in weight_keys)),
      "weight_codes_total": int(sum(np.asarray(ref[k]).size for k in weight_keys)),
      "layers": layers, "first_flip": first,
      "flipped": sum(r["flipped"] for r in layers.values()), "total": sum(r["size"] for r in layers.values()),
      "flipped_samples": sorted(set(s for r in layers.values() for s in r["flipped_samples"])),
      "loss": (float(ref["loss"]), float(other["loss"])),
      "updated_maxdiff": max((_maxdiff(ref[k], other[k]) for k in updated_keys), default=0.0),
  }
  if "forced/eps_student" in other:
    report.update(
        forced_eps_student_maxdiff=_maxdiff(ref["eps_student"], other["forced/eps_student"]),
        forced_eps_student_reldiff=_reldiff(ref["eps_student"], other["forced/eps_student"]),
        forced_loss=float(other["forced/loss"]), own_flipped=sum(r["own_flipped"] for r in layers.values()))
  if "loop_losses" in ref and "loop_losses" in other:
    report["loop_losses"] = (np.asarray(ref["loop_losses"]).tolist(), np.asarray(other["loop_losses"]).tolist())
  return report


def check(report: dict, rtol: float = FP_RTOL) -> list[str]:
  """What breaks "the runs part only through 4-bit rounding decisions that float noise flipped" ([]: it holds)."""
  problems = [f"{name} is False: the runs visit different steps"
              for name in ("ts_equal", "gammas_equal", "index_equal") if not report[name]]
  for name in ("xs_reldiff", "eps_teacher_reldiff", "forced_eps_student_reldiff"):
    if name not in report:
      problems.append(f"{name} missing (no forced run)")
    elif not report[name] <= rtol:
      problems.append(f"{name} = {report[name]:.3g} > {rtol:g}: an FP part differs beyond reassociation")
  if report["weight_codes_flipped"]:
    problems.append(f"{report['weight_codes_flipped']} weight codes differ (the kernels are replicated)")
  first = report["first_flip"]
  if first is None:
    a, b = report["loss"]
    if not (report["eps_student_reldiff"] <= rtol and abs(a - b) <= rtol * abs(a)):
      problems.append(f"no activation code flipped, yet the student eps differ by {report['eps_student_maxdiff']:.3g}"
                      f" and the losses are {a:.6g} vs {b:.6g}")
  elif "margin_rel" not in first:
    problems.append("the first flip cannot be explained without the forced run")
  elif not first["margin_rel"] <= rtol:
    problems.append(f"the first flip ({first['layer']}) has its input {first['margin']:.3g} (relative "
                    f"{first['margin_rel']:.3g} > {rtol:g}) away from the rounding boundary: more than float noise")
  return problems


def format_report(n_ref: int, n: int, r: dict) -> str:
  first = r["first_flip"]
  lines = [f"=== {n_ref} vs {n} devices (probe: visited index {r['index']}; float64 max |diff|, rel = relative to "
           "max(max|ref|, 1)) ===",
           f"FP parts   trajectory xs {r['xs_maxdiff']:.2e} (rel {r['xs_reldiff']:.1e})   ts equal {r['ts_equal']}"
           f"   gammas equal {r['gammas_equal']}   visited index equal {r['index_equal']}",
           f"           teacher eps {r['eps_teacher_maxdiff']:.2e} (rel {r['eps_teacher_reldiff']:.1e})   "
           f"weight codes flipped {r['weight_codes_flipped']} of {r['weight_codes_total']}",
           f"{'layer:operand (call order)':<36} {'flipped':>8} {'of':>7} {'samples':>8} {'own flips':>9}"]
  for key, row in r["layers"].items():
    samples = ",".join(map(str, row["flipped_samples"][:4])) + ("+" if len(row["flipped_samples"]) > 4 else "")
    lines.append(f"{key:<36} {row['flipped']:>8d} {row['size']:>7d} {samples or '-':>8} "
                 f"{row.get('own_flipped', -1):>9d}")
  share = 100 * r["flipped"] / max(r["total"], 1)
  lines.append(f"activation codes flipped: {r['flipped']} of {r['total']} ({share:.3f} %), in samples "
               f"{r['flipped_samples']}")
  if first is not None:
    lines.append(f"first flip: {first['layer']}, {first['flipped']} code(s) (every layer before it has identical "
                 "codes)" + (f"; its input is {first['margin']:.1e} (rel {first['margin_rel']:.1e}) from the rounding "
                             "boundary" if "margin" in first else ""))
  if "own_flipped" in r:
    lines.append(f"forced codes (reference trajectory and codes in the {n}-device step): own flips {r['own_flipped']} "
                 f"of {r['total']}, student eps {r['forced_eps_student_maxdiff']:.2e} (rel "
                 f"{r['forced_eps_student_reldiff']:.1e}), loss {r['forced_loss']:.6f}")
  lines.append(f"student eps (free)  {r['eps_student_maxdiff']:.2e} (rel {r['eps_student_reldiff']:.1e})")
  a, b = r["loss"]
  lines.append(f"probe-step loss  {a:.6f} vs {b:.6f} ({100 * abs(b - a) / abs(a):.2f} %); the parameters after its "
               f"update differ by {r['updated_maxdiff']:.2e}")
  if "loop_losses" in r:
    la, lb = r["loop_losses"]
    lines.append("fine-tuning loop losses (step: reference vs this):")
    lines.extend(f"  {s + 1:>3}: {x:.6f} vs {y:.6f} ({100 * abs(y - x) / abs(x):.2f} %)"
                 for s, (x, y) in enumerate(zip(la, lb)))
  problems = check(r)
  lines.append("verdict: " + ("only 4-bit rounding decisions flipped by float reassociation, and what they propagate "
                              "to (FP parts and the forced student agree)" if not problems
                              else "REAL DIFFERENCE: " + "; ".join(problems)))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ parent side
def _spawn(argv: list[str], role: str, n: int, extra: list[str]) -> None:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
  cmd = [sys.executable, "-m", "msfp_jax.diagnostics.device_agreement", *argv, f"--worker={role}",
         f"--worker_devices={n}", *extra]
  subprocess.run(cmd, check=True, env=env, cwd=str(_REPO))


def run_all(argv: list[str], devices: list[int], out: pathlib.Path) -> list[dict]:
  """Calibrates once on 1 device (unless OUT/calibrated holds a calibration), runs one worker per device count,
  one after the other; returns the comparison of each with the first.

  argv: this module's flags for the workers (--config=..., config overrides, --probe_step, --loss_steps).
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  argv = [*argv, f"--out={out}"]
  if devices[0] != 1:  # else the reference worker calibrates (one process fewer)
    _spawn(argv, "calibrate", 1, [])
  ref = npz_path(out, devices[0])
  for i, n in enumerate(devices):
    _spawn(argv, "run", n, [f"--reference={ref}"] if i else [])
  reference = dict(np.load(ref))
  return [compare(reference, dict(np.load(npz_path(out, n)))) for n in devices[1:]]


def _define_flags() -> None:
  """Defined only when this module is the program: importing it (the tests do) must not claim --config, which
  msfp_jax.main also defines in the same process."""
  config_flags.DEFINE_config_file("config", str(cli.CONFIGS / "default.py"),
                                  "Experiment config, FILE.py[:ARG] (default: the built-in model).")
  flags.DEFINE_list("devices", ["1", "8"], "Device counts to compare; the first is the reference.")
  flags.DEFINE_string("out", None, "Output directory (npz files, the calibrated workdir, the loop's runs).")
  flags.DEFINE_integer("probe_step", 1, "The optimizer step (1-based) whose batch is probed.")
  flags.DEFINE_integer("loss_steps", 1, "Also run the real fine-tuning loop for this many steps per device count "
                       "and compare its logged losses (0: skip).")
  flags.DEFINE_enum("worker", "", ["", "calibrate", "run"], "Internal: the subprocess's role.")
  flags.DEFINE_integer("worker_devices", 1, "Internal: the subprocess's device count.")
  flags.DEFINE_string("reference", None, "Internal: the reference npz (for the forced run).")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  out = pathlib.Path(FLAGS.out).resolve()
  if FLAGS.worker:
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache:
      import jax  # in the worker only, after its XLA_FLAGS are set
      jax.config.update("jax_compilation_cache_dir", cache)
    if FLAGS.worker == "calibrate":
      _worker_calibrate(FLAGS.config, out)
    else:
      _worker_run(FLAGS.config, out, FLAGS.worker_devices,
                  pathlib.Path(FLAGS.reference) if FLAGS.reference else None, FLAGS.probe_step, FLAGS.loss_steps)
    return
  devices = [int(d) for d in FLAGS.devices]
  reports = run_all(sys.argv[1:], devices, out)
  for n, report in zip(devices[1:], reports):
    print(format_report(devices[0], n, report))
  (out / "report.json").write_text(json.dumps({str(n): r for n, r in zip(devices[1:], reports)}, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)  # --config=configs/NAME.py found in the package, as for main
