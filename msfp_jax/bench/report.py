"""`python -m msfp_jax.bench all`: run every benchmark in one process and rewrite docs/benchmarks.md."""
from __future__ import annotations

import datetime
import importlib
import os
import pathlib
import platform
import subprocess
import traceback

import jax

from msfp_jax.bench import BENCHMARKS

BENCHMARK_GOALS = {
    "quant": "W4A4 forward / FP forward <= 1.15x (weights quantized once)",
    "unet": "Flax forward at least as fast as diffusers (PyTorch)",
    "ldm": "Flax guided DDIM step at least as fast as diffusers (PyTorch)",
    "inception": "Flax pool3 features at least as fast as torch.jit",
    "finetune": "TALoRA(K=4) W4A4 DFA train step / FP forward+backward <= 2x",
    "sample": "W4A4 DDIM sampling / FP sampling <= 1.10x",
    "device": "on an accelerator: fake quantization is not the identity under jit; FP vs W4A4 timings",
}

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def machine_description() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
  return f"{os.cpu_count()} cores ({cpu}); jax {jax.__version__} on {jax.default_backend()} ({devices})"


def _format_value(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def format_section(name: str, result: dict | None, error: str | None) -> str:
  lines = [f"## {name}", "", f"Command: `python -m msfp_jax.bench {name}`", "",
           f"Goal: {BENCHMARK_GOALS.get(name, '-')}", ""]
  if error:
    lines += ["Failed:", "", "```", error.strip()[-2000:], "```", ""]
    return "\n".join(lines)
  lines += ["| quantity | value |", "|---|---|"]
  for key, value in (result or {}).items():
    if isinstance(value, dict):
      for sub_key, sub_value in value.items():
        lines.append(f"| {key}.{sub_key} | {_format_value(sub_value)} |")
    else:
      lines.append(f"| {key} | {_format_value(value)} |")
  lines.append("")
  return "\n".join(lines)


def run_all(argv: list[str] | None = None) -> dict:
  names = [n for n in (argv or []) if not n.startswith("-")] or list(BENCHMARKS)
  sections, results = [], {}
  for name in names:
    print(f"=== bench {name} ===", flush=True)
    try:
      results[name] = importlib.import_module(f"msfp_jax.bench.{name}").run([])
      sections.append(format_section(name, results[name], None))
    except Exception:  # One failing benchmark must not hide the others' numbers.
      sections.append(format_section(name, None, traceback.format_exc()))
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=DOC.parent).stdout.strip()
  except OSError:
    commit = "unknown"
  header = [
      "# Benchmarks", "",
      "Written by `python -m msfp_jax.bench all` (each section can be rerun alone with the command it shows).",
      "Ratios are measured side by side in one process; absolute times on a shared machine are noise.", "",
      f"- Date: {datetime.date.today().isoformat()}",
      f"- Machine: {machine_description()}",
      f"- Commit: {commit}", "",
  ]
  DOC.parent.mkdir(parents=True, exist_ok=True)
  DOC.write_text("\n".join(header + sections))
  print(f"wrote {DOC}")
  return results
