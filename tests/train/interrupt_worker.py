"""Runs the tiny fine-tuning (tiny_setup.tiny_config, 8 steps, checkpoints every 4) through the command line
(msfp_jax.main --mode=finetune), printing "SAVE-START <step>" and pausing 1.5 s as each checkpoint save begins, so
a test can send signals while a save is in progress.

usage: interrupt_worker.py MODEL_DIR WORKDIR
"""
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import tiny_setup  # noqa: E402

from msfp_jax.config_record import flatten  # noqa: E402
from msfp_jax.configs import default  # noqa: E402

model_dir, workdir = sys.argv[1:3]
want = flatten(tiny_setup.tiny_config(model_dir, **{"finetune.num_steps": 8,
                                                   "finetune.checkpoint_every": 4}).to_dict())
base = flatten(default.get_config().to_dict())
overrides = [f"--config.{k}={v}" for k, v in want.items() if base.get(k) != v]

from msfp_jax import checkpoint  # noqa: E402

_real_save = checkpoint.CheckpointManager.save


def _slow_save(self, step, state, **kw):
  print(f"SAVE-START {step}", flush=True)
  time.sleep(1.5)
  return _real_save(self, step, state, **kw)


checkpoint.CheckpointManager.save = _slow_save

from absl import app  # noqa: E402

from msfp_jax import main as cli  # noqa: E402

sys.argv = ["msfp_jax.main", f"--config={REPO / 'msfp_jax' / 'configs' / 'default.py'}", f"--workdir={workdir}",
            "--mode=finetune", *overrides]
app.run(cli.main)
