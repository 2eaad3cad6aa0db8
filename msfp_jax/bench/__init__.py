"""Benchmarks: `python -m msfp_jax.bench NAME [args]` runs one (each is the module msfp_jax.bench.NAME, whose
`run(argv)` prints and returns its numbers); `python -m msfp_jax.bench all` runs every one and rewrites
docs/benchmarks.md (msfp_jax.bench.report).
"""

# The benchmark modules, in the order `all` runs them.
BENCHMARKS = ("quant", "unet", "ldm", "inception", "finetune", "sample", "device")

__all__ = ["BENCHMARKS"]
