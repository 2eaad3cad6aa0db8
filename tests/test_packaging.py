"""pyproject.toml declares what requirements*.txt pin (one set of pins, two spellings), and the package data
(assets, configs) is what an installed msfp_jax needs."""
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import msfp_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(name: str) -> list[str]:
  """The requirement lines of a requirements file, without comments and `-r` includes."""
  lines = [line.split("#", 1)[0].strip() for line in (REPO / name).read_text().splitlines()]
  return [line for line in lines if line and not line.startswith("-r")]


def _key(requirement: str) -> str:
  return re.split(r"[=<>!~\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_requirements_txt_with_the_same_pins():
  assert PYPROJECT["project"]["dependencies"] == _requirements("requirements.txt")


def test_the_test_extra_is_requirements_test_txt():
  assert PYPROJECT["project"]["optional-dependencies"]["test"] == _requirements("requirements-test.txt")
  assert "-r requirements.txt" in (REPO / "requirements-test.txt").read_text(), "the test set includes the runtime"
  assert {_key(r) for r in _requirements("requirements-test.txt")} >= {"pytest", "ruff", "torch", "diffusers"}


def test_metadata_of_a_real_library():
  project = PYPROJECT["project"]
  assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
  assert project["license"] == "Apache-2.0" and (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
  assert project["readme"] == "README.md" and (REPO / "README.md").is_file()
  assert project["requires-python"] == ">=3.11"
  assert PYPROJECT["tool"]["setuptools"]["package-data"]["msfp_jax"] == ["assets/**/*"]


def test_ci_runs_exactly_the_readme_test_command():
  command = next(line for line in (REPO / "README.md").read_text().splitlines()
                 if line.startswith("python3 -m venv .venv") and "pytest" in line)
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert ci[-1] == command
  assert "ruff check" in command and command.index("ruff check") < command.index("pytest"), "lint before the tests"


def test_the_top_level_package_loads_its_subpackages_on_first_use():
  probe = ("import sys, msfp_jax; assert 'jax' not in sys.modules, 'import msfp_jax must not load jax'; "
           "assert msfp_jax.quant.QuantConfig is sys.modules['msfp_jax.quant'].QuantConfig; "
           "assert set(msfp_jax.__all__) >= {'quant', 'lora', 'models', 'diffusion', 'evaluation', 'run', 'train'}; "
           "print('ok')")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
  with pytest.raises(AttributeError, match="no attribute 'eval'"):
    msfp_jax.eval  # noqa: B018  (the old name of msfp_jax.evaluation is gone, not shadowing the builtin)
