"""The report stage: report.json and report.md from what the stages left in the workdir, and what a run lacks.

The report shows only results computed from this run's inputs (msfp_jax.stage_inputs): one of other inputs (a
longer fine-tuning, another evaluation protocol) is left out and named, never shown beside this run's protocol.
A read-only workdir of a finished run gets its report printed, computed in memory (`report_read_only`).
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any

from absl import app

from msfp_jax import checkpoint, stage_inputs
from msfp_jax.run import workdir as workdir_lib
from msfp_jax.run.evaluate import EVAL_SUMMARY
from msfp_jax.run.export import EXPORT_SUMMARY
from msfp_jax.run.models import MODELS
from msfp_jax.run.sample import SAMPLES_SUMMARY
from msfp_jax.run.stage import TIMINGS_FILE
from msfp_jax.train import calibration

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def print_report(config, workdir, context=None) -> dict:
  """The report stage: writes report.json and report.md and prints the report."""
  del context
  report = run_report(config, workdir)
  print((pathlib.Path(workdir) / REPORT_MD).read_text(), flush=True)
  return report


def _stored(path: pathlib.Path) -> Any:
  """A stage's stored JSON result; {} while it has none."""
  return checkpoint.load_json(path) if path.is_file() else {}


def run_report(config, workdir, *, write: bool = True) -> dict:
  """report.json and report.md from what the stages left in the workdir (always rewritten; with write=False
  only returned, for a read-only workdir)."""
  workdir = pathlib.Path(workdir)
  samples, evals, export, timings, calib = (_stored(workdir / name) for name in (
      SAMPLES_SUMMARY, EVAL_SUMMARY, EXPORT_SUMMARY, TIMINGS_FILE, calibration.SUMMARY_FILE))
  s, q = config.sampler, config.quant
  # Results computed from other inputs than this run's (a longer fine-tuning, another evaluation protocol) are
  # left out and named, never shown beside this run's protocol.
  stale: dict[str, list[str]] = {}

  def current(what: str, recorded, inputs: dict) -> bool:
    changed = stage_inputs.changes(recorded, inputs)
    if changed:
      stale[what] = changed
    return not changed
  recorded_samples = samples.get(stage_inputs.INPUTS_KEY) or {}
  samples_current = {name: bool(samples) and current(f"sample {name}", recorded_samples.get(name),
                                                       stage_inputs.sample_inputs(config, workdir, name))
                     for name in MODELS}
  if export and not current("export", export.get(stage_inputs.INPUTS_KEY),
                            stage_inputs.export_inputs(config, workdir)):
    export = {}
  report: dict[str, Any] = {}
  for name in MODELS:
    entry: dict[str, Any] = {}
    if samples_current[name] and samples_current["fp"]:
      entry["sample_mse_vs_fp"] = samples["sample_mse_vs_fp"][name]
      for key in ("sample_psnr_vs_fp", "mean_eps_mse_vs_fp", "mean_x_prev_mse_vs_fp"):
        if name in samples.get(key, {}):
          entry[key] = samples[key][name]
    scores = evals.get(name) if isinstance(evals, dict) else None
    if isinstance(scores, dict) and not current(f"eval {name}", scores.get(stage_inputs.INPUTS_KEY),
                                                stage_inputs.eval_inputs(config, workdir, name)):
      scores = None
    if scores:
      found = scores.get("metrics", {})
      for key, metric in (("fid", "fid"), ("sfid", "sfid"), ("is", "inception_score"),
                          ("is_std", "inception_score_std"), ("fd_to_fp", "fd_to_fp")):
        if found.get(metric) is not None:
          entry[key] = found[metric]
      entry["protocol"] = scores.get("protocol")
    elif "skipped" in evals:
      entry["scores"] = evals["skipped"]
    report[name] = entry
  formats: dict[str, int] = {}
  for layer in calib.get("layers", {}).values():
    formats[f"act {layer['act_format']}"] = formats.get(f"act {layer['act_format']}", 0) + 1
    if layer.get("weight_format"):
      formats[f"weight {layer['weight_format']}"] = formats.get(f"weight {layer['weight_format']}", 0) + 1
  report["quantization"] = {
      "kind": q.kind, "weight_bits": int(q.weight_bits), "act_bits": int(q.act_bits), "sign_mode": q.sign_mode,
      "high_precision_paths": q.high_precision_paths, "high_precision_bits": int(q.high_precision_bits),
      "layer_format_counts": formats, "num_quantized_layers": len(calib.get("layers", {})),
      "lora_banks": int(config.lora.num_banks), "lora_rank": int(config.lora.rank),
      "dfa_weighting": config.finetune.dfa_weighting,
      # The steps of the checkpoint the results come from (the config's budget may differ: a run in progress).
      "finetune_steps": int(stage_inputs.finetuned_checkpoint(workdir)["finetune_step"] or 0),
      "finetune_steps_configured": int(config.finetune.num_steps)}
  report["protocol"] = {"model": str(config.model.path), "sampler": s.kind, "steps": int(s.num_steps),
                        "eta": float(s.eta), "skip": s.skip, "guidance": float(s.guidance_scale),
                        "seed": int(config.seed), "sample_grid_images": int(config.sample.num_images),
                        "eval_samples": int(config.evaluation.num_samples),
                        "fid_pipeline": config.evaluation.fid_pipeline}
  report["export"] = export
  report["stale"] = stale
  report["timings_seconds"] = timings
  if write:
    checkpoint.save_json(workdir / REPORT_JSON, report)
    (workdir / REPORT_MD).write_text(report_markdown(report))
  return report


