"""The command-line contract: bad input, one run per workdir, the config validated first, stage times.

--mode=finetune (calibrates when needed, logs metrics.jsonl, resumes with a larger N) is checked on the shared run
of tests/test_stages.py (test_finetune_mode_contract, test_extending_finetuning_recomputes_what_depends_on_it).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "train"))
import tiny_setup  # noqa: E402

SMALL = tiny_setup.tiny_flags()


def _main(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "msfp_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=900, env=dict(os.environ))


def test_bad_command_lines_fail_clearly(tmp_path):
  out = _main("--config=configs/default.py", "--mode=nosuchmode", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "Unknown --mode" in out.stderr
  out = _main("--config=configs/default.py", "--mode=finetune", f"--workdir={tmp_path}",
              "--config.finetune.no_such_field=3")
  assert out.returncode != 0 and "no_such_field" in out.stderr


# --------------------------------------------------------------------------------- one run per workdir (lock)
def _tiny_args(tmp_path, workdir, *extra):
  model_dir = tmp_path / "model"
  if not model_dir.exists():
    tiny_setup.write_tiny_model(model_dir)
  return ["--config=configs/default.py", f"--workdir={workdir}", f"--config.model.path={model_dir}", *SMALL, *extra]


def test_second_process_on_a_workdir_fails_at_once_naming_the_holder(tmp_path):
  import time
  workdir = tmp_path / "run"
  args = _tiny_args(tmp_path, workdir, "--mode=finetune", "--config.finetune.num_steps=100000")
  holder = subprocess.Popen([sys.executable, "-m", "msfp_jax.main", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ))
  try:
    lock_file = workdir / "run.lock"
    deadline = time.time() + 300
    while time.time() < deadline and holder.poll() is None:
      if lock_file.is_file() and lock_file.read_text().strip():
        assert json.loads(lock_file.read_text())["pid"] == holder.pid
        break
      time.sleep(0.5)
    else:
      pytest.fail("the first run never recorded itself in WORKDIR/run.lock")
    second = _main(*args)
    assert holder.poll() is None, "the first run must still hold the workdir"
    assert second.returncode != 0
    assert f"pid {holder.pid}" in second.stderr and "in use" in second.stderr, second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert "== stage" not in second.stdout, "the second process must fail before any stage starts"
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
  import socket
  workdir = tmp_path / "run"
  workdir.mkdir()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
  out = _main(*_tiny_args(tmp_path, workdir, "--mode=report"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stale lock" in out.stderr and f"pid {dead.pid}" in out.stderr, out.stderr[-2000:]
  assert (workdir / "run.lock").read_text() == "", "a finished run leaves the lock released (empty)"


def test_the_run_holds_the_lock_and_only_process_0_takes_it(tmp_path, monkeypatch):
  import dataclasses

  from msfp_jax.run import job, lock
  from msfp_jax.run import workdir as workdir_lib
  config = tiny_setup.tiny_config(tiny_setup.write_tiny_model(tmp_path / "model"))
  seen = {}

  def probe(config, workdir, shared):  # stands in for a stage: is the workdir locked while it runs?
    del config, shared
    seen["lock_file"] = (workdir / lock.LOCK_FILE).exists()
    try:
      with lock.WorkdirLock(workdir):
        seen["error"] = None
    except lock.WorkdirLockedError as e:
      seen["error"] = str(e)
  monkeypatch.setitem(job.STAGES, "report", dataclasses.replace(job.STAGES["report"], run=probe))
  job.run_job(config, tmp_path / "lead", "report")
  assert seen["error"] and f"pid {os.getpid()}" in seen["error"]
  assert (tmp_path / "lead" / lock.LOCK_FILE).read_text() == ""
  monkeypatch.setattr(workdir_lib, "is_lead_process", lambda: False)
  job.run_job(config, tmp_path / "other", "report")
  assert not seen["lock_file"] and seen["error"] is None, "processes other than 0 take no lock"


# --------------------------------------------------------------------------------- config validated first
def test_rejected_config_writes_nothing_and_the_corrected_rerun_is_accepted(tmp_path):
  workdir = tmp_path / "run"
  out = _main(*_tiny_args(tmp_path, workdir, "--mode=calibrate", "--config.quant.act_bits=0"))
  assert out.returncode != 0 and "act_bits" in out.stderr, out.stderr[-2000:]
  assert not workdir.exists(), f"a rejected config must leave nothing behind: {list(workdir.iterdir())}"
  out = _main(*_tiny_args(tmp_path, workdir, "--mode=report"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert (workdir / "config.json").is_file()


def test_config_errors_are_all_named_before_any_calibration(tmp_path):
  workdir = tmp_path / "run"
  args = _tiny_args(tmp_path, workdir, "--config.finetune.dfa_weighting=bogus", "--config.lora.num_banks=0",
                    "--config.finetune.batch_size=3")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run([sys.executable, "-m", "msfp_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env=env)
  assert out.returncode != 0
  for text in ("dfa_weighting", "num_banks", "finetune.batch_size (3) must be a multiple of the number of devices"):
    assert text in out.stderr, (text, out.stderr[-2000:])
  assert "Traceback" not in out.stderr
  assert not workdir.exists(), "nothing may be computed or written before the config is known to be valid"


def test_validate_config_names_every_problem(tmp_path):
  from msfp_jax import validate
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  validate.validate_config(tiny_setup.tiny_config(model_dir))
  bad = tiny_setup.tiny_config(model_dir, **{
      "quant.act_bits": 0, "finetune.dfa_weighting": "bogus", "lora.num_banks": 0, "calibration.num_samples": 0,
      "evaluation.fid_pipeline": "nope", "sampler.kind": "nosampler", "finetune.num_steps": 0})
  with pytest.raises(validate.ConfigError) as error:
    validate.validate_config(bad)
  for text in ("act_bits", "dfa_weighting", "num_banks", "calibration.num_samples", "'nope'", "nosampler",
               "finetune.num_steps"):
    assert text in str(error.value), (text, str(error.value))
  with pytest.raises(validate.ConfigError, match="not a converted msfp_jax model"):
    validate.validate_config(tiny_setup.tiny_config(tmp_path / "no_model"))


# --------------------------------------------------------------------------------- bad input: one line each
@pytest.mark.parametrize("case", ["unknown_field", "config_from_another_directory", "missing_config",
                                  "unknown_config_argument", "workdir_is_a_file"])
def test_bad_input_ends_in_one_line(case, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  workdir = f"--workdir={tmp_path / 'run'}"
  args, cwd, expected = {
      "unknown_field": (["--config=configs/default.py", workdir, "--config.quant.act_bitz=8"], REPO,
                        ["Unknown config field --config.quant.act_bitz", "Did you mean --config.quant.act_bits"]),
      # The repository's config is found from another directory (the error is then about the field).
      "config_from_another_directory": (["--config=configs/default.py:runlocal", workdir, "--config.act_bits=8"],
                                        tmp_path, ["Did you mean --config.quant.act_bits?"]),
      "missing_config": (["--config=configs/defualt.py", workdir], tmp_path,
                         ["no such file configs/defualt.py", "Did you mean configs/default.py"]),
      "unknown_config_argument": (["--config=configs/default.py:runlokal", workdir], REPO,
                                  ["Unknown config argument 'runlokal'", "known: runlocal"]),
      "workdir_is_a_file": (["--config=configs/default.py", f"--workdir={a_file}"], REPO,
                            [f"--workdir={a_file} is a file, not a directory"]),
  }[case]
  # From another directory the package is found through PYTHONPATH (as for an installed package).
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-m", "msfp_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env=env)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
  for text in expected:
    assert text in lines[0], (text, lines[0])
  assert not (tmp_path / "run").exists()


def test_workdir_path_checks(tmp_path):
  from absl import app

  from msfp_jax.run import workdir as workdir_lib
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(app.UsageError, match="is a file, not a directory"):
    workdir_lib.check_workdir_path(a_file)
  with pytest.raises(app.UsageError, match=f"cannot be created: {a_file} is a file"):
    workdir_lib.check_workdir_path(a_file / "run")
  workdir_lib.check_workdir_path(tmp_path / "new" / "run")  # created later by the run
  assert not (tmp_path / "new").exists()
  assert workdir_lib.workdir_writable(tmp_path) and workdir_lib.workdir_writable(tmp_path / "new" / "run")


def test_stage_times_count_only_stages_that_did_work(tmp_path, monkeypatch):
  import dataclasses
  import time

  from msfp_jax.run import job
  from msfp_jax.run import stage as stage_lib
  config = tiny_setup.tiny_config(tiny_setup.write_tiny_model(tmp_path / "model"))
  workdir = tmp_path / "run"
  ran = []

  def stage(name, output):
    def fake(config, workdir, shared):  # does its work (writes its result) only when the result is absent
      del config, shared
      ran.append(name)
      time.sleep(0.05)
      if output and not (workdir / output).exists():
        (workdir / output).parent.mkdir(parents=True, exist_ok=True)
        (workdir / output).write_text("{}")
    return fake
  for name, output in (("calibrate", "calibration_summary.json"), ("finetune", "metrics.jsonl"),
                       ("sample", "samples/summary.json"), ("eval", None), ("export", "export/summary.json"),
                       ("report", "report.md")):
    # The fake checks its own result (as the real stages once did), so the runner's done-check is left out.
    monkeypatch.setitem(job.STAGES, name, dataclasses.replace(job.STAGES[name], run=stage(name, output),
                                                              is_done=stage_lib.never_done))
  job.run_job(config, workdir, "all")
  timings = json.loads((workdir / "timings.json").read_text())
  assert set(timings) == {"calibrate", "finetune", "sample", "export"}, "eval wrote nothing: it did no work"
  assert all(seconds >= 0.05 for seconds in timings.values()), timings
  ran.clear()
  job.run_job(config, workdir, "all")  # a no-op rerun: every stage finds its result
  assert ran == list(stage_lib.PIPELINE)
  assert json.loads((workdir / "timings.json").read_text()) == timings, "skipped stages must add no time"
  (workdir / "samples" / "summary.json").unlink()
  job.run_job(config, workdir, "sample")
  again = json.loads((workdir / "timings.json").read_text())
  assert again["sample"] >= timings["sample"] + 0.05 and again["calibrate"] == timings["calibrate"]


def test_the_runner_skips_a_stage_whose_results_are_current_and_checks_the_order(tmp_path):
  from msfp_jax.run import stage as stage_lib
  contexts = []

  def write(config, workdir, context):
    del config
    contexts.append(context)
    (workdir / "out.json").write_text("{}")
  stage = stage_lib.Stage(name="write", run=write, is_done=lambda config, workdir: (workdir / "out.json").is_file(),
                          outputs=("out.json",))
  for _ in range(2):
    stage_lib.run_stages([stage], None, tmp_path, "the context")
  assert contexts == ["the context"], "a stage whose results are current does not run"
  assert set(json.loads((tmp_path / stage_lib.TIMINGS_FILE).read_text())) == {"write"}
  with pytest.raises(ValueError, match=r"'late' runs before \['early'\]"):
    stage_lib.check_order([stage_lib.Stage(name="late", run=write, depends_on=("early",))])


def test_the_command_line_knows_the_stages_the_job_runs():
  from msfp_jax.run import command, job
  assert command.MODES == (*job.STAGES, "all", "ablation")
  assert all(s.depends_on or s.name in ("calibrate", "finetune") for s in job.STAGES.values())
