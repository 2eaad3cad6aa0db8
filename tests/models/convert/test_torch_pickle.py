"""The torch-free reader against torch itself: torch.load / torch.jit.load are the independent references."""
import argparse
import collections
import enum
import io
import os
import pathlib
import pickle
import typing
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from msfp_jax.torch_pickle import (
  PickledObject,
  TorchFileError,
  is_torchscript_archive,
  load_torch_file,
  load_torchscript_state_dict,
  pickled_module_state_dict,
)

# Written out independently of the module under test.
NUMPY_DTYPE_OF = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float64: np.dtype(np.float64),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
}
# dtypes that only the zip format stores (as untyped storages rebuilt by `_rebuild_tensor_v3`).
NEW_NUMPY_DTYPE_OF = {
    torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn),
    torch.float8_e5m2: np.dtype(ml_dtypes.float8_e5m2),
    torch.uint16: np.dtype(np.uint16),
    torch.uint32: np.dtype(np.uint32),
    torch.uint64: np.dtype(np.uint64),
}
NUMPY_DTYPE_OF_ALL = {**NUMPY_DTYPE_OF, **NEW_NUMPY_DTYPE_OF}


class TrainingConfig:
  """A user class inside a checkpoint's hyper-parameters: must come back as an inert placeholder."""

  def __init__(self, channels, schedule):
    self.channels = channels
    self.schedule = schedule