def report_markdown(report: dict) -> str:
  q, p = report["quantization"], report["protocol"]
  lines = [f"# msfp_jax report: {p['model']}", "",
           f"W{q['weight_bits']}A{q['act_bits']} {q['kind'].upper()} (sign mode {q['sign_mode']}), "
           f"TALoRA K={q['lora_banks']} rank {q['lora_rank']}, DFA weighting {q['dfa_weighting']}, "
           f"{q['finetune_steps']} fine-tuning steps.", "",
           "Against the FP model from the same noise (paired: far less noisy than FID at a few hundred "
           "samples): sample MSE and PSNR, FD to FP (Frechet distance of the Inception features), and the "
           "teacher-forced eps MSE averaged over the sampler's steps (per step: per_step_eps_errors.png).", "",
           "| model | FID | sFID | IS | FD to FP | sample MSE vs FP | PSNR vs FP (dB) | eps MSE vs FP |",
           "|---|---|---|---|---|---|---|---|"]

  def cell(entry, key):
    value = entry.get(key)
    return "n/a" if value is None else f"{value:.4g}"
  for name in MODELS:
    entry = report[name]
    lines.append(f"| {name} | {cell(entry, 'fid')} | {cell(entry, 'sfid')} | {cell(entry, 'is')} | "
                 f"{cell(entry, 'fd_to_fp')} | {cell(entry, 'sample_mse_vs_fp')} | "
                 f"{cell(entry, 'sample_psnr_vs_fp')} | {cell(entry, 'mean_eps_mse_vs_fp')} |")
  lines += ["", "Protocol: " + ", ".join(f"{k}={v}" for k, v in p.items()), ""]
  protocol = next((report[name]["protocol"] for name in MODELS if report[name].get("protocol")), None)
  if protocol:
    lines += ["Scores: " + ", ".join(f"{k}={v}" for k, v in protocol.items()), ""]
  if report["fp"].get("scores"):
    lines += [report["fp"]["scores"], ""]
  if q["layer_format_counts"]:
    lines += ["Formats chosen by the calibration search (layers): " +
              ", ".join(f"{k}: {v}" for k, v in sorted(q["layer_format_counts"].items())), ""]
  if report["export"]:
    e = report["export"]
    lines += [f"Packed export: {e['bytes']} bytes for {e['num_banks']} banks; one bank {e['bytes_one_bank']} bytes "
              f"= {e['ratio_one_bank_vs_fp']:.3f}x the FP checkpoint ({e['fp_checkpoint_bytes']} bytes); samples "
              f"from the packed file differ from the fake-quantized model's by at most "
              f"{e['max_abs_diff_packed_vs_fake_quant_samples']:.3g}"
              + (f", and run on codes (zero points folded into the biases, padded with the code of 0) by at most "
                 f"{e['max_abs_diff_code_domain_vs_fake_quant_samples']:.3g}"
                 if "max_abs_diff_code_domain_vs_fake_quant_samples" in e else "")
              + (f" (float summation order; the fake-quantized model's own samples move by at most "
                 f"{e['max_abs_diff_fake_quant_nudged_noise_samples']:.3g} when its starting noise moves by "
                 f"{e['noise_nudge']:g}: a 4-bit activation that crosses a rounding boundary jumps a grid step)"
                 if "max_abs_diff_fake_quant_nudged_noise_samples" in e else "") + ".", ""]
  if report.get("stale"):
    lines += ["Left out, computed from other inputs than this run's (rerun with --mode=all, or the stage's --mode, "
              "to compute them again): " + "; ".join(f"{what} ({', '.join(changed)})"
                                                     for what, changed in report["stale"].items()), ""]
  if report["timings_seconds"]:
    lines += ["Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_seconds"].items()), ""]
  return "\n".join(lines)


def unfinished(config, workdir: pathlib.Path, report: dict) -> list[str]:
  """What `--mode=all` would still compute in `workdir`, judged from `report` (run_report's dict); [] when the
  run is finished."""
  stale = report.get("stale", {})
  missing = [f"{what} out of date ({', '.join(changed)})" for what, changed in stale.items()]
  if not calibration.has_calibration(workdir):
    missing.append("no calibration")
  q = report["quantization"]
  if q["finetune_steps"] < q["finetune_steps_configured"]:
    missing.append(f"fine-tuned to step {q['finetune_steps']} of {q['finetune_steps_configured']}")
  no_samples = [m for m in MODELS if "sample_mse_vs_fp" not in report[m] and f"sample {m}" not in stale]
  if no_samples:
    missing.append(f"no samples of {', '.join(no_samples)}")
  if stage_inputs.inception_path(config) is not None:  # without the FID network the eval stage computes nothing
    no_scores = [m for m in MODELS if "fid" not in report[m] and f"eval {m}" not in stale]
    if no_scores:
      missing.append(f"no scores of {', '.join(no_scores)}")
  if not report.get("export") and "export" not in stale:
    missing.append("no export")
  return missing


def report_read_only(config, workdir, mode: str) -> None:
  """For a workdir this process cannot write: prints a finished run's report, computed in memory (nothing is
  written); `--mode=report` prints the report of whatever results are there. Any other mode, or `--mode=all` on
  an unfinished run, is refused with one line."""
  workdir = pathlib.Path(workdir)
  workdir_lib.check_read_only_mode(config, workdir, mode)
  workdir_lib.check_workdir_config(config, workdir)
  report = run_report(config, workdir, write=False)
  missing = unfinished(config, workdir, report)
  if mode == "all" and missing:
    raise app.UsageError(f"--workdir={workdir} {workdir_lib.READ_ONLY}, and its run is not finished: "
                         f"{'; '.join(missing)}. {workdir_lib.READ_ONLY_FIX}")
  print(report_markdown(report), flush=True)
  print(f"note: {workdir} is read-only: its report was printed from its results; nothing was written.",
        file=sys.stderr, flush=True)
