"""Data-free calibration stage: the FP model's own DDIM trajectories from noise feed the quantizer search.

Writes workdir/calibration (msfp_jax.quant.save_quant_state) and workdir/calibration_summary.json. The noise
is a pure function of (config.calibration.seed, batch index), so the stage is reproducible.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from msfp_jax import checkpoint, config_record, parallel, quant
from msfp_jax.train import pipeline

CALIBRATION_DIR = "calibration"
SUMMARY_FILE = "calibration_summary.json"
REPORT_DIR = "quant_report"


def has_calibration(workdir) -> bool:
  return (pathlib.Path(workdir) / SUMMARY_FILE).is_file()


def load_calibration(workdir):
  workdir = pathlib.Path(workdir)
  if not has_calibration(workdir):
    raise FileNotFoundError(f"No calibration in {workdir}; run --mode=calibrate first.")
  return quant.load_quant_state(workdir / CALIBRATION_DIR)


def local_mesh():
  """A "data" mesh over this process's devices: calibration runs whole on every process (it is a one-off
  and its statistics are host-side), so every process derives the identical QuantState without collectives."""
  return parallel.data_mesh(jax.local_devices())


def calibration_batches(config, bundle: pipeline.ModelBundle, mesh=None):
  """Yields (x_t, t[, y]) at `calibration.num_timesteps` visited steps spread over each teacher trajectory.

  `mesh` must span only this process's devices (default: `local_mesh()`).
  """
  mesh = local_mesh() if mesh is None else mesh
  c = config.calibration
  schedule = pipeline.schedule_from(config)
  sampler_config = pipeline.sampler_from(config)
  batch = int(c.batch_size)
  if batch % mesh.shape[parallel.DATA_AXIS]:
    mesh = parallel.data_mesh(jax.local_devices()[:1])
  teacher = pipeline.TeacherSampler(bundle, schedule, sampler_config, mesh=mesh)
  num_steps = sampler_config.num_steps
  picks = np.unique(np.round(np.linspace(0, num_steps - 1, min(int(c.num_timesteps), num_steps))).astype(int))
  batch = int(c.batch_size)
  num_batches = -(-int(c.num_samples) // batch)
  for b in range(num_batches):
    x_T, labels = pipeline.noise_batch(int(c.seed), pipeline.NoisePurpose.CALIBRATION, b, batch, bundle.sample_shape,
                                       bundle.num_classes)
    labels_arr = np.zeros((batch,), np.int32) if labels is None else labels
    traj = teacher(x_T, labels_arr, jax.random.fold_in(jax.random.key(int(c.seed)), b))
    for i in picks:
      x_t = traj.xs[i]
      t = jnp.full((batch,), traj.ts[i], jnp.int32)
      yield (x_t, t, labels_arr) if bundle.conditional else (x_t, t)


def run_calibration(config, workdir, *, bundle: pipeline.ModelBundle | None = None, mesh=None):
  """Calibrates the model of `config` from its own trajectories; saves and returns the QuantState.

  `mesh`, if given, must span only this process's devices (see `local_mesh`).
  """
  workdir = pathlib.Path(workdir)
  bundle = bundle or pipeline.load_model(config)
  qconfig = pipeline.quant_config_from(config)
  logging.info("Calibrating %s at W%dA%d (%s, sign mode %s)", config.model.path, qconfig.weight_bits,
               qconfig.act_bits, qconfig.kind, qconfig.sign_mode)
  qstate, statistics = quant.calibrate(bundle.model, bundle.variables, calibration_batches(config, bundle, mesh),
                                       qconfig, return_statistics=True)
  # orbax coordinates multi-process saves: every process calls it (only the primary writes).
  quant.save_quant_state(workdir / CALIBRATION_DIR, qstate)
  if jax.process_index() == 0:
    # The per-layer table (formats, maxvals, zero points, MSE) and activation histograms with the chosen grids.
    quant.write_report(workdir / REPORT_DIR, qstate, statistics)
    checkpoint.save_json(workdir / SUMMARY_FILE, {
        "model": str(config.model.path), "quant_config": qconfig.to_dict(),
        "num_layers": len(qstate.layers), "unquantized": list(qstate.unquantized),
        "layers": {p: {"act_format": layer.act_format.name,
                       "weight_format": None if layer.weight_format is None else layer.weight_format.name,
                       "one_sided": bool(layer.one_sided)} for p, layer in qstate.layers.items()}})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("calibration saved")
  return qstate


def load_or_calibrate(config, workdir, *, bundle=None, mesh=None):
  """The workdir's calibration, computing it first when missing (a calibration of another quant config is an
  error, named field by field)."""
  workdir = pathlib.Path(workdir)
  if has_calibration(workdir):
    saved = checkpoint.load_json(workdir / SUMMARY_FILE).get("quant_config", {})
    now = config_record.json_normalized(pipeline.quant_config_from(config).to_dict())
    # Every field of the quantization config shapes the calibration: none may change.
    diffs = config_record.differences(saved, now, config_record.Changeable())
    if diffs:
      raise ValueError(f"{workdir} holds a calibration of a different quantization config (fields "
                       f"{[d.field for d in diffs]}: {[(d.field, d.saved, d.current) for d in diffs]}). Use a new "
                       "--workdir.")
    return load_calibration(workdir)
  return run_calibration(config, workdir, bundle=bundle)
