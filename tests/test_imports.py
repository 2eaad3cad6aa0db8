"""Every module of msfp_jax imports, all of them in one process, in either order.

A module that defines absl flags when merely imported claims the flag name for the whole process: the second
module to define `--config` then fails with DuplicateFlagError, but only in a process that imports both (a
test session does; CI failed this way once). Command modules define their flags under `__main__`, except
msfp_jax.main, whose flags are its interface.
"""
import os
import pathlib
import pkgutil
import subprocess
import sys

import msfp_jax

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _all_modules() -> list[str]:
  names = [m.name for m in pkgutil.walk_packages(msfp_jax.__path__, prefix="msfp_jax.")]
  return sorted(n for n in names if not n.endswith("__main__"))  # running it is what __main__ does


def _import_all(names: list[str]) -> subprocess.CompletedProcess:
  code = "import importlib, sys\nfor name in sys.argv[1:]:\n  importlib.import_module(name)\n"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
  return subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env,
                        cwd=str(_REPO), timeout=600)


def test_the_package_lists_its_command_modules():
  names = _all_modules()
  assert {"msfp_jax.main", "msfp_jax.diagnostics.device_agreement", "msfp_jax.train_fp"} <= set(names)


def test_every_module_imports_in_one_process_in_both_orders():
  names = _all_modules()
  for order in (names, names[::-1]):
    result = _import_all(order)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_check_sees_a_module_that_defines_a_flag_main_also_defines(tmp_path):
  # The control: a module claiming --config at import, imported beside msfp_jax.main, must fail the check.
  (tmp_path / "claims_config.py").write_text(
      "from ml_collections import config_flags\nconfig_flags.DEFINE_config_file('config', None, 'x')\n")
  code = "import sys; sys.path.insert(0, sys.argv[1]); import claims_config; import msfp_jax.main\n"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=str(_REPO), timeout=600)
  assert result.returncode != 0 and "DuplicateFlagError" in result.stderr
