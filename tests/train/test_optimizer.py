"""Parameter groups, per-group learning rates and the linear schedule (optax reference values)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.train import optimizer


def _params():
  return {"banks": {"down_0": {"conv1": {"a": jnp.ones((1, 3, 3, 4, 2)), "b": jnp.zeros((1, 2, 5))}}},
          "router": {"head": {"kernel": jnp.ones((3, 2))}},
          "quant": {"layer_0000": {"act_maxval": jnp.ones(()), "act_zero_point": jnp.zeros(()),
                                   "weight_maxval": jnp.ones((5,))},
                    "layer_0001": {"rhs_act_maxval": jnp.ones(())}}}


def test_every_leaf_gets_its_group():
  groups = optimizer.param_groups(_params())
  assert groups["banks"]["down_0"]["conv1"] == {"a": "lora", "b": "lora"}
  assert groups["router"]["head"]["kernel"] == "router"
  assert groups["quant"]["layer_0000"] == {"act_maxval": "act_quant", "act_zero_point": "act_quant",
                                           "weight_maxval": "weight_scale"}
  assert groups["quant"]["layer_0001"]["rhs_act_maxval"] == "act_quant"


def test_group_learning_rates_and_linear_decay():
  lrs = {"lora": 1e-2, "router": 1e-3, "weight_scale": 0.0, "act_quant": 5e-4}
  config = optimizer.OptimizerConfig(learning_rates=lrs, num_steps=10)
  tx = optimizer.make_optimizer(config)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every parameter by -lr (bias-corrected m/sqrt(v) = 1 for a constant gradient).
  np.testing.assert_allclose(updates["banks"]["down_0"]["conv1"]["a"], -1e-2, rtol=1e-4)
  np.testing.assert_allclose(updates["router"]["head"]["kernel"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["quant"]["layer_0000"]["act_maxval"], -5e-4, rtol=1e-4)
  np.testing.assert_array_equal(updates["quant"]["layer_0000"]["weight_maxval"], 0.0)  # lr 0: frozen
  schedule = optimizer.learning_rate_schedule(1.0, config)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-7)


def test_bad_groups_are_errors():
  with pytest.raises(ValueError, match="Unknown parameter groups"):
    optimizer.OptimizerConfig(learning_rates={"lora": 1, "router": 1, "weight_scale": 1, "act_quant": 1,
                                              "base": 1}, num_steps=1)
  with pytest.raises(ValueError, match="missing"):
    optimizer.OptimizerConfig(learning_rates={"lora": 1}, num_steps=1)
