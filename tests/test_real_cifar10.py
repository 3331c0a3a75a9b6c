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
