"""The issue's acceptance checks on real data: the akamaster ResNet-20 on the CIFAR-10 JPEG
test set (../shared), through the CLI's code path. Skipped where shared/ is absent."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
WEIGHTS = os.path.join(SHARED, "models", "resnet20_cifar10_akamaster.th")
DATA = os.path.join(SHARED, "data", "cifar10-jpeg")

pytestmark = pytest.mark.skipif(
  not (os.path.exists(WEIGHTS) and os.path.isdir(DATA)),
  reason="needs ../shared (akamaster weights, CIFAR-10 JPEGs)",
)


def test_fp_is_81_03_and_w8a8_within_half_a_point(tmp_path):
  pytest.importorskip("torch")
  from dfq_test_utils import load_config

  from dfq_jax import run as run_lib

  config = load_config("cifar10_resnet20.py", "eval,w8a8")
  config.teacher.weights = WEIGHTS
  config.data.root = DATA
  results = run_lib.run(config, str(tmp_path / "w8a8"), log=lambda *a: None)
  assert results["eval_images"] == 10000
  assert results["fp_top1"] == pytest.approx(81.03, abs=1e-6)  # PyTorch: 8103 / 10000
  assert abs(results["quant_top1"] - results["fp_top1"]) < 0.5
  assert results["agreement"] > 97.0
  # The converted teacher was kept: a run from it needs no torch.
  assert os.path.isdir(tmp_path / "w8a8" / "teacher")


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_bn_folding_commutes_with_per_channel_weight_quantization(bits, mode):
  """Q(γ ⊙ W) = γ ⊙ Q(W) for every conv + BN of the real ResNet-20, also for γ < 0: min and
  max scale by |γ| (and swap for γ < 0), so the per-channel grid scales with the weights
  and round-half-even is odd-symmetric. It fails only at float32 rounding: a weight whose
  s w lies within an ulp of a rounding tie, or a grid shifted by one step where
  s (hi - lo) is not exactly 2^k - 1 in float32. So export folds the factor into the
  dequantization scale of dfq_jax's own integers instead of re-quantizing."""
  pytest.importorskip("torch")
  import jax.numpy as jnp
  import numpy as np
  from dfq_test_utils import load_config

  from dfq_jax.models import teacher as teacher_lib
  from dfq_jax.quant import numerics

  config = load_config("cifar10_resnet20.py", "eval")
  config.teacher.weights = WEIGHTS
  variables = teacher_lib.load_teacher(config)
  params, stats = variables["params"], variables["batch_stats"]
  pairs = [("conv1", "bn1")] + [
    (f"{block}/conv{i}", f"{block}/bn{i}")
    for block in sorted(k for k in params if k.startswith("layer"))
    for i in (1, 2)
  ]

  def node(tree, path):
    for part in path.split("/"):
      tree = tree[part]
    return tree

  total = equal = negative = 0
  for conv, bn in pairs:
    w = np.asarray(node(params, conv)["kernel"], np.float32)
    p, s = node(params, bn), node(stats, bn)
    gamma = np.asarray(p["scale"]) / np.sqrt(np.asarray(s["var"]) + 1e-5)
    negative += int((gamma < 0).sum())
    folded_then_q = np.asarray(numerics.quantize_weight(jnp.asarray(w * gamma), bits, mode))
    q_then_folded = np.asarray(numerics.quantize_weight(jnp.asarray(w), bits, mode)) * gamma
    step = np.abs(w * gamma).max(axis=(0, 1, 2)) / 2 ** (bits - 1)
    close = np.abs(folded_then_q - q_then_folded) <= 1e-4 * step
    total, equal = total + close.size, equal + int(close.sum())
  assert negative > 0  # the real network has negative BN factors: both signs are covered
  print(f"W{bits} {mode}: {total - equal} of {total} weights differ, {negative} BN factors < 0")
  assert equal / total > 0.9999, (equal, total)
