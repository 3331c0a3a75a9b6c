"""Tests of dfq_jax.losses: methods.md §0 known values, gradients, properties, reductions.

Every loss is called under `jax.jit` (eager dispatch compiles each primitive separately and
dominates the runtime on CPU); inputs are NumPy arrays. Gradient checks run in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax import losses as L

# ---------------------------------------------------------------------------------------
# Shared inputs (methods.md §0).

KD_S = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
KD_T = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
KD_Y = [0, 1]

ADA_T = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [3.0, -1.0, 0.0]]
ADA_Q = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]
ADA_Y = [0, 1, 2, 0]

SDA_MEANS = [[1.0, 0.2], [-1.0, 0.0]]  # per-sample means, B=2, C=2, running mean 0

DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _arr(x, dtype=np.float32):
  return np.asarray(x, dtype)


def _zeros(*shape):
  return np.zeros(shape, np.float32)


def _ones(*shape):
  return np.ones(shape, np.float32)


def _layer(mean, var):
  return {"mean": mean, "var": var}


def _j(f, **kwargs):
  """jit(f) with keyword arguments bound (static hyperparameters)."""
  return jax.jit(functools.partial(f, **kwargs))


def _grad_check(f, *args, directions=3, eps=1e-6, rtol=1e-5):
  """Finite-difference check of the reverse-mode gradient (float64 inputs).

  Like `jax.test_util.check_grads(f, args, order=1, modes=['rev'])` but with one jitted
  value and one jitted gradient function: compares <∇g(x), v> with the central difference
  (g(x + εv) − g(x − εv)) / 2ε along random directions v, where g = <w, f> for a fixed
  random cotangent w when f is not scalar.
  """
  rng = np.random.default_rng(0)
  args = [np.asarray(a, np.float64) for a in args]
  out_shape = jax.eval_shape(f, *args).shape
  w = rng.normal(size=out_shape)
  # One compiled function serves the gradient and the perturbed values.
  value_and_grad = jax.jit(
    jax.value_and_grad(lambda *a: jnp.sum(w * f(*a)), argnums=tuple(range(len(args))))
  )
  g = lambda *a: float(value_and_grad(*a)[0])
  analytic = [np.asarray(x) for x in value_and_grad(*args)[1]]
  assert all(np.all(np.isfinite(x)) for x in analytic)
  for _ in range(directions):
    vs = [rng.normal(size=a.shape) for a in args]
    plus = g(*[a + eps * v for a, v in zip(args, vs)])
    minus = g(*[a - eps * v for a, v in zip(args, vs)])
    numeric = (plus - minus) / (2 * eps)
    directional = sum(float(np.sum(x * v)) for x, v in zip(analytic, vs))
    np.testing.assert_allclose(directional, numeric, rtol=rtol, atol=1e-7)


# ---------------------------------------------------------------------------------------
# GDFQ: CE, KD.


@pytest.mark.parametrize("dtype", DTYPES)
def test_kd_gdfq_known_values(dtype):
  with jax.enable_x64(dtype == np.float64):
    s, t, y = _arr(KD_S, dtype), _arr(KD_T, dtype), np.asarray(KD_Y)
    total, terms = _j(L.kd_loss_gdfq)(s, t, y)
    np.testing.assert_allclose(terms["kd"], 0.0237026, atol=1e-6)
    np.testing.assert_allclose(terms["ce"], 0.6729107, atol=1e-6)
    np.testing.assert_allclose(total, 0.6966133, atol=1e-6)
    _, terms_bm = _j(L.kd_loss_gdfq, reduction="batchmean")(s, t, y)
    np.testing.assert_allclose(terms_bm["kd"], 0.0711077, atol=1e-6)
    # elementwise_mean is batchmean / C; alpha scales the KD term only.
    total_a, terms_a = _j(L.kd_loss_gdfq, alpha=0.5)(s, t, y)
    np.testing.assert_allclose(terms_a["kd"], 0.5 * terms["kd"], rtol=1e-6)
    np.testing.assert_allclose(total_a, terms_a["kd"] + terms["ce"], rtol=1e-6)


def test_cross_entropy_known_and_per_example():
  ce = _j(L.cross_entropy)(_arr(KD_S), np.asarray(KD_Y))
  assert ce.shape == (2,)
  expected = [np.log(np.e + 2) - 1, np.log(2 + np.exp(0.5)) - 0.5]
  np.testing.assert_allclose(ce, expected, atol=1e-6)
  np.testing.assert_allclose(np.mean(ce), 0.6729107, atol=1e-6)


def test_kd_bad_reduction_raises():
  with pytest.raises(ValueError):
    _j(L.kd_loss_gdfq, reduction="sum")(_arr(KD_S), _arr(KD_T), np.asarray(KD_Y))


@pytest.mark.parametrize("temperature, scale", [(1.0, 100.0), (4.0, 3.0), (20.0, 0.1)])
def test_kd_matches_torch(temperature, scale):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 10)) * scale
  y = rng.integers(0, 10, size=6)
  st, tt = torch.tensor(s), torch.tensor(t)
  kl = (
    F.kl_div(F.log_softmax(st / temperature, 1), F.softmax(tt / temperature, 1), reduction="none")
    .sum(1)
    .numpy()
  )
  ce = F.cross_entropy(st, torch.tensor(y)).item()
  got_kl = _j(L.kl_divergence, temperature=temperature)(_arr(s), _arr(t))
  np.testing.assert_allclose(got_kl, kl, rtol=2e-5, atol=1e-7)
  total, terms = _j(L.kd_loss_gdfq, temperature=temperature)(_arr(s), _arr(t), y)
  np.testing.assert_allclose(terms["kd"], temperature**2 * kl.mean() / 10, rtol=2e-5)
  np.testing.assert_allclose(total, temperature**2 * kl.mean() / 10 + ce, rtol=2e-5)


def test_kl_is_zero_for_equal_logits_and_finite_grads_for_extreme_logits():
  s = _arr([[3.0, -2.0, 0.0], [1e3, -1e3, 0.0]])
  np.testing.assert_allclose(_j(L.kl_divergence, temperature=20.0)(s, s), 0.0, atol=1e-7)
  g = jax.jit(jax.grad(lambda a: L.kl_divergence(a, -a).sum()))(s)
  assert np.all(np.isfinite(g))


def test_kd_and_ce_gradients(x64):
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 4, 5)) * 3
  y = np.asarray([0, 3, 1, 4])
  for reduction, temperature in (("elementwise_mean", 20.0), ("batchmean", 1.0)):
    _grad_check(
      lambda a, b, r=reduction, T=temperature: L.kd_loss_gdfq(a, b, y, temperature=T, reduction=r)[
        0
      ],
      s,
      t,
    )
  _grad_check(lambda a: L.cross_entropy(a, y), s)


# ---------------------------------------------------------------------------------------
# BNS loss (GDFQ form).


def _bns_per_sample_layer():
  """Per-sample stats [B=2, C=2] whose batch mean / biased var are [.5,-.5] / [2,1]."""
  mean = _arr([[1.5, -1.0], [-0.5, 0.0]])  # batch mean [.5, -.5], spread var [1, .25]
  var = _arr([[1.0, 0.75], [1.0, 0.75]])  # + spread = [2, 1]
  return _layer(mean, var)


def test_bn_stat_loss_known_value():
  value = _j(L.bn_stat_loss_layer)(_arr([0.5, -0.5]), _arr([2.0, 1.0]), _zeros(2), _ones(2))
  np.testing.assert_allclose(value, 0.75, atol=1e-6)
  run = _layer(_zeros(2), _ones(2))
  tree = {"bn1": _bns_per_sample_layer(), "block": {"bn2": _bns_per_sample_layer()}}
  running = {"bn1": run, "block": {"bn2": run}}
  loss = _j(L.bn_stat_loss)
  np.testing.assert_allclose(loss(tree, running), 0.75, atol=1e-6)
  # Batch-level [C] leaves are accepted as they are.
  batch = {"bn1": _layer(_arr([0.5, -0.5]), _arr([2.0, 1.0]))}
  np.testing.assert_allclose(loss(batch, {"bn1": run}), 0.75, atol=1e-6)
  # Mean over layers: adding an aligned layer halves the loss.
  tree2 = {"a": _bns_per_sample_layer(), "b": _layer(_zeros(2, 2), _ones(2, 2))}
  np.testing.assert_allclose(loss(tree2, {"a": run, "b": run}), 0.375, atol=1e-6)


def test_bn_stat_loss_on_sown_flax_trees():
  """Integration with dfq_jax.models.layers.BatchNorm: sown per-sample stats + batch_stats."""
  import flax.linen as nn

  from dfq_jax.models.layers import BatchNorm, batch_moments

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return BatchNorm(name="bn")(nn.Dense(3)(x))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = BatchNorm(name="bn1")(nn.Conv(4, (1, 1))(x))
      return Block(name="block")(x)

  model = Net()
  x = np.random.default_rng(0).normal(size=(4, 3, 3, 2)).astype(np.float32) * 2 + 1

  @jax.jit
  def run(x):
    variables = model.init(jax.random.key(1), x)
    running = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.shape[0]), variables["batch_stats"])
    _, state = model.apply({**variables, "batch_stats": running}, x, mutable=["bn_stats"])
    return (L.bn_stat_loss(state["bn_stats"], running), batch_moments(state["bn_stats"]), running)

  value, moments, running = run(x)
  assert set(moments) == {"bn1", "block"}
  per_layer = [
    np.mean((m["mean"] - r["mean"]) ** 2) + np.mean((m["var"] - r["var"]) ** 2)
    for m, r in ((moments["bn1"], running["bn1"]), (moments["block"]["bn"], running["block"]["bn"]))
  ]
  np.testing.assert_allclose(value, np.mean(per_layer), rtol=1e-5)


def test_bn_stat_loss_errors():
  run = _layer(_zeros(2), _ones(2))
  with pytest.raises(KeyError):
    _j(L.bn_stat_loss)({"x": _bns_per_sample_layer()}, {"y": run})
  with pytest.raises(ValueError):
    L.bn_stat_loss({}, {})


def test_bn_stat_loss_gradients(x64):
  rng = np.random.default_rng(2)
  mean, var = rng.normal(size=(3, 4)), rng.uniform(0.5, 2, (3, 4))
  running = {"l": _layer(rng.normal(size=4), rng.uniform(0.5, 2, 4))}
  _grad_check(lambda m, v: L.bn_stat_loss({"l": _layer(m, v)}, running), mean, var)


# ---------------------------------------------------------------------------------------
# DSG: SDA (§4.2), LSE (§4.3).


def test_sda_per_sample_known_value_ptq_form():
  means = _arr(SDA_MEANS)
  per_example = _j(L.sda_per_sample_term, margin=0.5)(means, _zeros(2))
  np.testing.assert_allclose(per_example, [0.25, 0.25], atol=1e-6)
  np.testing.assert_allclose(np.mean(per_example), 0.25, atol=1e-6)
  # Tree form: the std term vanishes (per-sample var == running var, margin 0).
  tree = {"bn": _layer(means, _ones(2, 2))}
  running = {"bn": _layer(_zeros(2), _ones(2))}
  np.testing.assert_allclose(
    _j(L.sda_loss_per_sample, margins=(0.5, 0.0))(tree, running), 0.25, atol=1e-6
  )
  # Margins given as a tree, as sda_margins returns them; the margin's sign is ignored.
  margins = {"bn": {"mean": _arr(-0.5), "var": _arr(0.0)}}
  np.testing.assert_allclose(
    _j(L.sda_loss_per_sample)(tree, running, margins=margins), 0.25, atol=1e-6
  )


def test_sda_batch_qat_two_sided_known_value_and_one_sided_default():
  var, run_mean, run_var = _ones(2), _zeros(2), _ones(2)
  kwargs = dict(mean_margin=0.5, var_margin=0.0)
  two = _j(L.sda_loss_layer, two_sided=True, **kwargs)
  np.testing.assert_allclose(two(_arr([0.0, 0.1]), var, run_mean, run_var), 0.41, atol=1e-6)
  # Paper hinge (default): both gaps lie inside the margin, no penalty.
  one = _j(L.sda_loss_layer, **kwargs)
  np.testing.assert_allclose(one(_arr([0.0, 0.1]), var, run_mean, run_var), 0.0, atol=1e-7)
  # Outside the margin both forms agree: gaps [1, .7] -> .25 + .04.
  for f in (one, two):
    np.testing.assert_allclose(f(_arr([1.0, -0.7]), var, run_mean, run_var), 0.29, atol=1e-6)


def test_sda_loss_tree_reductions_and_qat_channel_lse():
  layer = _layer(_arr([[0.0, 0.1]] * 3), _zeros(3, 2))  # batch mean [0, .1], var 0
  run = _layer(_zeros(2), _zeros(2))
  tree, running = {"a": layer, "b": layer}, {"a": run, "b": run}
  kwargs = dict(margins=(0.5, 0.0), two_sided=True)
  np.testing.assert_allclose(_j(L.sda_loss, **kwargs)(tree, running), 0.41, atol=1e-6)  # mean
  np.testing.assert_allclose(
    _j(L.sda_loss, reduction="sum", **kwargs)(tree, running), 0.82, atol=1e-6
  )
  # QAT "LSE": channel l of layer l is scaled by sqrt(2) (x2 on its square).
  # layer 0: 2*.25 + .16 = .66; layer 1: .25 + 2*.16 = .57.
  lse = _j(L.sda_loss, reduction="sum", lse="channel", **kwargs)
  np.testing.assert_allclose(lse(tree, running), 1.23, atol=1e-6)
  # A layer index beyond the channel count is left alone.
  np.testing.assert_allclose(
    lse({**tree, "c": layer}, {**running, "c": run}), 1.23 + 0.41, atol=1e-6
  )
  with pytest.raises(ValueError):
    L.sda_loss(tree, running, reduction="max", **kwargs)
  with pytest.raises(ValueError):
    L.sda_loss_per_sample(tree, running, margins=(0.5, 0.0), reduction="max")


def test_sda_std_statistic():
  # stat='std': sqrt(var + eps) vs sqrt(running_var + eps): var 4 vs 1 -> gap ~1.
  args = (_zeros(1), _arr([4.0]), _zeros(1), _ones(1))
  value = _j(L.sda_loss_layer, mean_margin=0.0, var_margin=0.25, stat="std")(*args)
  gap = np.sqrt(4 + 1e-6) - np.sqrt(1 + 1e-6)
  np.testing.assert_allclose(value, (gap - 0.25) ** 2, atol=1e-6)
  value_var = _j(L.sda_loss_layer, mean_margin=0.0, var_margin=0.25, stat="var")(*args)
  np.testing.assert_allclose(value_var, (3 - 0.25) ** 2, atol=1e-5)


def test_lse_known_values():
  means = _arr(SDA_MEANS)
  layer, run = _layer(means, _ones(2, 2)), _layer(_zeros(2), _ones(2))
  tree, running = {"bn": layer}, {"bn": run}
  f = functools.partial(_j, L.sda_loss_per_sample, margins=(0.5, 0.0))
  # PTQ code: sample 0 enhances layer 0 (x2 on the residual): (1 + .25)/2.
  np.testing.assert_allclose(f(lse="diagonal")(tree, running), 0.625, atol=1e-6)
  np.testing.assert_allclose(f(lse="off")(tree, running), 0.25, atol=1e-6)
  # Same through the per-sample term and explicit weights.
  w = np.asarray(L.lse_weights(2, 1, mode="diagonal"))
  per_example = _j(L.sda_per_sample_term, margin=0.5)(means, _zeros(2), sample_weights=w[:, 0])
  np.testing.assert_allclose(np.mean(per_example), 0.625, atol=1e-6)
  # Default b mod L: with L=1 every sample enhances the only layer (x4).
  np.testing.assert_allclose(f(lse="modulo")(tree, running), 1.0, atol=1e-6)
  # Two identical layers: sample 0 -> layer 0, sample 1 -> layer 1: .625 + .625.
  tree2, running2 = {"a": layer, "b": layer}, {"a": run, "b": run}
  np.testing.assert_allclose(f(lse="modulo")(tree2, running2), 1.25, atol=1e-6)
  np.testing.assert_allclose(f(lse="modulo", reduction="mean")(tree2, running2), 0.625, atol=1e-6)
  # Factor on the loss (w = 1 + lambda, lambda = 1): (2*.25 + .25)/2.
  np.testing.assert_allclose(
    f(lse="diagonal", lse_on="loss", lse_scale=2.0)(tree, running), 0.375, atol=1e-6
  )


def test_lse_weights_structure():
  w = np.asarray(L.lse_weights(5, 3))
  assert w.shape == (5, 3)
  np.testing.assert_array_equal((w == 4.0).sum(axis=1), 1)
  np.testing.assert_array_equal(np.argmax(w, axis=1), np.arange(5) % 3)
  # PTQ parity, R20-like: B=40, L=21, layer_num=20.
  w = np.asarray(L.lse_weights(40, 21, mode="diagonal"))
  expected = np.ones((40, 21))
  expected[np.arange(20), np.arange(20)] = 4.0
  np.testing.assert_array_equal(w, expected)
  w = np.asarray(L.lse_weights(4, 3, on="loss", scale=1.5))
  assert set(np.unique(w)) == {1.0, 1.5}
  with pytest.raises(ValueError):
    L.lse_weights(4, 3, mode="random")
  with pytest.raises(ValueError):
    L.lse_weights(4, 3, on="grad")


def test_sda_margins_percentile():
  mean = _arr([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])  # batch mean [0,1,2,3], spread var 0
  var = _arr([[1.0, 2.0, 5.0, 10.0]] * 2)
  run = _layer(_zeros(4), _ones(4))
  ref = {"bn": _layer(mean, var), "blk": {"bn": _layer(mean, var)}}
  running = {"bn": run, "blk": {"bn": run}}
  margins = _j(L.sda_margins, percentile=50.0)(ref, running)
  assert set(margins) == {"bn", "blk"} and set(margins["blk"]["bn"]) == {"mean", "var"}
  np.testing.assert_allclose(margins["bn"]["mean"], 1.5, atol=1e-6)  # median of |0..3|
  np.testing.assert_allclose(margins["bn"]["var"], 2.5, atol=1e-6)  # median of [0,1,4,9]
  std = _j(L.sda_margins, percentile=0.0, stat="std")(ref, running)
  np.testing.assert_allclose(std["blk"]["bn"]["var"], 0.0, atol=1e-6)
  std = _j(L.sda_margins, percentile=100.0, stat="std")(ref, running)
  np.testing.assert_allclose(std["bn"]["var"], np.sqrt(10 + 1e-6) - np.sqrt(1 + 1e-6), atol=1e-6)
  # Per-sample level: percentile over all B*C gaps.
  sample = _j(L.sda_margins, percentile=50.0, level="sample")(
    {"bn": _layer(_arr([[0.0, 4.0], [2.0, 6.0]]), _ones(2, 2))}, {"bn": _layer(_zeros(2), _ones(2))}
  )
  np.testing.assert_allclose(sample["bn"]["mean"], 3.0, atol=1e-6)
  # Margins at the 100th percentile make the one-sided loss of the reference batch 0.
  m100 = _j(L.sda_margins, percentile=100.0)(ref, running)
  np.testing.assert_allclose(_j(L.sda_loss)(ref, running, margins=m100), 0.0, atol=1e-6)


def test_to_unbiased_var_matches_ptq_statistics():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 5, 4, 2)) * 2 + 1  # NHWC, 20 positions
  mean, biased = x.mean(axis=(1, 2)), x.var(axis=(1, 2))
  tree = {"blk": {"bn": _layer(_arr(mean), _arr(biased))}}
  unbiased = jax.jit(functools.partial(L.to_unbiased_var, num_positions=20))(tree)
  xt = torch.tensor(x).permute(0, 3, 1, 2).reshape(3, 2, -1)
  torch_var = torch.var(xt, dim=2).numpy()
  np.testing.assert_allclose(unbiased["blk"]["bn"]["var"], torch_var, rtol=1e-5)
  same = jax.jit(functools.partial(L.to_unbiased_var, num_positions={"blk": {"bn": 20}}))(tree)
  np.testing.assert_allclose(same["blk"]["bn"]["var"], unbiased["blk"]["bn"]["var"])
  # PTQ-code loss on one layer, written out with torch's unbiased variance.
  run = {"blk": {"bn": _layer(_zeros(2), _arr([1.0, 4.0]))}}
  got = _j(L.sda_loss_per_sample, margins=(0.1, 0.2))(unbiased, run)
  std = np.sqrt(torch_var + 1e-6)
  d_mean = np.maximum(np.abs(mean) - 0.1, 0)
  d_std = np.maximum(np.abs(np.sqrt(np.array([1.0, 4.0]) + 1e-6) - std) - 0.2, 0)
  np.testing.assert_allclose(got, ((d_mean**2).sum() + (d_std**2).sum()) / 3, rtol=1e-5)


def test_sda_gradients(x64):
  rng = np.random.default_rng(4)
  mean, var = rng.normal(size=(4, 3)) * 2, rng.uniform(0.2, 3, (4, 3))
  run = {
    "a": _layer(rng.normal(size=3), rng.uniform(0.5, 2, 3)),
    "b": _layer(rng.normal(size=3), rng.uniform(0.5, 2, 3)),
  }
  tree = lambda m, v: {"a": _layer(m, v), "b": _layer(m * 0.5, v * 2)}
  for kwargs in (dict(), dict(two_sided=True, lse="channel"), dict(stat="std")):
    _grad_check(
      lambda m, v, k=kwargs: L.sda_loss(tree(m, v), run, margins=(0.1, 0.05), **k), mean, var
    )
  for kwargs in (dict(), dict(lse="modulo"), dict(lse="diagonal", stat="var")):
    _grad_check(
      lambda m, v, k=kwargs: L.sda_loss_per_sample(tree(m, v), run, margins=(0.1, 0.05), **k),
      mean,
      var,
    )


# ---------------------------------------------------------------------------------------
# DSG PTQ image priors (§4.5).


def _tv_reference(x):
  x = np.asarray(x, np.float64)
  diffs = [
    x[:, :, :-1] - x[:, :, 1:],
    x[:, :-1] - x[:, 1:],
    x[:, 1:, :-1] - x[:, :-1, 1:],
    x[:, :-1, :-1] - x[:, 1:, 1:],
  ]
  return sum(np.sqrt((d**2).sum()) for d in diffs)


def test_total_variation_l2():
  tv = _j(L.total_variation_l2)
  x = np.random.default_rng(5).normal(size=(2, 5, 6, 3))
  np.testing.assert_allclose(tv(_arr(x)), _tv_reference(x), rtol=1e-5)
  # Hand value: one 2x2 single-channel image [[0, 1], [2, 3]]: horizontal [-1, -1] -> √2,
  # vertical [-2, -2] -> √8, anti-diagonal 2 - 1 = 1, diagonal 0 - 3 -> 3.
  img = _arr([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(tv(img), np.sqrt(2) + np.sqrt(8) + 1 + 3, atol=1e-5)
  # Constant images: value 0 and a zero (not NaN) gradient.
  const = _ones(2, 4, 4, 3)
  assert float(tv(const)) == 0.0
  np.testing.assert_array_equal(jax.jit(jax.grad(L.total_variation_l2))(const), 0.0)


def test_l2_norm_prior_and_input_prior():
  x = _arr(np.arange(24.0).reshape(2, 2, 2, 3) - 10)
  np.testing.assert_allclose(
    _j(L.l2_norm_prior)(x), np.linalg.norm(x.reshape(2, -1), axis=1), rtol=1e-6
  )
  g = jax.jit(jax.grad(lambda a: L.l2_norm_prior(a).sum()))(_zeros(2, 3))
  np.testing.assert_array_equal(g, 0.0)
  # Input prior: per-sample per-channel mean -> 0, unbiased std -> 1.
  prior = _j(L.input_prior_loss)
  z = np.random.default_rng(6).normal(size=(3, 4, 4, 2))
  flat = z.reshape(3, 16, 2)
  std = np.sqrt(flat.var(axis=1, ddof=1) + 1e-6)
  expected = (flat.mean(axis=1) ** 2).sum(-1) + ((std - 1) ** 2).sum(-1)
  np.testing.assert_allclose(prior(_arr(z)), expected, rtol=1e-5)
  standardised = (flat - flat.mean(1, keepdims=True)) / flat.std(1, ddof=1, keepdims=True)
  np.testing.assert_allclose(prior(_arr(standardised.reshape(3, 4, 4, 2))), 0.0, atol=1e-5)


def test_image_prior_gradients(x64):
  x = np.random.default_rng(7).normal(size=(2, 4, 5, 3))
  _grad_check(L.total_variation_l2, x)
  _grad_check(L.l2_norm_prior, x)
  _grad_check(L.input_prior_loss, x)


# ---------------------------------------------------------------------------------------
# DSG SCI (§4.4): properties.


def _noise(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_similarity_spectrum_is_canonical():
  x = _noise((6, 3, 4, 4), seed=0)
  spectrum = _j(L.similarity_spectrum)
  w, v = map(np.asarray, spectrum(x))
  assert w.shape == (6,) and v.shape == (6, 6)
  assert np.all(np.diff(w) <= 0)  # descending
  np.testing.assert_allclose(w.sum(), 6.0, atol=1e-4)  # trace of a cosine Gram = B
  idx = np.argmax(np.abs(v), axis=0)
  assert np.all(v[idx, np.arange(6)] > 0)  # largest component positive
  phi = x.reshape(6, -1)
  phi = phi / np.linalg.norm(phi, axis=1, keepdims=True)
  np.testing.assert_allclose(v @ np.diag(w) @ v.T, phi @ phi.T, atol=1e-5)
  # Scaling a sample does not change the spectrum (rows are normalised).
  w2, _ = spectrum(x * np.arange(1.0, 7.0, dtype=np.float32)[:, None, None, None])
  np.testing.assert_allclose(w2, w, atol=1e-5)


def test_sci_properties():
  b = 8
  noise, x = _noise((b, 3, 8, 8)), _noise((b, 3, 8, 8), seed=0)
  terms = _j(L.sci_terms)
  spectrum = jax.jit(lambda a: L.similarity_spectrum(a)[0])
  # Magnitude term vanishes against itself.
  assert float(terms(x, x)["magnitude"]) == 0.0
  # Identical rows: S = 11^T, top eigenvalue B, the rest 0; the magnitude term is far
  # larger than for independent samples.
  ident = np.broadcast_to(x[:1], x.shape).copy()
  w = np.asarray(spectrum(ident))
  np.testing.assert_allclose(w[0], b, atol=1e-4)
  np.testing.assert_allclose(w[1:], 0.0, atol=1e-4)
  ident_terms, indep_terms = terms(ident, noise), terms(x, noise)
  assert float(ident_terms["magnitude"]) > 100 * float(indep_terms["magnitude"])
  w_noise = np.asarray(spectrum(noise))
  np.testing.assert_allclose(
    ident_terms["magnitude"], 1e-4 * np.mean((w - w_noise) ** 2), rtol=1e-4
  )
  # Orthogonal rows: S = I, all eigenvalues 1.
  orth = np.eye(b, 3 * 8 * 8, dtype=np.float32).reshape(b, 3, 8, 8)
  np.testing.assert_allclose(spectrum(orth), 1.0, atol=1e-6)
  # sci_loss is the sum of the terms.
  np.testing.assert_allclose(
    _j(L.sci_loss)(x, noise), indep_terms["magnitude"] + indep_terms["structure"], rtol=1e-6
  )


def test_sci_parity_has_zero_gradient_and_same_value():
  x, noise = _noise((8, 3, 8, 8), seed=0), _noise((8, 3, 8, 8))
  np.testing.assert_allclose(
    _j(L.sci_loss, differentiable=False)(x, noise), _j(L.sci_loss)(x, noise), rtol=1e-6
  )
  g = jax.jit(jax.grad(functools.partial(L.sci_loss, differentiable=False)))(x, noise)
  assert np.all(np.asarray(g) == 0.0)


def test_sci_differentiable_gradients_finite_nonzero_and_safe_when_degenerate():
  grad = jax.jit(jax.grad(L.sci_loss))
  x, noise = _noise((8, 3, 8, 8), seed=0), _noise((8, 3, 8, 8))
  g = np.asarray(grad(x, noise))
  assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 0
  # Degenerate spectra: identical rows, orthogonal rows (S = I), and B > D (rank deficient).
  for xd in (
    np.broadcast_to(x[:1], x.shape).copy(),
    np.eye(8, 192, dtype=np.float32).reshape(8, 3, 8, 8),
  ):
    assert np.all(np.isfinite(grad(xd, noise)))
  small, small_noise = _noise((8, 3), seed=2), _noise((8, 3), seed=3)
  assert np.all(np.isfinite(grad(small, small_noise)))
  # Without broadening the exact eigh derivative breaks on the rank-deficient case.
  exact = jax.jit(jax.grad(functools.partial(L.sci_loss, eig_grad_eps=0.0)))(small, small_noise)
  assert not np.all(np.isfinite(exact))


def test_sci_gradient_check(x64):
  rng = np.random.default_rng(8)
  x, noise = rng.normal(size=(2, 4, 12))
  _grad_check(lambda a: L.sci_loss(a, noise), x)
  _grad_check(lambda a: L.similarity_spectrum(a)[0], x)


# ---------------------------------------------------------------------------------------
# AdaDFQ (§5).


@pytest.mark.parametrize("dtype", DTYPES)
def test_adadfq_generator_known_values(dtype):
  with jax.enable_x64(dtype == np.float64):
    t, q, y = _arr(ADA_T, dtype), _arr(ADA_Q, dtype), np.asarray(ADA_Y)
    out = _j(L.adadfq_generator_losses, lambda_l=0.1, lambda_u=0.8)(q, t, y)
    np.testing.assert_allclose(out["entropy"], [0.975328, 0.905959, 1.017357, 0.207022], atol=1e-5)
    np.testing.assert_allclose(out["entropy_norm"], [0.861725, 0.783922, 0.908865, 0.0], atol=1e-5)
    np.testing.assert_allclose(out["margin"], 0.0676476, atol=1e-6)
    np.testing.assert_allclose(out["ds"], 0.7321885, atol=1e-6)
    np.testing.assert_allclose(out["as"], 0.3741208, atol=1e-6)
    total, terms = _j(
      L.adadfq_generator_loss, lambda_l=0.1, lambda_u=0.8, alpha_ds=0.2, alpha_as=0.1
    )(q, t, y)
    np.testing.assert_allclose(total, 0.2514973, atol=1e-6)
    assert set(terms) == {"margin", "ds", "as"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_adadfq_student_known_values(dtype):
  with jax.enable_x64(dtype == np.float64):
    t, q = _arr(ADA_T, dtype), _arr(ADA_Q, dtype)
    # float32 spacing at 438 is 3e-5, hence the relative tolerance there.
    np.testing.assert_allclose(
      _j(L.adadfq_student_loss, temperature=20.0)(q, t), -438.59459, rtol=1e-7, atol=1e-5
    )
    np.testing.assert_allclose(
      _j(L.adadfq_student_loss, temperature=5.0)(q, t), -26.672192, rtol=1e-7, atol=1e-5
    )


def _torch_adadfq(t, q, y, lambda_l, lambda_u, temperature):
  """Independent torch transcription of methods.md §5.1 (batch-agnostic margin)."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  t, q, y = torch.tensor(t), torch.tensor(q), torch.tensor(y)
  z = t - q
  h = -(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1)
  hp = (h - h.min()) / (np.log(t.shape[1]) - h.min())
  margin = F.relu(lambda_l - hp).mean() + F.relu(hp - lambda_u).mean()
  zt = z / temperature
  student = -(temperature**2) * (-(F.softmax(zt, 1) * F.log_softmax(zt, 1)).sum(1)).mean()
  return {
    "entropy": h.numpy(),
    "entropy_norm": hp.numpy(),
    "margin": margin.item(),
    "ds": F.cross_entropy(z, y).item(),
    "as": F.cross_entropy(t + q, y).item(),
    "student": student.item(),
  }


