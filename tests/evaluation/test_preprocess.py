"""The two FID input pipelines against independent resizes (torch's interpolate, TF1 bilinear in numpy)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msfp_jax.evaluation import preprocess


def _tf1_bilinear_reference(images: np.ndarray, size: int) -> np.ndarray:
  """TF1 resize_bilinear(align_corners=False, half_pixel_centers=False), written per output pixel (torch-
  fidelity's formulation): source = dst * scale with TF's float32 scale = in / out (resize_bilinear_op.cc's
  LegacyScaler); neighbours floor and floor + 1 (clamped); the interpolation itself in float64."""
  n, h, w, c = images.shape
  out = np.zeros((n, size, size, c), np.float64)
  scale_y, scale_x = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
  for oy in range(size):
    sy = float(np.float32(oy) * scale_y)
    y0 = int(np.floor(sy))
    y1 = min(y0 + 1, h - 1)
    ly = sy - y0
    for ox in range(size):
      sx = float(np.float32(ox) * scale_x)
      x0 = int(np.floor(sx))
      x1 = min(x0 + 1, w - 1)
      lx = sx - x0
      top = images[:, y0, x0] + (images[:, y0, x1] - images[:, y0, x0]) * lx
      bottom = images[:, y1, x0] + (images[:, y1, x1] - images[:, y1, x0]) * lx
      out[:, oy, ox] = top + (bottom - top) * ly
  return out


@pytest.mark.parametrize("in_size", [32, 64, 256, 512])
def test_torch_pipeline_resize_matches_interpolate(in_size):
  rng = np.random.RandomState(in_size)
  x = rng.uniform(0, 1, (2, in_size, in_size + 3, 3)).astype(np.float32)  # non-square too
  expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                           align_corners=False, antialias=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(preprocess.resize_bilinear_torch(jnp.asarray(x)))
  # torch's float32 CPU kernel is itself up to ~4e-6 off the exact interpolation of its own taps.
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("in_size", [32, 64, 256, 512])
def test_tf_pipeline_resize_matches_tf1_bilinear(in_size):
  rng = np.random.RandomState(in_size)
  x = rng.randint(0, 256, (2, in_size, in_size, 3)).astype(np.float32)
  expected = _tf1_bilinear_reference(x.astype(np.float64), 299)
  ours = np.asarray(preprocess.resize_bilinear_tf1(jnp.asarray(x)))
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)  # float32 arithmetic on 0..255 values


def test_network_input_ranges():
  x = np.random.RandomState(0).randint(0, 256, (1, 32, 32, 3)).astype(np.uint8)
  tf_in = np.asarray(preprocess.to_network_input(preprocess.from_uint8(x, "tf"), "tf"))
  expected_tf = (_tf1_bilinear_reference(x.astype(np.float64), 299) - 128) / 128
  np.testing.assert_allclose(tf_in, expected_tf, atol=2e-6)
  pt_in = np.asarray(preprocess.to_network_input(preprocess.from_uint8(x, "pytorch-fid"), "pytorch-fid"))
  expected_pt = F.interpolate(torch.from_numpy(x / 255.0).float().permute(0, 3, 1, 2), size=(299, 299),
                              mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy() * 2 - 1
  np.testing.assert_allclose(pt_in, expected_pt, atol=2e-5)


def test_model_range_tf_pipeline_rounds_to_uint8_values():
  x = jnp.asarray([[-1.0, -0.999, 0.0, 0.5, 1.0, 1.7]]).reshape(1, 1, 6, 1)
  got = np.asarray(preprocess.from_model_range(x, "tf")).ravel()
  np.testing.assert_array_equal(got, np.round(np.clip((np.asarray(x).ravel() + 1) * 127.5, 0, 255)))
  got_pt = np.asarray(preprocess.from_model_range(x, "pytorch-fid")).ravel()
  np.testing.assert_allclose(got_pt, np.clip((np.asarray(x).ravel() + 1) / 2, 0, 1))


def test_grey_images_replicated_other_channel_counts_rejected():
  grey = np.random.RandomState(1).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
  rgb = np.asarray(preprocess.to_rgb(jnp.asarray(grey)))
  np.testing.assert_array_equal(rgb, np.repeat(grey, 3, axis=-1))
  for channels in (2, 4):
    with pytest.raises(ValueError, match=f"1 \\(grey\\) or 3 \\(RGB\\) channels; got {channels}"):
      preprocess.to_network_input(jnp.zeros((1, 8, 8, channels)), "pytorch-fid")


def test_unknown_pipeline_rejected():
  with pytest.raises(ValueError, match="Unknown FID pipeline 'clean-fid'"):
    preprocess.to_network_input(jnp.zeros((1, 8, 8, 3)), "clean-fid")
