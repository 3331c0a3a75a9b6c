"""Multi-device checks, run by test_parallel.py in a process with 8 simulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_check.py TEACHER_DIR

Checks (each prints one line; any failure raises):
  global      the global-scope AdaDFQ step on 8 devices equals the 1-device step (3 steps)
  global_gdfq the same for GDFQ
  per_device  the per-device losses equal each shard's losses computed separately
  topology    a checkpoint written on 8 devices resumes on 1 (and 1 -> 8) identically
  ptq         PTQ image synthesis on 8 devices equals the 1-device synthesis
"""

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dfq_test_utils import tiny_config  # noqa: E402

from dfq_jax import checkpoint as checkpoint_lib  # noqa: E402
from dfq_jax import config_base, losses, networks, trainer  # noqa: E402
from dfq_jax import step as step_lib  # noqa: E402
from dfq_jax.models import teacher as teacher_lib  # noqa: E402


def setup(teacher_dir, method, devices, **overrides):
  config = tiny_config(teacher_dir, method, batch_size=16, **overrides)
  models = networks.build_models(config, teacher_lib.load_teacher(config))
  t = trainer.setup_training(config, models, jax.devices()[:devices])
  return config, models, t.mesh, t.step_fn, t.state, t.teacher_vars, t.constants


def run_steps(step, state, teacher, constants, n, start=0):
  history = []
  for i in range(start, start + n):
    state, metrics = step(state, teacher, constants, i >= 2, i < 2)
    history.append(jax.device_get(metrics))
  return state, history


def assert_trees_close(a, b, rtol, atol, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


def assert_scaled_close(a, b, rtol, what, per_leaf=True):
  """max |a - b| <= rtol * max |b| per leaf (or over the whole tree: `per_leaf=False`)."""
  pairs = [
    (jax.tree_util.keystr(path), np.asarray(x, np.float64), np.asarray(y, np.float64))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b))
  ]
  tree_scale = max(np.abs(y).max() for _, _, y in pairs)
  for name, x, y in pairs:
    scale = np.abs(y).max() if per_leaf else tree_scale
    err = np.abs(x - y).max() / max(scale, 1e-30)
    assert err <= rtol, f"{what} {name}: {err:.2e} > {rtol}"


def check_global(teacher_dir, methods=("adadfq",), name="global"):
  """Each step on 8 devices equals the same step on 1 device, from the same state.

  AdaDFQ by default (its step holds every part of GDFQ's plus the student in the
  generator's loss); `global_gdfq` checks GDFQ the same way (slow-marked in the suite).

  The steps start from a common state (the 1-device one) rather than running two
  trajectories: Adam's first update is lr * g / |g| for every element, so an element
  whose true gradient is at the float-noise level (the biases before a train-mode BN, a
  few kernel entries) moves by +-lr with a sign set by the reduction order, and the two
  trajectories then differ by design (measured: 11 of 30,000 generator entries by 2e-3
  after one step; the next step's losses by 5e-4). What must agree is what one step
  computes: the losses, the gradients (Adam's first moment, the student's momentum) and
  the student's parameters (SGD is linear in the gradient).
  The per-step check found no reduction-order error in the sharded step: from a common
  state the losses agree to 2e-6, the student to 1e-7.
  """
  for method in methods:
    one, eight = (setup(teacher_dir, method, devices) for devices in (1, 8))
    *_, step1, state1, teacher1, constants1 = one
    mesh8, step8, _, teacher8, constants8 = eight[2:]
    replicated8 = jax.sharding.NamedSharding(mesh8, jax.sharding.PartitionSpec())
    for i in range(3):
      start = jax.device_get(state1)
      state8 = jax.device_put(start, replicated8)
      state1, m1 = step1(state1, teacher1, constants1, i >= 2, i < 2)
      state8, m8 = step8(state8, teacher8, constants8, i >= 2, i < 2)
      assert_trees_close(
        jax.device_get(m1),
        jax.device_get(m8),
        2e-5,
        1e-6,
        f"{method} step {i} metrics 1 vs 8 devices",
      )
      s1, s8 = jax.device_get(state1), jax.device_get(state8)
      mu1, mu8 = s1["gen"]["opt"].mu, s8["gen"]["opt"].mu
      # The generator's gradient as a whole (relative l2): a (leaky) ReLU whose input is
      # within float noise of 0 takes the other slope in the other reduction order, which
      # moves the whole gradient by ~1e-3 (measured, conv2 kernel: 2.3e-3 of 1.4; the same
      # flip appears between 1 device with and without YNNPACK). A missing or doubled
      # reduction over devices would be off by O(1).
      g1 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mu1)])
      g8 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mu8)])
      rel = np.linalg.norm(g8 - g1) / np.linalg.norm(g1)
      assert rel < 1e-2, f"{method} step {i} generator gradient 1 vs 8 devices: {rel:.2e}"
      assert_scaled_close(s8["student"], s1["student"], 1e-5, f"{method} step {i} student")
  print(f"{name} OK")


