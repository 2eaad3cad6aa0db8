"""The one module that talks to clu: metric writers and progress reports.

Every long loop writes scalars through `create_writer` (TensorBoard event files + log lines, and one JSON
object per write to `workdir/metrics.jsonl` for tools that read metrics without TensorFlow) and shows
progress through `progress`.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers, periodic_actions

from msfp_jax import checkpoint


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, name: value, ...}` per `write_scalars` call to a JSON-lines file."""

  def __init__(self, path: str | os.PathLike):
    self._path = pathlib.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str | os.PathLike, *, just_logging: bool = False,
                  jsonl_name: str | None = "metrics.jsonl",
                  resume_step: int | None = None) -> metric_writers.MetricWriter:
  """TensorBoard (under workdir/tensorboard) + logging + `workdir/metrics.jsonl`.

  `just_logging=True` on non-zero processes of a multi-host job, so only host 0 writes files.
  `resume_step`: the step a (resumed or fresh: 0) training loop restarts from. What an earlier, killed run
  logged past it (the loop logs a step before its checkpoint is complete, and a kill between or during saves
  leaves records of steps that are run again) is dropped first (`drop_after`), so metrics.jsonl and TensorBoard
  hold each step once.
  """
  workdir = pathlib.Path(workdir)
  if just_logging:
    return metric_writers.LoggingWriter()
  if resume_step is not None:
    drop_after(workdir, resume_step, jsonl_name=jsonl_name)
  default_writer = metric_writers.create_default_writer(str(workdir / "tensorboard"), asynchronous=False)
  writers = [default_writer]
  if jsonl_name:
    writers.append(JsonlWriter(workdir / jsonl_name))
  writer = metric_writers.MultiWriter(writers)
  # Progress reports (steps/s, uptime) go to TensorBoard only: metrics.jsonl holds one record per logged step.
  writer.progress_writer = default_writer
  return writer


def _jsonl_records(path: pathlib.Path) -> list[dict]:
  """The complete records of a JSON-lines file (a line cut short by a kill is left out)."""
  records = []
  if path.is_file():
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def read_losses(workdir: str | os.PathLike, *, jsonl_name: str = "metrics.jsonl") -> list[float]:
  """The `loss` of every record of workdir/metrics.jsonl, in order (a resumed loop seeds its checks with them)."""
  return [float(r["loss"]) for r in _jsonl_records(pathlib.Path(workdir) / jsonl_name) if "loss" in r]


def _drop_tensorboard_events_after(directory: pathlib.Path, step: int) -> None:
  """Rewrites the event files under `directory` that hold events of steps > `step` (or a record cut short by a
  kill) without them. TensorBoard itself would plot both the old and the new values of those steps (it purges
  orphaned events only on a SessionLog.START, which TF2 writers do not write)."""
  files = sorted(p for p in directory.rglob("events.out.tfevents.*") if p.is_file() and not checkpoint.is_temporary(p))
  if not files:
    return
  import tensorflow as tf  # clu's SummaryWriter already imported it
  for path in files:
    kept, dropped = [], False
    try:
      for record in tf.data.TFRecordDataset(str(path)):
        raw = record.numpy()
        if tf.compat.v1.Event.FromString(raw).step > step:
          dropped = True
        else:
          kept.append(raw)
    except Exception:  # a truncated last record (DataLossError): keep what reads
      dropped = True
    if not dropped:
      continue
    with checkpoint.atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as out:
      for raw in kept:
        out.write(raw)


def drop_after(workdir: str | os.PathLike, step: int, *, jsonl_name: str | None = "metrics.jsonl") -> None:
  """Drops the metrics.jsonl records and the TensorBoard events of steps > `step` (see `create_writer`)."""
  workdir = pathlib.Path(workdir)
  if jsonl_name:
    path = workdir / jsonl_name
    if path.is_file():
      lines = path.read_text().splitlines()
      keep = [json.dumps(r) for r in _jsonl_records(path) if int(r.get("step", 0)) <= step]
      if len(keep) != len(lines):
        checkpoint.atomic_write_text(path, "".join(line + "\n" for line in keep))
  if (workdir / "tensorboard").is_dir():
    _drop_tensorboard_events_after(workdir / "tensorboard", step)


class _Progress:
  """A progress line every few seconds (clu ReportProgress: steps/s and ETA) plus a final line."""

  def __init__(self, total_steps: int, writer: metric_writers.MetricWriter | None, every_secs: float, name: str):
    writer = getattr(writer, "progress_writer", writer)
    self._report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                                   every_secs=every_secs)
    self._total = total_steps
    self._name = name
    self._start = time.time()
    self._last_print = 0.0
    self._every = every_secs
    self._first_step: int | None = None  # a resumed run's rate counts only the steps it ran

  def report(self, step: int) -> None:
    self._report(step)
    now = time.time()
    if self._first_step is None:
      self._first_step, self._start = step, now
    if now - self._last_print >= self._every or step == self._total:
      self._last_print = now
      elapsed = now - self._start
      done = step - self._first_step
      eta = f", about {(self._total - step) * elapsed / done:.0f}s left" if done and step < self._total else ""
      print(f"[{self._name}] {step}/{self._total} ({elapsed:.0f}s{eta})", flush=True)


def progress(total_steps: int, writer: metric_writers.MetricWriter | None = None, *, every_secs: float = 10.0,
             name: str = "progress") -> _Progress:
  """Returns a reporter; call `.report(step)` after each step (1-based)."""
  return _Progress(total_steps, writer, every_secs, name)
