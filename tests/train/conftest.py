"""Fixtures of the fine-tuning tests (helpers live in tiny_setup.py, shared with the subprocess worker)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tiny_setup  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
  return tiny_setup.write_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")
