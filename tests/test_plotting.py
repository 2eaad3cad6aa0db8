"""plotting.image_grid: the one image grid (the sample stage's PNG, the evaluation's samples.png, train_fp's)."""
import numpy as np

from msfp_jax import plotting


def test_image_grid_layout_gaps_and_channels():
  images = np.stack([np.full((2, 3, 1), v, np.float32) for v in (-1.0, 0.0, 1.0)])  # 3 grey 2x3 images
  grid = plotting.image_grid(images)  # 2 columns (ceil sqrt 3), 2 rows, 1-pixel gaps of 0 around every image
  assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[1:3, 1:4, 0], 0)
  np.testing.assert_array_equal(grid[1:3, 5:8, 0], 128)
  np.testing.assert_array_equal(grid[4:6, 1:4, 0], 255)
  assert grid[0].max() == 0 and grid[:, 4].max() == 0 and grid[4:6, 5:8].max() == 0  # gaps and the empty cell
  touching = plotting.image_grid(images, gap=0, fill=255)
  assert touching.shape == (4, 6, 1) and touching[2:, 3:].min() == 255
  assert plotting.image_grid(np.full((1, 2, 2, 3), np.nan), columns=1)[1, 1].tolist() == [128, 128, 128]
