"""Shared fixtures: a tiny trained digits teacher and a tiny run config."""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for path in (ROOT, TESTS):  # the repository (configs/) and tests/ (shared helpers)
  if path not in sys.path:
    sys.path.insert(0, path)

# A persistent XLA compilation cache shared by the test processes (and the subprocesses
# they start): many tests compile the same tiny training step. Set before JAX compiles.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
  """A ResNet-8 trained for 3 epochs on the digits, saved as an orbax directory."""
  from dfq_jax.models import convert, get_model
  from dfq_jax.models.demo_teacher import train_teacher

  model = get_model("resnet8_cifar", num_classes=10)
  variables = train_teacher(model, seed=0, epochs=3)
  path = str(tmp_path_factory.mktemp("teacher") / "resnet8_digits")
  convert.save_variables(variables, path)
  return path
