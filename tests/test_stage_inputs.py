"""stage_inputs: what a stage result was computed from."""
import hashlib

from msfp_jax import stage_inputs


def test_tree_sha256_covers_names_and_contents_but_not_the_model_card(tmp_path):
  (tmp_path / "params").mkdir()
  (tmp_path / "params" / "w").write_bytes(b"weights")
  (tmp_path / "model_config.json").write_text("{}")
  expected = hashlib.sha256()
  for name, data in (("model_config.json", b"{}"), ("params/w", b"weights")):
    expected.update(name.encode())
    expected.update(hashlib.sha256(data).hexdigest().encode())
  assert stage_inputs.tree_sha256(tmp_path) == expected.hexdigest()
  (tmp_path / "MODEL_CARD.md").write_text("# notes")  # documentation: the same model
  assert stage_inputs.tree_sha256(tmp_path) == expected.hexdigest()
  (tmp_path / "params" / "w").write_bytes(b"weightz")  # other weights (same size): another model
  assert stage_inputs.tree_sha256(tmp_path) != expected.hexdigest()
  assert stage_inputs.tree_sha256(tmp_path / "absent") is None


def test_changes_name_each_differing_input():
  assert stage_inputs.changes({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []
  assert stage_inputs.changes({"a": 1}, {"a": 2, "c": 3}) == ["a 1 -> 2", "c '<absent>' -> 3"]
  assert stage_inputs.changes(None, {"a": 1}) == ["no inputs recorded (a result of an older msfp_jax)"]
