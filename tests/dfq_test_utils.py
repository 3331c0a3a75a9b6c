"""Helpers shared by the tests (a module of its own: `conftest` names collide)."""


def tiny_config(teacher_dir, method="gdfq", **overrides):
  """The demo config shrunk to a few steps of a small generator on 64 eval images."""
  from configs import demo as demo_config
  c = demo_config.get_config(method)
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
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
