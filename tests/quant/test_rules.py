"""Layer selection: regex over '/'-joined module paths, module types (with subclasses), first match wins."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from msfp_jax.models.attention import MatMul
from msfp_jax.quant import InvalidQuantConfigError, QuantConfig, QuantRule, RuleMatchError, discover_layers


class MyDense(nn.Dense):
  """A subclass: still a "Dense" for the rules."""


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3, 3), name="conv")(x)
    h = nn.GroupNorm(num_groups=2, name="norm")(h)
    return MyDense(8, name="proj")(nn.silu(h))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3, 3), name="conv_in")(x)
    h = Block(name="block_0")(h)
    b, hh, ww, c = h.shape
    tokens = h.reshape(b, hh * ww, c)
    scores = MatMul("bqc,bkc->bqk", name="qk_matmul")(tokens, tokens)
    tokens = MatMul("bqk,bkc->bqc", name="av_matmul")(jax.nn.softmax(scores), tokens)
    return nn.Dense(3, name="dense_out")(tokens.reshape(b, hh, ww, c))


@pytest.fixture(scope="module")
def net():
  model = Net()
  x = jnp.ones((1, 4, 4, 3))
  return model, model.init(jax.random.key(0), x), x


def test_default_quantizes_every_conv_and_dense_but_not_matmuls(net):
  model, variables, x = net
  layers = discover_layers(model, variables, x)
  quantized = [p for p, info in layers.items() if info.quantized]
  assert quantized == ["conv_in", "block_0/conv", "block_0/proj", "dense_out"]  # call order
  assert layers["block_0/proj"].module_type == "MyDense"
  assert layers["block_0/conv"].kernel_shape == (3, 3, 8, 8)
  assert (layers["block_0/conv"].weight_bits, layers["block_0/conv"].act_bits) == (4, 4)
  assert not layers["qk_matmul"].quantized and layers["qk_matmul"].is_matmul
  assert "block_0/norm" not in layers  # GroupNorm is not a candidate


def test_first_match_wins_and_fullmatch(net):
  model, variables, x = net
  config = QuantConfig(weight_bits=4, act_bits=6, rules=(
      QuantRule(path="conv_in|dense_out", weight_bits=8, act_bits=8),
      QuantRule(path="block_0/.*", module_types=("Dense",), keep_fp=True),
      QuantRule(path=".*conv.*", act_bits=5, sign_mode="signed"),  # would also match conv_in: the first rule wins
  ))
  layers = discover_layers(model, variables, x, config=config)
  assert (layers["conv_in"].weight_bits, layers["conv_in"].act_bits) == (8, 8)
  assert (layers["dense_out"].weight_bits, layers["dense_out"].act_bits) == (8, 8)
  assert not layers["block_0/proj"].quantized  # subclass of nn.Dense matched by type name "Dense"
  assert (layers["block_0/conv"].weight_bits, layers["block_0/conv"].act_bits) == (4, 5)
  assert layers["block_0/conv"].sign_mode == "signed" and layers["conv_in"].sign_mode == "search"


def test_rule_enables_attention_matmuls(net):
  model, variables, x = net
  config = QuantConfig(rules=(QuantRule(path=".*_matmul", module_types=("MatMul",), act_bits=8),))
  layers = discover_layers(model, variables, x, config=config)
  for name in ("qk_matmul", "av_matmul"):
    assert layers[name].quantized and layers[name].act_bits == 8 and layers[name].weight_bits is None
  assert layers["conv_in"].quantized  # unmatched Conv/Dense keep the default


def test_rule_matching_nothing_lists_the_module_paths(net):
  model, variables, x = net
  config = QuantConfig(rules=(QuantRule(path="conv", weight_bits=8),))  # fullmatch: "conv" != "conv_in"
  with pytest.raises(RuleMatchError) as info:
    discover_layers(model, variables, x, config=config)
  message = str(info.value)
  assert "QuantRule(path='conv'" in message
  for path in ("conv_in", "block_0/conv", "block_0/norm", "block_0/proj", "qk_matmul", "dense_out"):
    assert path in message
  # A path that exists but a type the rule does not name also matches nothing.
  with pytest.raises(RuleMatchError, match="dense_out"):
    discover_layers(model, variables, x, config=QuantConfig(rules=(QuantRule(path="dense_out",
                                                                             module_types=("Conv",)),)))


def test_rule_selecting_a_module_without_kernel_is_an_error(net):
  model, variables, x = net
  with pytest.raises(RuleMatchError, match="no 'kernel' parameter"):
    discover_layers(model, variables, x, config=QuantConfig(rules=(QuantRule(path=".*norm",
                                                                             module_types=("GroupNorm",)),)))


def test_invalid_rules_are_errors():
  with pytest.raises(InvalidQuantConfigError, match="regular expression"):
    QuantRule(path="conv[")
  with pytest.raises(InvalidQuantConfigError, match="weight_bits"):
    QuantRule(weight_bits=0)
  with pytest.raises(InvalidQuantConfigError, match="sign_mode"):
    QuantRule(sign_mode="maybe")
  assert QuantRule(module_types="Conv").module_types == ("Conv",)


def test_rules_round_trip_through_dicts():
  config = QuantConfig(kind="int", rules=(QuantRule(path="a.*", module_types=("Conv",), weight_bits=8),
                                          QuantRule(path="b", keep_fp=True)))
  assert QuantConfig.from_dict(config.to_dict()) == config