class Dangerous:
  """Unpickling this with plain pickle would call `_leave_a_mark(path)`; the reader must never do so."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (_leave_a_mark, (self.path,))


def _leave_a_mark(path):
  pathlib.Path(path).write_text("executed")
  return "executed"


class TaggedArray(np.ndarray):
  """A user ndarray subclass: comes back as a plain ndarray."""


class Mode(enum.Enum):
  EMA = "ema"
  RAW = "raw"


class RecordingDict(dict):
  """A dict subclass (like Lightning's AttributeDict): its items are pickled with SETITEMS onto the instance."""


def assert_same_tensor(ours, ref: torch.Tensor, where: str) -> None:
  ref = ref.detach().resolve_conj().resolve_neg().contiguous()
  assert isinstance(ours, np.ndarray), f"{where}: {type(ours)} is not an ndarray"
  assert ours.dtype == NUMPY_DTYPE_OF_ALL[ref.dtype], f"{where}: dtype {ours.dtype} for {ref.dtype}"
  assert ours.shape == tuple(ref.shape), f"{where}: shape {ours.shape} != {tuple(ref.shape)}"
  ref_bytes = ref.reshape(-1).view(torch.uint8).numpy().tobytes()
  assert np.ascontiguousarray(ours).tobytes() == ref_bytes, f"{where}: values differ"


def assert_same(ours, ref, where="root") -> None:
  """Structural, bit-exact comparison of what we read with what torch.load returned."""
  if isinstance(ref, torch.Tensor):
    assert_same_tensor(ours, ref, where)
  elif isinstance(ref, torch.Size):
    assert ours == tuple(ref) and type(ours) is tuple, where
  elif isinstance(ref, torch.dtype):
    assert ours == NUMPY_DTYPE_OF[ref], where
  elif isinstance(ref, torch.device):
    assert ours == str(ref), where
  elif isinstance(ref, dict) and type(ref) in (dict, collections.OrderedDict):
    assert type(ours) is type(ref), f"{where}: {type(ours)} is not {type(ref)}"
    assert list(ours) == list(ref), f"{where}: keys {list(ours)} != {list(ref)}"
    for key in ref:
      assert_same(ours[key], ref[key], f"{where}[{key!r}]")
  elif type(ref) in (list, tuple):
    assert type(ours) is type(ref) and len(ours) == len(ref), where
    for index, (a, b) in enumerate(zip(ours, ref)):
      assert_same(a, b, f"{where}[{index}]")
  elif isinstance(ref, (np.ndarray, np.generic)):
    assert type(ours) is type(ref) and ours.dtype == ref.dtype and np.array_equal(ours, ref), where
  elif type(ref) in (int, float, str, bytes, bool, type(None)):
    assert type(ours) is type(ref) and ours == ref, f"{where}: {ours!r} != {ref!r}"
  else:  # an instance of a class outside the allow-list
    assert isinstance(ours, PickledObject), f"{where}: {type(ours)} should be a placeholder for {type(ref)}"
    assert ours.qualified_name == f"{type(ref).__module__}.{type(ref).__qualname__}", where
    if isinstance(ref, dict):
      assert_same(dict(ours.dict_items), dict(ref), f"{where}.items")
    assert_same(ours.state, vars(ref), f"{where}.state")


def save_and_compare(obj, path, new_format: bool):
  torch.save(obj, path, _use_new_zipfile_serialization=new_format)
  ours = load_torch_file(path)
  assert_same(ours, torch.load(path, weights_only=False))
  return ours


FORMATS = pytest.mark.parametrize("new_format", [True, False], ids=["zip", "legacy"])


@FORMATS
def test_dtypes_and_shapes_bit_exact(tmp_path, new_format):
  generator = torch.Generator().manual_seed(0)
  state = collections.OrderedDict()
  for dtype in NUMPY_DTYPE_OF:
    for shape in [(), (0,), (5,), (2, 3, 4), (1, 1, 3, 1)]:
      if dtype.is_complex:
        value = torch.randn(shape, generator=generator, dtype=dtype)
      elif dtype.is_floating_point:
        value = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
      elif dtype == torch.bool:
        value = torch.rand(shape, generator=generator) > 0.5
      else:
        info = torch.iinfo(dtype)
        value = torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)
      state[f"{dtype}_{len(shape)}d_{'x'.join(map(str, shape))}"] = value
  state["specials"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
  state["int64_extremes"] = torch.tensor([torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max])
  ours = save_and_compare(state, tmp_path / "state.pt", new_format)
  assert ours["specials"].dtype == np.float32 and np.isnan(ours["specials"][0])


def test_zip_only_dtypes_bit_exact(tmp_path):
  generator = torch.Generator().manual_seed(1)
  state = {}
  for dtype in NEW_NUMPY_DTYPE_OF:
    values = torch.randn(2, 3, 4, generator=generator, dtype=torch.float32) * 8
    state[str(dtype)] = values.to(dtype) if dtype.is_floating_point else values.abs().to(torch.int64).to(dtype)
    state[f"{dtype}_transposed"] = state[str(dtype)].transpose(0, 2)
  ours = save_and_compare(state, tmp_path / "new_dtypes.pt", True)
  assert ours["torch.float8_e4m3fn"].dtype == ml_dtypes.float8_e4m3fn


@FORMATS
def test_views_offsets_strides_and_shared_storage(tmp_path, new_format):
  base = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
  complex_base = torch.randn(6, dtype=torch.complex64)
  views = {
      "base": base,
      "transpose": base.transpose(0, 2),
      "permute": base.permute(2, 0, 1),
      "step_slice": base[1:, ::2, 1::3],
      "offset_row": base[2],
      "column": base[:, 3, :],
      "expanded": torch.arange(3.0).unsqueeze(1).expand(3, 4),  # stride 0
      "half_step": base.half()[:, 1::2],
      "conj": complex_base.conj(),  # a conjugate view: metadata {"conj": True}
      "neg_imag": torch.randn(4, dtype=torch.complex64).conj().imag,  # a negative view: {"neg": True}
  }
  ours = save_and_compare(views, tmp_path / "views.pt", new_format)
  # Every array owns C-contiguous, writable memory: writing one never changes another that shared a storage.
  for name, array in ours.items():
    assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata, name
  ours["base"][...] = -1
  np.testing.assert_array_equal(ours["transpose"], base.transpose(0, 2).numpy())


@FORMATS
def test_lightning_like_checkpoint_with_arbitrary_classes(tmp_path, new_format):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Linear(4, 2))
  hyper = RecordingDict(lr=1e-4, config=TrainingConfig(channels=[1, 2, 2], schedule={"beta": torch.tensor(0.1)}))
  hyper.note = "attribute on a dict subclass"
  checkpoint = {
      "epoch": 7,
      "global_step": 123456,
      "pytorch-lightning_version": "1.4.2",
      "state_dict": collections.OrderedDict(("model." + k, v) for k, v in model.state_dict().items()),
      "hyper_parameters": hyper,
      "args": argparse.Namespace(data="celeba", batch=64, steps=(1, 2)),
      "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25), "monitor": None,
                                        "np_scalar": np.float64(1.5), "np_int": np.int64(-3),
                                        "np_array": np.arange(6, dtype=np.int16).reshape(2, 3)}},
      "dtype": torch.float16,
      "device": torch.device("cpu"),
      "size": torch.Size([1, 3, 32, 32]),
      "misc": {"set": {1, 2}, "frozen": frozenset({"a"}), "bytes": b"\x00\xff", "complex": 1 + 2j, "none": None},
      # omegaconf-like metadata: references to classes (typing.Any, dict) and enum members.
      "metadata": {"ref_type": typing.Any, "object_type": dict, "mode": Mode.EMA},
  }
  ours = load_torch_file(_save(checkpoint, tmp_path / "last.ckpt", new_format))
  ref = torch.load(tmp_path / "last.ckpt", weights_only=False)
  for key in ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "args", "callbacks", "dtype",
              "device", "size"):
    assert_same(ours[key], ref[key], key)
  assert ours["misc"] == {"set": {1, 2}, "frozen": frozenset({"a"}), "bytes": b"\x00\xff", "complex": 1 + 2j,
                          "none": None}
  hyper_ours = ours["hyper_parameters"]
  assert isinstance(hyper_ours, PickledObject)
  assert hyper_ours.qualified_name == f"{RecordingDict.__module__}.RecordingDict"
  assert hyper_ours["lr"] == 1e-4 and "config" in hyper_ours
  config = hyper_ours.dict_items["config"]
  assert config.qualified_name == f"{TrainingConfig.__module__}.TrainingConfig"
  assert config.state["channels"] == [1, 2, 2]
  assert_same_tensor(config.state["schedule"]["beta"], ref["hyper_parameters"]["config"].schedule["beta"], "beta")
  assert hyper_ours.state == {"note": "attribute on a dict subclass"}
  metadata = ours["metadata"]
  assert metadata["object_type"] is dict  # an allow-listed class comes back as itself
  assert issubclass(metadata["ref_type"], PickledObject) and metadata["ref_type"].qualified_name == "typing.Any"
  assert metadata["mode"].qualified_name == f"{Mode.__module__}.Mode" and metadata["mode"].args == ("ema",)


