"""Tests of the quantized linen layers and the QuantPolicy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax.models import get_model
from dfq_jax.quant import QuantPolicy, numerics


def _init(model, shape=(2, 32, 32, 3)):
  return model.init(jax.random.key(0), jnp.zeros(shape))


def test_policy_rules_first_last_and_fp():
  p = QuantPolicy(
    w_bits=4,
    a_bits=3,
    first_bits=8,
    last_bits=8,
    rules=((r"layer3_2/conv2", 2, None), (r"layer1_0/act1", None, 32)),
  )
  assert p.weight_bits("conv1", "first") == 8
  assert p.weight_bits("linear", "last") == 8
  assert p.weight_bits("layer3_2/conv2") == 2
  assert p.weight_bits("layer3_1/conv2") == 4
  assert p.act_bits("layer1_0/act1") is None
  assert p.act_bits("layer1_0/act2") == 3


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(w_bits=1),
    dict(a_bits=9),
    dict(first_bits=0),
    dict(rules=(("x", 33, None),)),
    dict(range_mode="foo"),
    dict(rules=(("(", 4, 4),)),
  ],
)
def test_policy_rejects_bad_values(kwargs):
  with pytest.raises(ValueError):
    QuantPolicy(**kwargs)


def test_full_precision_policy_equals_teacher():
  teacher = get_model("resnet20_cifar", num_classes=10)
  fp_student = get_model("resnet20_cifar", num_classes=10, quant=QuantPolicy(w_bits=32, a_bits=32))
  v = _init(teacher)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  np.testing.assert_array_equal(teacher.apply(v, x), fp_student.apply(v, x))


def test_student_weights_are_per_channel_quantized_and_ranges_update():
  quant = QuantPolicy(w_bits=2, a_bits=4, range_mode="minmax")
  student = get_model("resnet8_cifar", num_classes=10, quant=quant)
  v = _init(student)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  # Frozen (immutable) ranges at their initial zeros: every activation collapses to 0,
  # so the logits equal the classifier's bias.
  logits = student.apply(v, x)
  np.testing.assert_allclose(
    logits, jnp.broadcast_to(v["params"]["linear"]["bias"], logits.shape), atol=1e-5
  )
  _, upd = student.apply(v, x, mutable=["quant_stats"])
  act = upd["quant_stats"]["act1"]
  assert float(act["x_min"]) == 0.0 and float(act["x_max"]) > 0.0
  assert float(act["beta_t"]) == pytest.approx(0.9)
  # The stem conv kernel seen by the student has at most 4 levels per output channel.
  k = v["params"]["conv1"]["kernel"]
  kq = numerics.quantize_weight(k, 2)
  for c in range(k.shape[-1]):
    assert len(np.unique(np.asarray(kq[..., c]))) <= 4


def test_student_gradient_flows_through_ste():
  student = get_model("resnet8_cifar", num_classes=10, quant=QuantPolicy(w_bits=3, a_bits=3))
  v = _init(student)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  _, upd = student.apply(v, x, mutable=["quant_stats"])
  v = {**v, **upd}
  g = jax.grad(lambda p: jnp.sum(student.apply({**v, "params": p}, x) ** 2))(v["params"])
  norms = jax.tree.map(lambda a: float(jnp.linalg.norm(a)), g)
  assert norms["conv1"]["kernel"] > 0 and norms["layer3_0"]["conv2"]["kernel"] > 0
  gx = jax.grad(lambda x: jnp.sum(student.apply(v, x) ** 2))(x)
  assert float(jnp.linalg.norm(gx)) > 0