@pytest.mark.parametrize("batch", [16, 7])
def test_adadfq_batch_size_agnostic_matches_torch(batch):
  rng = np.random.default_rng(batch)
  t, q = rng.normal(size=(2, batch, 10)) * 3
  y = rng.integers(0, 10, size=batch)
  ref = _torch_adadfq(t, q, y, 0.3, 0.8, 5.0)
  out = _j(L.adadfq_generator_losses, lambda_l=0.3, lambda_u=0.8)(_arr(q), _arr(t), y)
  for key in ("entropy", "entropy_norm", "margin", "ds", "as"):
    np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert out["entropy"].shape == (batch,)
  np.testing.assert_allclose(
    _j(L.adadfq_student_loss, temperature=5.0)(_arr(q), _arr(t)), ref["student"], rtol=1e-5
  )


def test_adadfq_margin_edge_cases():
  t = _zeros(5, 4)
  labels = np.zeros(5, np.int32)
  f = functools.partial(L.adadfq_generator_losses, labels=labels, lambda_l=0.1, lambda_u=0.8)
  # q == t: every H equals log C; H' = 0 (no NaN), so only the lower hinge is active.
  out = jax.jit(f)(t, t)
  assert np.all(np.isfinite(out["entropy_norm"]))
  np.testing.assert_allclose(out["margin"], 0.1, atol=1e-6)
  g = jax.jit(jax.grad(lambda a: f(a, t)["margin"]))(t)
  assert np.all(np.isfinite(g))


def test_adadfq_gradients(x64):
  rng = np.random.default_rng(9)
  t, q = rng.normal(size=(2, 6, 5)) * 2
  y = rng.integers(0, 5, size=6)
  _grad_check(
    lambda a, b: L.adadfq_generator_loss(
      a, b, y, lambda_l=0.3, lambda_u=0.6, alpha_ds=0.2, alpha_as=0.1
    )[0],
    q,
    t,
  )
  for temperature in (5.0, 20.0):
    _grad_check(lambda a, b, T=temperature: L.adadfq_student_loss(a, b, temperature=T), q, t)
  _grad_check(lambda a: L.entropy(a, temperature=2.0), t)