def _save(obj, path, new_format):
  torch.save(obj, path, _use_new_zipfile_serialization=new_format)
  return path


@FORMATS
def test_pickled_code_is_never_executed(tmp_path, new_format):
  marker = tmp_path / "marker.txt"
  path = _save({"weights": torch.ones(2), "payload": Dangerous(str(marker)),
                "system": _OsSystemCall(f"touch {marker}")}, tmp_path / "evil.pt", new_format)
  ours = load_torch_file(path)
  assert not marker.exists()
  assert isinstance(ours["payload"], PickledObject)
  # A call of an unknown function becomes a placeholder named after the function, holding the arguments.
  assert ours["payload"].qualified_name == f"{_leave_a_mark.__module__}._leave_a_mark"
  assert ours["payload"].args == (str(marker),)
  assert ours["system"].qualified_name == f"{os.system.__module__}.system"
  assert ours["system"].args == (f"touch {marker}",)
  np.testing.assert_array_equal(ours["weights"], np.ones(2, np.float32))
  # The reference loader (plain pickle semantics) does run it: the test would notice a reader that did.
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_a_pickle_cannot_tamper_with_the_allowed_functions(tmp_path):
  # GLOBAL torch._utils._rebuild_tensor_v2; {"__defaults__": 1}; BUILD: an attempt to rewrite the rebuild function.
  hostile = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__K\x01sb.")
  path = tmp_path / "hostile.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("hostile/data.pkl", hostile)
  with pytest.raises(TorchFileError, match="tries to modify _rebuild_tensor_v2"):
    load_torch_file(path)
  assert_same_tensor(load_torch_file(_save({"x": torch.ones(2)}, tmp_path / "ok.pt", True))["x"], torch.ones(2), "x")


