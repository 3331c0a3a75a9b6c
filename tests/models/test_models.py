"""Shapes, variable counts and quantization hooks of the model zoo (no torch needed)."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax.models import MODELS, get_model
from dfq_jax.models.convert import abstract_variables
from dfq_jax.quant import QuantPolicy

# name -> (num_classes, input size, trainable parameters, BN layers, ReLU/ReLU6 layers).
# Parameter counts are the published ones: pytorchcv metainfo (resnet20_cifar10 272,474,
# resnet18 11,689,512, resnet50 25,557,032, mobilenetv2_w1 3,504,960), torchvision
# (resnet34 21,797,672, mobilenet_v2 3,504,872) and akamaster (resnet20 0.27M = 269,722).
EXPECTED = {
  "resnet20_cifar": (10, 32, 269_722, 19, 19),
  "resnet56_cifar": (10, 32, 853_018, 55, 55),  # +2,752 with option B = 855,770
  "resnet18": (1000, 64, 11_689_512, 20, 17),
  "resnet34": (1000, 64, 21_797_672, 36, 33),
  "resnet50": (1000, 64, 25_557_032, 53, 49),
  "resnet50_torchvision": (1000, 64, 25_557_032, 53, 49),
  "mobilenetv2": (1000, 64, 3_504_960, 53, 36),
  "mobilenetv2_torchvision": (1000, 64, 3_504_872, 52, 35),
}
QUANT = QuantPolicy(w_bits=4, a_bits=4)
FP32 = QuantPolicy(w_bits=32, a_bits=32)


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _n_layers(collection):
  """Number of layers holding variables in a collection (leaf dicts)."""
  flat = flax.traverse_util.flatten_dict(collection)
  return len({k[:-1] for k in flat})


def random_variables(model, input_shape, seed=0):
  """Random but well-scaled teacher variables, without running (slow, eager) model.init."""
  abstract = flax.traverse_util.flatten_dict(abstract_variables(model, input_shape))
  rng = np.random.default_rng(seed)
  out = {}
  for path, spec in abstract.items():
    leaf = path[-1]
    if leaf == "kernel":
      v = rng.normal(size=spec.shape) * math.sqrt(2.0 / math.prod(spec.shape[:-1]))
    elif leaf in ("scale", "var"):
      v = rng.uniform(0.5, 1.5, size=spec.shape)
    else:  # bias, mean
      v = rng.normal(size=spec.shape) * 0.1
    out[path] = jnp.asarray(v, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def test_registry_keeps_cifar_names():
  for name in (
    "resnet8_cifar",
    "resnet20_cifar",
    "resnet32_cifar",
    "resnet44_cifar",
    "resnet56_cifar",
    "resnet18",
    "resnet50",
    "mobilenetv2",
    "mobilenetv2_torchvision",
    "resnet50_torchvision",
  ):
    assert name in MODELS
  with pytest.raises(ValueError, match="unknown"):
    get_model("resnet19", num_classes=10)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_variable_counts_and_output_shape(name):
  classes, size, n_params, n_bn, n_relu = EXPECTED[name]
  shape = (2, size, size, 3)
  teacher = get_model(name, num_classes=classes)
  v = abstract_variables(teacher, shape)
  assert _count(v["params"]) == n_params
  assert _n_layers(v["batch_stats"]) == n_bn
  out = jax.eval_shape(teacher.apply, v, jnp.zeros(shape))
  assert out.shape == (2, classes)
  # One QuantAct (3 scalars: x_min, x_max, beta_t) after every ReLU/ReLU6.
  student = get_model(name, num_classes=classes, quant=QUANT)
  sv = jax.eval_shape(lambda: student.init(jax.random.key(0), jnp.zeros(shape)))
  assert _n_layers(sv["quant_stats"]) == n_relu
  assert _count(sv["quant_stats"]) == 3 * n_relu
  # The student has the same params/batch_stats as the teacher.
  assert jax.tree.map(lambda a: a.shape, {k: sv[k] for k in v}) == jax.tree.map(
    lambda a: a.shape, v
  )


def test_first_and_last_roles_and_layer_names():
  # The policy's first/last bits must reach the stem conv and the classifier.
  for name, first, last in [
    ("resnet18", "conv1", "fc"),
    ("mobilenetv2", "stem_conv", "classifier"),
  ]:
    model = get_model(name, num_classes=10)
    params = abstract_variables(model, (1, 64, 64, 3))["params"]
    assert first in params and last in params
  q = QuantPolicy(w_bits=4, a_bits=4, first_bits=8, last_bits=8)
  assert q.weight_bits("conv1", "first") == 8 and q.weight_bits("fc", "last") == 8


def test_bottleneck_stride_placement():
  def strides_of(conv1_stride):
    model = get_model("resnet50", num_classes=10, conv1_stride=conv1_stride)
    _, state = jax.eval_shape(
      lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)), capture_intermediates=True
      )
    )
    inter = state["intermediates"]["layer2_0"]
    return inter["conv1"]["__call__"][0].shape[1], inter["conv2"]["__call__"][0].shape[1]

  assert strides_of(True) == (8, 8)  # 16x16 input of layer2: stride on the 1x1
  assert strides_of(False) == (16, 8)  # stride on the 3x3 (torchvision v1.5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_full_precision_policy_equals_teacher(name):
  shape = (2, 32, 32, 3)
  teacher = get_model(name, num_classes=10)
  student = get_model(name, num_classes=10, quant=FP32)
  v = random_variables(teacher, shape)
  x = jax.random.normal(jax.random.key(1), shape)
  logits = jax.jit(teacher.apply)(v, x)
  assert np.all(np.isfinite(logits)) and float(jnp.std(logits)) > 0
  np.testing.assert_array_equal(logits, jax.jit(student.apply)(v, x))


def test_quantized_mobilenet_runs_and_updates_ranges():
  shape = (2, 32, 32, 3)
  v = random_variables(get_model("mobilenetv2", num_classes=10), shape)
  x = jax.random.normal(jax.random.key(1), shape)
  student = get_model("mobilenetv2", num_classes=10, quant=QUANT)
  qs = jax.eval_shape(lambda: student.init(jax.random.key(0), x))["quant_stats"]
  qs = jax.tree_util.tree_map_with_path(  # fresh ranges: x_min = x_max = 0, beta_t = 1
    lambda p, s: jnp.full(s.shape, 1.0 if p[-1].key == "beta_t" else 0.0, s.dtype), qs
  )
  logits, upd = jax.jit(lambda v, x: student.apply(v, x, mutable=["quant_stats"]))(
    {**v, "quant_stats": qs}, x
  )
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
  x_max = [
    float(a)
    for p, a in jax.tree_util.tree_leaves_with_path(upd["quant_stats"])
    if p[-1].key == "x_max"
  ]
  assert len(x_max) == EXPECTED["mobilenetv2"][4] and min(x_max) > 0
