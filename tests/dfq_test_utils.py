"""Helpers shared by the tests (a module of its own: `conftest` names collide)."""


def tiny_config(teacher_dir, method="gdfq", parity=False, **overrides):
  """The demo config shrunk to a few steps of a small generator on 64 eval images."""
  from configs import demo as demo_config

  c = demo_config.get_config(f"{method},w4a4" + (",parity" if parity else ""))
  c.teacher.layout = "orbax"
  c.teacher.weights = teacher_dir
  c.data.limit = 64
  c.data.eval_batch_size = 64
  c.calib.batch_size = 16
  c.generator.width = 16
  c.batch_size = 8
  c.total_steps = 8
  c.min_phase_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.ckpt_every_steps = 2
  c.sample_every_steps = 4
  return set_values(c, **overrides)


def set_values(c, **values):
  """Sets dotted keys ('calib.method') of config `c` in place; returns `c`."""
  for key, value in values.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def load_config(name, arg=None):
  """`configs/<name>`'s get_config(arg), loaded by path as the CLI does."""
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def assert_close_to_scale(a, b, rtol=1e-5):
  """Max |a - b| within `rtol` of max |b| (for values with entries near zero)."""
  import numpy as np

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  scale = max(np.abs(b).max(), 1e-30)
  assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


def conv_inputs(b, h, w, ci, co, seed=0, out_scale=1):
  """x [b,h,w,ci], a 3x3 kernel, bias [co] and an output cotangent of side `out_scale` x."""
  import jax
  import numpy as np

  kx, kk, kb, kd = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (b, h, w, ci))
  kernel = jax.random.normal(kk, (3, 3, ci, co)) / np.sqrt(9 * ci)
  bias = jax.random.normal(kb, (co,))
  dy = jax.random.normal(kd, (b, out_scale * h, out_scale * w, co))
  return x, kernel, bias, dy


def cli_error(workdir, *args) -> str:
  """Runs `python -m dfq_jax.main ARGS --workdir=WORKDIR` expecting bad input: asserts
  exit code 2, no traceback and exactly one `error:` line on stderr; returns that line."""
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, "-m", "dfq_jax.main", *args, f"--workdir={workdir}"],
    capture_output=True,
    text=True,
    cwd=root,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  return errors[0]


def tiny_cli_args(teacher_dir, method="dsg") -> list[str]:
  """`tiny_config` as command-line arguments (the demo config, an orbax teacher)."""
  return [
    f"--config=configs/demo.py:{method},w4a4",
    "--config.teacher.layout=orbax",
    f"--config.teacher.weights={teacher_dir}",
    "--config.data.limit=64",
    "--config.total_steps=8",
  ]


def perturbed_student(name, policy, shortcut="A", negative_gamma=True, size=16):
  """(student, calibrated variables, images) of model `name` with random weights, BN
  made non-trivial (shifted statistics, some scales negative) and ranges calibrated on
  N(0, 1) images [64 (CIFAR) or 16, size, size, 3]."""
  import jax
  import jax.numpy as jnp

  from dfq_jax.models import get_model
  from dfq_jax.quant.calibration import calibrated_student

  kwargs = {"shortcut": shortcut} if name.endswith("_cifar") else {}
  teacher = get_model(name, num_classes=10, **kwargs)
  student = get_model(name, num_classes=10, quant=policy, **kwargs)
  # Jitted: eagerly, every layer op of a ResNet-50 compiles on its own (minutes, cold cache).
  tv = jax.jit(teacher.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  keys = iter(list(jax.random.split(jax.random.key(3), 1000)))  # concrete, used in jit

  def perturb(path, a):
    key = jax.tree_util.keystr(path)
    if "bn" not in key:
      return a
    if "scale" in key and negative_gamma:
      return a * jnp.where(jax.random.uniform(next(keys), a.shape) < 0.2, -1.0, 1.0)
    return a + 0.3 * jax.random.uniform(next(keys), a.shape)

  tv = jax.jit(
    lambda tv: {
      "params": jax.tree_util.tree_map_with_path(perturb, tv["params"]),
      "batch_stats": jax.tree_util.tree_map_with_path(perturb, tv["batch_stats"]),
    }
  )(tv)
  x = jax.random.normal(jax.random.key(1), (64 if size == 16 else 16, size, size, 3))
  return student, jax.device_get(calibrated_student(student, tv, (size, size, 3), [x])), x