def check_global_gdfq(teacher_dir):
  check_global(teacher_dir, ("gdfq",), "global_gdfq")


def check_per_device(teacher_dir):
  config, models, mesh, step, state, teacher, constants = setup(
    teacher_dir, "gdfq", 8, stats_scope="per_device"
  )
  gen_params = jax.device_get(state["gen"]["params"])  # before the step donates `state`
  _, history = run_steps(step, state, teacher, constants, 1)
  # Reference: the first step's z / labels, each device's 2-image shard on its own.
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  z, labels = step_lib.sample_latents(jax.random.split(key)[0], 16, models.latent_dim, 10)
  bns, ce = [], []
  for d in range(8):
    zs, ys = z[2 * d : 2 * d + 2], labels[2 * d : 2 * d + 2]
    images = models.generator.apply({"params": gen_params}, zs, ys)
    logits, upd = models.teacher.apply(models.teacher_vars, images, mutable=["bn_stats"])
    bns.append(losses.bn_stat_loss(upd["bn_stats"], models.teacher_vars["batch_stats"]))
    ce.append(jnp.mean(losses.cross_entropy(logits, ys)))
  np.testing.assert_allclose(history[0]["generator/bns"], np.mean(bns), rtol=1e-4)
  np.testing.assert_allclose(history[0]["generator/ce"], np.mean(ce), rtol=1e-4)
  # ...and differs from the global-batch statistics of the same images.
  images = models.generator.apply({"params": gen_params}, z, labels)
  _, upd = models.teacher.apply(models.teacher_vars, images, mutable=["bn_stats"])
  global_bns = losses.bn_stat_loss(upd["bn_stats"], models.teacher_vars["batch_stats"])
  assert abs(float(global_bns) - float(np.mean(bns))) > 1e-3
  print("per_device OK")


def check_topology(teacher_dir):
  with tempfile.TemporaryDirectory() as tmp:
    for src, dst in ((8, 1), (1, 8)):
      *_, step_src, state, teacher_src, const_src = setup(teacher_dir, "gdfq", src)
      state, _ = run_steps(step_src, state, teacher_src, const_src, 3)
      ckpt = checkpoint_lib.Checkpointer(os.path.join(tmp, f"{src}to{dst}"))
      ckpt.save(3, state, wait=True)
      cont_src, h_src = run_steps(step_src, state, teacher_src, const_src, 2, start=3)
      *_, step_dst, fresh, teacher_dst, const_dst = setup(teacher_dir, "gdfq", dst)
      restored = ckpt.restore(checkpoint_lib.abstract_like(fresh))
      ckpt.close()
      assert int(restored["step"]) == 3
      cont_dst, h_dst = run_steps(step_dst, restored, teacher_dst, const_dst, 2, start=3)
      for a, b in zip(h_src, h_dst):
        assert_trees_close(a, b, 2e-4, 2e-5, f"metrics after restoring {src} -> {dst}")
      assert_trees_close(
        jax.device_get(cont_src["student"]),
        jax.device_get(cont_dst["student"]),
        1e-3,
        1e-5,
        f"student after {src} -> {dst}",
      )
  print("topology OK")


def check_ptq(teacher_dir):
  from dfq_jax.ptq import synthesis  # imported on use

  config = tiny_config(teacher_dir, "dsg_ptq")
  models = networks.build_models(config, teacher_lib.load_teacher(config))
  hp = synthesis.PtqHparams(**dict(config_base.PTQ_PRESETS["dsg_ptq"], steps=5, batch_size=16))
  outs = []
  for devices in (1, 8):
    synth = synthesis.make_synthesizer(
      hp,
      models.teacher,
      models.teacher_vars,
      jax.random.key(0),
      models.image_shape,
      10,
      devices=jax.devices()[:devices],
    )
    images, labels, last = synth.run_batch(jax.random.key(1))
    assert len(images.sharding.device_set) == devices, images.sharding
    outs.append((np.asarray(images), np.asarray(labels), last))
  (x1, y1, m1), (x8, y8, m8) = outs
  np.testing.assert_array_equal(y1, y8)
  # Five Adam steps carry the reduction order's float noise: nearly every pixel to 1e-4
  # (measured: all but 1 of 12,288, that one off by 3e-4); a wrong or missing reduction
  # over devices would move most pixels by O(0.1).
  assert np.mean(np.abs(x1 - x8) <= 1e-4 * (1 + np.abs(x1))) > 0.999, "images 1 vs 8 devices"
  np.testing.assert_allclose(x1, x8, rtol=1e-3, atol=1e-3, err_msg="images 1 vs 8 devices")
  for k in m1:
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-5, err_msg=k)
  print("ptq OK")


if __name__ == "__main__":
  assert jax.device_count() == 8, f"needs 8 devices, got {jax.device_count()}"
  teacher_dir = sys.argv[1]
  checks = sys.argv[2:] or ["global", "global_gdfq", "per_device", "topology", "ptq"]
  for name in checks:
    globals()[f"check_{name}"](teacher_dir)
