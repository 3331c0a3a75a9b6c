"""On a machine with a GPU: one training step on the GPU equals the same step on the CPU.

Skipped where JAX sees no GPU (CI); launch/gpu_check.sh runs it on GPU machines. Matmuls and
convs run at full float32 precision for the comparison (XLA:GPU's default may use TF32).
"""

import jax
import numpy as np
import pytest
from dfq_test_utils import tiny_config

from dfq_jax import networks, parallel, trainer
from dfq_jax.models import teacher as teacher_lib


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


@pytest.mark.skipif(not _gpus(), reason="no GPU visible to JAX")
@pytest.mark.parametrize("method", ["gdfq", "dsg", "adadfq"])
def test_training_steps_on_gpu_equal_cpu(tiny_teacher_dir, method):
  config = tiny_config(tiny_teacher_dir, method)
  models = networks.build_models(config, teacher_lib.load_teacher(config))
  runs = {}
  with jax.default_matmul_precision("highest"):
    for name, devices in (("gpu", _gpus()[:1]), ("cpu", jax.devices("cpu")[:1])):
      setup = trainer.setup_training(config, models, devices=devices)
      state, rows = setup.state, []
      for step in range(4):
        state, metrics = setup.step_fn(
          state, setup.teacher_vars, setup.constants, *setup.timeline.phase(step)
        )
        rows.append(parallel.to_host(metrics))
      runs[name] = (rows, parallel.to_host(state["student"]["params"]))
  for step, (g, c) in enumerate(zip(runs["gpu"][0], runs["cpu"][0])):
    for key in c:
      np.testing.assert_allclose(g[key], c[key], rtol=2e-3, atol=1e-5, err_msg=f"{step} {key}")
  for g, c in zip(jax.tree.leaves(runs["gpu"][1]), jax.tree.leaves(runs["cpu"][1])):
    np.testing.assert_allclose(g, c, rtol=2e-3, atol=1e-5)