class _OsSystemCall:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


@FORMATS
def test_ddim_runner_list_with_module_prefix_and_optimizer_state(tmp_path, new_format):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 3, 1))
  model_state = collections.OrderedDict(("module." + k, v) for k, v in model.state_dict().items())  # DataParallel
  # Adam's state_dict layout, written out: building a torch.optim optimizer costs seconds of imports.
  optimizer_state = {
      "state": {
          index: {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
          for index, v in enumerate(model_state.values())},
      "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                        "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                        "fused": None, "params": list(range(len(model_state)))}],
  }
  ema_state = {k: v.detach().clone() * 0.999 for k, v in model_state.items()}
  states = [model_state, optimizer_state, 12, 790000, ema_state]
  ours = save_and_compare(states, tmp_path / "ckpt.pth", new_format)
  assert list(ours[0]) == ["module.0.weight", "module.0.bias", "module.2.weight", "module.2.bias"]
  assert ours[1]["param_groups"][0]["betas"] == (0.9, 0.999)


@FORMATS
def test_parameters_tensor_subclasses_and_folder_names(tmp_path, new_format):
  parameter = torch.nn.Parameter(torch.randn(3, 2))
  parameter.custom_attribute = "kept by torch, dropped by us"  # pickled through _rebuild_parameter_with_state
  obj = {"plain_parameter": torch.nn.Parameter(torch.randn(4), requires_grad=False),
         "parameter_with_state": parameter, "buffer": torch.zeros(2, dtype=torch.int64)}
  for name in ("model-790000.ckpt", "ema_0.9999_500000.pt", "a b.pth"):
    ours = load_torch_file(_save(obj, tmp_path / name, new_format))
    ref = torch.load(tmp_path / name, weights_only=False)
    for key in obj:
      assert_same_tensor(ours[key], ref[key], key)
  # A newer pickle protocol (frames, STACK_GLOBAL, MEMOIZE).
  path = tmp_path / "protocol4.pt"
  torch.save(obj, path, _use_new_zipfile_serialization=new_format, pickle_protocol=4)
  ours = load_torch_file(path)
  for key in obj:
    assert_same_tensor(ours[key], obj[key], key)
  assert not is_torchscript_archive(path)
  # torch.save into a buffer names the zip folder "archive".
  buffer = io.BytesIO()
  torch.save(obj, buffer, _use_new_zipfile_serialization=new_format)
  (tmp_path / "from_buffer.bin").write_bytes(buffer.getvalue())
  assert_same_tensor(load_torch_file(tmp_path / "from_buffer.bin")["buffer"], obj["buffer"], "buffer")


