"""The timer every benchmark uses: warm up once (JAX compiles there), then the median of `repeats` runs."""
import time

import numpy as np


def median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (and compilation for JAX)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))
