"""msfp_jax.metrics: a resumed run first drops what was logged past its restored step."""
import json
import pathlib

from msfp_jax import checkpoint, metrics


def _tb_steps(workdir, tag="loss"):
  import tensorflow as tf
  steps = []
  for path in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    if checkpoint.is_temporary(path):
      continue
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def test_resuming_writer_drops_records_and_events_past_the_restored_step(tmp_path):
  writer = metrics.create_writer(tmp_path)
  for step in range(1, 7):
    writer.write_scalars(step, {"loss": float(step)})
  writer.flush()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "lo')  # a write cut short by a kill
  # The run restored step 4: steps 5-7 are logged again by the resumed run.
  resumed = metrics.create_writer(tmp_path, resume_step=4)
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
  assert _tb_steps(tmp_path) == [1, 2, 3, 4]
  for step in range(5, 8):
    resumed.write_scalars(step, {"loss": float(step)})
  resumed.flush()
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == list(range(1, 8))
  assert _tb_steps(tmp_path) == list(range(1, 8))


def test_resume_step_zero_drops_everything_and_a_fresh_workdir_is_fine(tmp_path):
  writer = metrics.create_writer(tmp_path)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  metrics.create_writer(tmp_path, resume_step=0)
  assert (tmp_path / "metrics.jsonl").read_text() == ""
  assert _tb_steps(tmp_path) == []
  metrics.create_writer(tmp_path / "new", resume_step=0)  # nothing to drop
  assert metrics.read_losses(tmp_path / "new") == []


def test_read_losses_returns_the_logged_losses_in_order(tmp_path):
  writer = metrics.create_writer(tmp_path)
  for step in range(1, 4):
    writer.write_scalars(step, {"loss": 0.5 * step, "t": 3})
  assert metrics.read_losses(tmp_path) == [0.5, 1.0, 1.5]


def test_jsonl_writer_appends_one_record_per_write_with_plain_floats(tmp_path):
  import numpy as np
  writer = metrics.JsonlWriter(tmp_path / "sub" / "m.jsonl")
  writer.write_scalars(3, {"loss": np.float32(0.25), "lr": np.asarray(1e-3)})
  writer.write_scalars(4, {"loss": 0.5})
  writer.write_images(4, {"x": np.zeros((1, 2, 2, 3))})  # everything but scalars is left to TensorBoard
  lines = (tmp_path / "sub" / "m.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [{"step": 3, "loss": 0.25, "lr": 1e-3}, {"step": 4, "loss": 0.5}]


def test_just_logging_writes_no_files_and_jsonl_can_be_turned_off(tmp_path):
  writer = metrics.create_writer(tmp_path / "other_host", just_logging=True)
  writer.write_scalars(1, {"loss": 1.0})
  assert not (tmp_path / "other_host").exists(), "only process 0 writes files"
  writer = metrics.create_writer(tmp_path / "no_jsonl", jsonl_name=None)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  assert not (tmp_path / "no_jsonl" / "metrics.jsonl").exists()
  assert list((tmp_path / "no_jsonl" / "tensorboard").glob("events.out.tfevents.*"))


def test_read_losses_skips_records_without_loss_and_a_line_cut_short(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "t": 1}\n[1]\n'
                                          '{"step": 3, "loss": 1.5}\n{"step": 4, "lo')
  assert metrics.read_losses(tmp_path) == [2.0, 1.5]
  metrics.drop_after(tmp_path, 2)
  assert metrics.read_losses(tmp_path) == [2.0], "drop_after keeps the complete records up to the step"
  assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]


def test_drop_after_leaves_a_temporary_event_file_of_a_killed_rewrite_alone(tmp_path):
  writer = metrics.create_writer(tmp_path)
  for step in (1, 2, 3):
    writer.write_scalars(step, {"loss": float(step)})
  writer.flush()
  event_file = next((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  leftover = event_file.with_name(event_file.name + ".tmp4242")
  leftover.write_bytes(b"half a record")  # what a kill during a rewrite leaves
  metrics.drop_after(tmp_path, 1)
  assert _tb_steps(tmp_path) == [1]
  assert leftover.read_bytes() == b"half a record"


def test_progress_prints_a_line_with_the_rate_and_a_last_line(capsys):
  report = metrics.progress(3, None, every_secs=3600.0, name="train")
  for step in (1, 2, 3):
    report.report(step)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("[train] 1/3 (") and lines[-1].startswith("[train] 3/3 ("), lines
  assert len(lines) == 2, "between the first and the last step, at most one line per every_secs"
