"""config.compute_dtype: convs and matmuls in bfloat16 with float32 accumulation, the rest
float32; the float32 default is exactly the computation it always was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dfq_test_utils import tiny_config

from dfq_jax import config_base, networks, trainer
from dfq_jax.models import get_model
from dfq_jax.models import teacher as teacher_lib
from dfq_jax.quant import QuantPolicy
from dfq_jax.quant.layers import QConv, QDense


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("layer", ["conv", "dense"])
def test_bf16_layers_accumulate_in_float32_and_return_float32(layer):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 64) if layer == "conv" else (4, 512))
  make = (
    (lambda dt: QConv(32, (3, 3), dtype=dt))
    if layer == "conv"
    else (lambda dt: QDense(32, dtype=dt))
  )
  params = make(None).init(jax.random.key(1), x)
  y32 = make(None).apply(params, x)
  y16 = make(jnp.bfloat16).apply(params, x)
  assert y16.dtype == jnp.float32
  # Reference: the same bf16-rounded inputs and weights, summed exactly in float64.
  rounded = jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64), params)
  xr = np.asarray(x.astype(jnp.bfloat16), np.float64)
  ref = make(None).apply(rounded, xr.astype(np.float32))
  # float32 accumulation of the bf16 products (bf16 accumulation would be ~1e-2 off; XLA:CPU
  # blocks its dot sums, which leaves ~1e-4)
  assert _rel(y16, ref) < 1e-3
  assert 1e-4 < _rel(y16, y32) < 2e-2  # what bf16 rounding of the operands costs


def test_bf16_student_logits_follow_float32():
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  policy = QuantPolicy(w_bits=8, a_bits=8, range_mode="minmax")
  f32 = get_model("resnet20_cifar", num_classes=10, quant=policy)
  bf16 = get_model("resnet20_cifar", num_classes=10, quant=policy, dtype=jnp.bfloat16)
  variables = f32.init(jax.random.key(1), x)
  a, _ = f32.apply(variables, x, mutable=["quant_stats"])
  b, _ = bf16.apply(variables, x, mutable=["quant_stats"])
  assert b.dtype == jnp.float32 and _rel(b, a) < 0.1


def test_bf16_training_step_runs_and_tracks_float32(tiny_teacher_dir):
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config(tiny_teacher_dir, "adadfq", compute_dtype=dtype)
    models = networks.build_models(config, teacher_lib.load_teacher(config))
    setup = trainer.setup_training(config, models)
    state, metrics = setup.step_fn(setup.state, setup.teacher_vars, setup.constants, False, True)
    losses[dtype] = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # Ranges, parameters and optimizer state stay float32.
    leaves = jax.tree.leaves((state["gen"], state["student"]))
    assert all(a.dtype == jnp.float32 for a in leaves if jnp.issubdtype(a.dtype, jnp.floating))
  for key in ("generator/loss", "student/loss"):
    assert np.isfinite(losses["bfloat16"][key])
    assert abs(losses["bfloat16"][key] - losses["float32"][key]) < 0.05 * abs(
      losses["float32"][key]
    ), key


def test_float32_default_leaves_the_layers_uncast():
  """compute_dtype=float32 gives dtype None: no casts, the computation of before."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  layer = QConv(8, (3, 3))
  params = layer.init(jax.random.key(1), x)
  plain = jax.lax.conv_general_dilated(
    x,
    params["params"]["kernel"],
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_array_equal(layer.apply(params, x), plain)
  assert teacher_lib.teacher_model(config_base.base_config()).dtype is None
