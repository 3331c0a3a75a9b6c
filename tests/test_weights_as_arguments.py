"""No compiled program of a run holds the networks' weights as constants.

A jitted function that closes over weights makes XLA compile them as constants: slow to
compile (a ResNet-50's 23M weights took ~100 s instead of ~2 s) and recompiled for other
weights. Every program a run lowers (calibration, the trainer's init and teacher-statistics
programs, the training step, evaluation, the PTQ synthesis) is dumped as StableHLO
(`jax_dump_ir_to`) and searched for large dense constants.
"""

import glob
import os
import re

import jax
import pytest
from dfq_test_utils import tiny_config

from dfq_jax import run as run_lib

# The smallest kernel of the ResNet-8 teacher (3x3x3x16 float32) is 1,728 bytes.
LARGEST_ALLOWED_BYTES = 1024
_DENSE_HEX = re.compile(r'dense<"0x([0-9A-Fa-f]+)">')


@pytest.fixture
def ir_dump_dir(tmp_path):
  path = str(tmp_path / "ir")
  old = jax.config.read("jax_dump_ir_to")
  jax.config.update("jax_dump_ir_to", path)
  try:
    yield path
  finally:
    jax.config.update("jax_dump_ir_to", old)


def _large_constants(dump_dir):
  """{module file: [constant bytes, ...]} of the constants over the limit."""
  found = {}
  for path in sorted(glob.glob(os.path.join(dump_dir, "*.mlir"))):
    with open(path) as f:
      sizes = [len(h) // 2 for h in _DENSE_HEX.findall(f.read())]
    big = [s for s in sizes if s > LARGEST_ALLOWED_BYTES]
    if big:
      found[os.path.basename(path)] = big
  return found


def test_the_detector_finds_closed_over_weights(ir_dump_dir):
  weights = jax.numpy.arange(1000.0)
  jax.jit(lambda x: x * weights)(jax.numpy.ones(1000))
  assert list(_large_constants(ir_dump_dir).values()) == [[4000]]


MIXED = {
  "quant.a_bits": 8,
  "quant.mixed.budget_w_bits": 3.0,
  "quant.mixed.source": "noise",
  "quant.mixed.images": 16,
  "quant.mixed.refine": 1,
}


@pytest.mark.parametrize(
  "method, values, programs",
  [
    # DSG's margins come from the teacher-statistics program; `lambda` is the state init.
    ("dsg", {}, ["jit_update", "jit_teacher_bn_stats", "jit__lambda", "jit_step_fn"]),
    ("dsg_ptq", {}, ["jit_update", "jit_step"]),
    ("eval", MIXED, ["jit_update", "jit_kl_rows"]),  # the mixed-precision probe, refinement
  ],
)
def test_no_program_of_a_run_compiles_weights_as_constants(
  tiny_teacher_dir, tmp_path, ir_dump_dir, method, values, programs
):
  config = tiny_config(tiny_teacher_dir, method, total_steps=4, eval_every_steps=4, **values)
  config.ptq.steps, config.ptq.batch_size = 2, 8
  run_lib.run(config, str(tmp_path / "run"), log=lambda *a: None)
  names = " ".join(os.listdir(ir_dump_dir))
  for program in programs:
    assert program in names, program
  assert _large_constants(ir_dump_dir) == {}
