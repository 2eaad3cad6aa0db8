"""msfp_jax.metrics: a resumed run first drops what was logged past its restored step."""
import json
import pathlib

from msfp_jax import metrics


def _tb_steps(workdir, tag="loss"):
  import tensorflow as tf
  steps = []
  for path in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
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
