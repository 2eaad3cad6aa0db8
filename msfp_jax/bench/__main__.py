"""`python -m msfp_jax.bench NAME [args]`: run one benchmark (or `all`) and print its numbers."""
import importlib
import sys

from msfp_jax.bench import BENCHMARKS, report


def main(argv: list[str]) -> None:
  if not argv or argv[0] not in BENCHMARKS + ("all",):
    raise SystemExit(f"usage: python -m msfp_jax.bench {{{','.join(BENCHMARKS + ('all',))}}} [args]")
  name, rest = argv[0], argv[1:]
  if name == "all":
    report.run_all(rest)
    return
  importlib.import_module(f"msfp_jax.bench.{name}").run(rest)


if __name__ == "__main__":
  main(sys.argv[1:])
