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
from typing import Any, Mapping

import numpy as np
from clu import metric_writers
from clu import periodic_actions


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
                  jsonl_name: str | None = "metrics.jsonl") -> metric_writers.MetricWriter:
  """TensorBoard (under workdir/tensorboard) + logging + `workdir/metrics.jsonl`.

  `just_logging=True` on non-zero processes of a multi-host job, so only host 0 writes files.
  """
  workdir = pathlib.Path(workdir)
  if just_logging:
    return metric_writers.LoggingWriter()
  default_writer = metric_writers.create_default_writer(str(workdir / "tensorboard"), asynchronous=False)
  writers = [default_writer]
  if jsonl_name:
    writers.append(JsonlWriter(workdir / jsonl_name))
  writer = metric_writers.MultiWriter(writers)
  # Progress reports (steps/s, uptime) go to TensorBoard only: metrics.jsonl holds one record per logged step.
  writer.progress_writer = default_writer
  return writer


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