@FORMATS
def test_whole_module_numpy_subclass_and_defaultdict(tmp_path, new_format):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2, bias=False))
  model[0].bias = None
  model[1].register_buffer("scratch", torch.ones(3), persistent=False)
  obj = {"model": model, "matrix": np.array([[1, 2], [3, 4]]).view(TaggedArray),
         "counts": collections.defaultdict(list, {"a": [1, 2]})}
  ours = load_torch_file(_save(obj, tmp_path / "whole_model.pt", new_format))
  assert ours["model"].qualified_name == "torch.nn.modules.container.Sequential"
  ours_state = pickled_module_state_dict(ours["model"])
  reference = model.state_dict()
  assert list(ours_state) == list(reference) and "scratch" not in "".join(ours_state)
  for name, value in reference.items():
    assert_same_tensor(ours_state[name], value, name)
  # An ndarray subclass outside the allow-list comes back as a plain ndarray; a defaultdict keeps its items.
  assert type(ours["matrix"]) is np.ndarray and np.array_equal(ours["matrix"], [[1, 2], [3, 4]])
  assert ours["counts"] == {"a": [1, 2]} and isinstance(ours["counts"], collections.defaultdict)
  with pytest.raises(TorchFileError, match="expected a pickled torch.nn.Module"):
    pickled_module_state_dict(ours["counts"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_numpy_1_names_in_old_checkpoints(tmp_path):
  """Files pickled under numpy 1.x name `numpy.core.multiarray`; numpy 2 calls it `numpy._core.multiarray`."""
  obj = {"best": np.float32(0.125), "steps": np.int64(790000), "table": np.arange(4.0), "w": torch.ones(2)}
  data = _save(obj, tmp_path / "new_names.pt", False).read_bytes()
  assert b"numpy._core.multiarray\n" in data  # protocol 2: GLOBAL opcodes are newline-terminated text
  old_names = tmp_path / "old_names.pt"
  old_names.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
  assert_same(load_torch_file(old_names), torch.load(old_names, weights_only=False))


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_big_endian_zip_archive(tmp_path):
  """A zip whose byteorder record says "big": torch byte-swaps on load, and so must we."""
  values = {"f32": torch.randn(3, 4), "i64": torch.arange(-3, 3), "bf16": torch.randn(5).bfloat16(),
            "c64": torch.randn(2, dtype=torch.complex64), "u8": torch.arange(4, dtype=torch.uint8)}
  little = _save(values, tmp_path / "little.pt", True)
  swap_sizes = {}  # storage key -> size of the units torch byte-swaps (complex: each half on its own)
  with zipfile.ZipFile(little) as source:
    prefix = "little/"

    def note(pid):
      storage = pid[1](pid[4])  # an empty storage of the right type and size, so that torch can rebuild
      swap_sizes[pid[2]] = storage.element_size() // (2 if storage.dtype.is_complex else 1)
      return storage

    unpickler = pickle.Unpickler(io.BytesIO(source.read(prefix + "data.pkl")))
    unpickler.persistent_load = note
    unpickler.load()
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as target:
      for info in source.infolist():
        data = source.read(info)
        name = info.filename[len(prefix):]
        if name == "byteorder":
          data = b"big"
        elif name.startswith("data/") and swap_sizes[name[5:]] > 1:
          data = np.frombuffer(data, f"<u{swap_sizes[name[5:]]}").byteswap().tobytes()
        target.writestr("big/" + name, data)
  ref = torch.load(big, weights_only=False)
  ours = load_torch_file(big)
  for key, value in values.items():
    assert torch.equal(ref[key], value), key  # the crafted file is what torch calls big-endian
    assert_same_tensor(ours[key], value, key)


class Block(torch.nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    self.norm = torch.nn.BatchNorm2d(channels)
    self.register_buffer("counter", torch.tensor([3], dtype=torch.int64))
    self.gain = torch.nn.Parameter(torch.randn(channels))  # registered after the submodules

  def forward(self, x):
    return torch.relu(self.norm(self.conv(x))) * self.gain.view(1, -1, 1, 1) + self.counter


class Net(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.stem = torch.nn.Conv2d(3, 4, 3)
    self.blocks = torch.nn.Sequential(Block(4), Block(4))
    self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    self.register_buffer("mean", torch.randn(3).view(1, 3, 1, 1))
    self.temperature = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    self.half_table = torch.nn.Parameter(torch.randn(2, 2).half(), requires_grad=False)
    self.constant = torch.ones(1)  # a plain tensor attribute: not in the state dict
    # After jit.save/jit.load torch lists non-persistent buffers too; the reference decides.
    self.register_buffer("scratch", torch.zeros(5), persistent=False)
    shared = torch.nn.Linear(5, 5)
    self.first, self.second = shared, shared  # one module under two names: listed twice
    self.extras = torch.nn.ModuleList([torch.nn.Linear(5, 5), torch.nn.Identity()])
    self.by_name = torch.nn.ModuleDict({"zeta": torch.nn.Linear(5, 5), "alpha": torch.nn.Linear(5, 5)})

  def forward(self, x):
    y = self.head(self.blocks(self.stem(x - self.mean)))
    for layer in self.extras:
      y = layer(y)
    y = self.first(y) + self.second(y) + self.by_name["zeta"](y) + self.by_name["alpha"](y) + self.scratch
    return y * self.temperature.float() + self.half_table.float().sum() + self.constant


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_state_dict_matches_torch_jit(tmp_path, mode):
  torch.manual_seed(0)
  net = Net().eval()
  for module in net.modules():  # non-trivial running statistics
    if isinstance(module, torch.nn.BatchNorm2d):
      module.running_mean.normal_()
      module.running_var.uniform_(0.5, 2.0)
  if mode == "script":
    compiled = torch.jit.script(net)
  else:  # check_trace re-runs the model through a slow checker; the weights are what matters here
    compiled = torch.jit.trace(net, torch.randn(1, 3, 8, 8), check_trace=False)
  path = tmp_path / f"net_{mode}.pt"
  torch.jit.save(compiled, path)
  reference = torch.jit.load(path).state_dict()
  ours = load_torchscript_state_dict(path)
  assert list(ours) == list(reference)
  assert "constant" not in ours and list(ours)[:4] == ["temperature", "half_table", "mean", "scratch"]
  assert "second.weight" in ours and list(ours)[-2:] == ["by_name.alpha.weight", "by_name.alpha.bias"]
  for name, value in reference.items():
    assert_same_tensor(ours[name], value, name)
  assert is_torchscript_archive(path)
  with pytest.raises(TorchFileError, match="load_torchscript_state_dict"):
    load_torch_file(path)


def test_real_fid_network_torchscript(fid_torchscript_path):
  reference = torch.jit.load(fid_torchscript_path).state_dict()
  ours = load_torchscript_state_dict(fid_torchscript_path)
  assert list(ours) == list(reference)
  assert len(ours) == 4 * 94  # 94 conv+BN groups: weight, beta, mean, var
  for name, value in reference.items():
    assert_same_tensor(ours[name], value, name)


def test_bad_inputs_give_one_clear_error(tmp_path):
  missing = tmp_path / "nowhere.pt"
  with pytest.raises(TorchFileError, match=r"nowhere\.pt: no such file"):
    load_torch_file(missing)
  with pytest.raises(TorchFileError, match=r"nowhere\.pt: no such file"):
    load_torchscript_state_dict(missing)

  text = tmp_path / "notes.txt"
  text.write_text("this is a text file, not weights\n")
  with pytest.raises(TorchFileError, match=r"notes\.txt is not a PyTorch file: expected a zip archive"):
    load_torch_file(text)
  with pytest.raises(TorchFileError, match=r"notes\.txt is not a TorchScript archive"):
    load_torchscript_state_dict(text)

  plain_pickle = tmp_path / "plain.pkl"
  plain_pickle.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
  with pytest.raises(TorchFileError, match="is not a PyTorch file"):
    load_torch_file(plain_pickle)

  state = {"w": torch.randn(64, 64), "b": torch.randn(64)}
  whole_zip = _save(state, tmp_path / "whole.pt", True).read_bytes()
  truncated_zip = tmp_path / "truncated.pt"
  truncated_zip.write_bytes(whole_zip[: len(whole_zip) // 2])
  with pytest.raises(TorchFileError, match=r"truncated\.pt starts like a zip archive .* truncated or corrupt"):
    load_torch_file(truncated_zip)

  whole_legacy = _save(state, tmp_path / "whole_legacy.pt", False).read_bytes()
  for cut in (len(whole_legacy) // 2, 300, len(whole_legacy) - 1):
    truncated_legacy = tmp_path / f"truncated_legacy_{cut}.pt"
    truncated_legacy.write_bytes(whole_legacy[:cut])
    with pytest.raises(TorchFileError, match=rf"truncated_legacy_{cut}\.pt.*truncated"):
      load_torch_file(truncated_legacy)

  with pytest.raises(TorchFileError, match="load_torch_file"):
    load_torchscript_state_dict(tmp_path / "whole.pt")
  with pytest.raises(TorchFileError, match="is a directory"):
    load_torch_file(tmp_path)
  empty = tmp_path / "empty.pt"
  empty.write_bytes(b"")
  with pytest.raises(TorchFileError, match="is empty"):
    load_torch_file(empty)
