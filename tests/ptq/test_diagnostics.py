"""Tests of dfq_jax.ptq.diagnostics: hand-computed spreads, cosine known values, batching."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax.models import get_model
from dfq_jax.ptq import diagnostics as D

HW = 8
N = 10


@pytest.fixture(scope="module")
def teacher():
  model = get_model("resnet8_cifar", num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, HW, HW, 3)))
  # Non-trivial running statistics so the standardisation is exercised.
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  variables = dict(variables)
  variables["batch_stats"] = jax.tree.map(
    lambda a: a + 0.1 * jax.random.uniform(next(keys), a.shape), variables["batch_stats"]
  )
  return model, variables


def _noise(seed, n=N):
  return np.random.default_rng(seed).standard_normal((n, HW, HW, 3)).astype(np.float32)


def _stats_node(mu, s):
  mu, s = np.asarray(mu, np.float64), np.asarray(s, np.float64)
  return {"mean": mu, "var": s**2 - D.EPS}


def _running_node(m, r):
  m, r = np.asarray(m, np.float64), np.asarray(r, np.float64)
  return {"mean": m, "var": r**2 - D.EPS}


# ---------------------------------------------------------------------------------------
# Pure math on handmade trees.


def _handmade():
  # Layer "blk/bn": B=2, C=2. Layer "bn_out": B=2, C=1.
  bn_stats = {
    "blk": {"bn": _stats_node([[1.0, 3.0], [3.0, 3.0]], [[1.0, 2.0], [3.0, 5.0]])},
    "bn_out": _stats_node([[0.0], [2.0]], [[1.0], [1.0]]),
  }
  running = {
    "blk": {"bn": _running_node([1.0, 1.0], [2.0, 1.0])},
    "bn_out": _running_node([0.0], [1.0]),
  }
  return bn_stats, running


def test_spread_from_stats_hand_computed():
  bn_stats, running = _handmade()
  out = D.spread_from_stats(bn_stats, running)
  layers = out["per_layer"]
  assert [l["layer"] for l in layers] == ["blk/bn", "bn_out"]
  # blk/bn: std_b(mu) = [1, 0] / r [2, 1] -> .25; std_b(s) = [1, 1.5] -> (.5 + 1.5)/2;
  # mean_b|mu - m| = [1, 2] / r -> (.5 + 2)/2; mean_b|s - r| = [1, 2.5] / r -> (.5 + 2.5)/2.
  assert layers[0]["mean_spread"] == pytest.approx(0.25)
  assert layers[0]["std_spread"] == pytest.approx(1.0)
  assert layers[0]["mean_gap"] == pytest.approx(1.25)
  assert layers[0]["std_gap"] == pytest.approx(1.5)
  # bn_out: mu = [0, 2], m = 0, r = 1, s == r.
  assert layers[1]["mean_spread"] == pytest.approx(1.0)
  assert layers[1]["std_spread"] == pytest.approx(0.0, abs=1e-12)
  assert layers[1]["mean_gap"] == pytest.approx(1.0)
  assert layers[1]["std_gap"] == pytest.approx(0.0, abs=1e-12)
  # Averages over layers.
  assert out["mean_spread"] == pytest.approx(0.625)
  assert out["std_spread"] == pytest.approx(0.5)
  assert out["mean_gap"] == pytest.approx(1.125)
  assert out["std_gap"] == pytest.approx(0.75)


def test_bn_features_standardised_and_concatenated():
  bn_stats, running = _handmade()
  feats = D.bn_features(bn_stats, running)
  np.testing.assert_allclose(feats, [[0.0, 2.0, 0.0], [1.0, 2.0, 2.0]], atol=1e-12)


def test_spread_missing_layer_raises():
  bn_stats, running = _handmade()
  del running["bn_out"]
  with pytest.raises(KeyError, match="bn_out"):
    D.spread_from_stats(bn_stats, running)


def test_mean_pairwise_cosine_known_values():
  assert D.mean_pairwise_cosine(np.eye(5)) == 0.0
  assert D.mean_pairwise_cosine(np.ones((4, 3)) * [1.0, 2.0, 3.0]) == pytest.approx(1.0, abs=1e-12)
  # Three vectors at 0 / 90 / 45 degrees: cosines 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3.
  rows = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
  assert D.mean_pairwise_cosine(rows) == pytest.approx(np.sqrt(2) / 3)
  # Blocked accumulation equals the explicit Gram off-diagonal mean.
  x = np.random.default_rng(0).standard_normal((600, 7))
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  g = u @ u.T
  expected = (g.sum() - np.trace(g)) / (600 * 599)
  assert D.mean_pairwise_cosine(x) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------
# Through the teacher.


def test_identical_images(teacher):
  model, variables = teacher
  images = np.repeat(_noise(0, 1), N, axis=0)
  out = D.diversity_stats(model, variables, images, batch_size=N)
  assert out["num_images"] == N
  assert out["cosine_images"] == pytest.approx(1.0, abs=1e-9)
  assert out["cosine_features"] == pytest.approx(1.0, abs=1e-9)
  assert out["mean_spread"] == pytest.approx(0.0, abs=1e-6)
  assert out["std_spread"] == pytest.approx(0.0, abs=1e-6)
  assert out["mean_gap"] > 0
  json.dumps(out)


def test_orthogonal_images_cosine_zero(teacher):
  model, variables = teacher
  images = np.zeros((N, HW, HW, 3), np.float32)
  for i in range(N):
    images[i, i // HW, i % HW, i % 3] = 5.0  # one-hot pixels, distinct positions
  out = D.diversity_stats(model, variables, images, batch_size=N)
  assert out["cosine_images"] == 0.0


def test_network_order_and_structure(teacher):
  model, variables = teacher
  out = D.diversity_stats(model, variables, _noise(1), batch_size=N)
  names = [l["layer"] for l in out["per_layer"]]
  assert names == [
    "bn1",
    "layer1_0/bn1",
    "layer1_0/bn2",
    "layer2_0/bn1",
    "layer2_0/bn2",
    "layer3_0/bn1",
    "layer3_0/bn2",
  ]
  for key in D.METRICS:
    assert out[key] == pytest.approx(np.mean([l[key] for l in out["per_layer"]]))
  assert set(out) == {"per_layer", *D.METRICS, "cosine_images", "cosine_features", "num_images"}


def test_batching_invariance(teacher):
  model, variables = teacher
  images = _noise(2)
  small = D.diversity_stats(model, variables, images, batch_size=3)  # 4 batches, last padded
  big = D.diversity_stats(model, variables, images, batch_size=64)
  assert small["num_images"] == big["num_images"] == N
  for key in (*D.METRICS, "cosine_images", "cosine_features"):
    assert small[key] == pytest.approx(big[key], rel=1e-4, abs=1e-6), key
  for a, b in zip(small["per_layer"], big["per_layer"]):
    assert a["layer"] == b["layer"]
    for key in D.METRICS:
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6)


def test_noise_more_diverse_than_copies_and_two_image_mixture(teacher):
  model, variables = teacher
  noise = _noise(3)
  copies = np.repeat(noise[:1], N, axis=0)
  s_noise = D.diversity_stats(model, variables, noise, batch_size=N)
  s_copies = D.diversity_stats(model, variables, copies, batch_size=N)
  assert s_noise["mean_spread"] > s_copies["mean_spread"] + 1e-3
  assert s_noise["std_spread"] > s_copies["std_spread"] + 1e-3
  assert s_noise["cosine_images"] < s_copies["cosine_images"]
  assert s_noise["cosine_features"] < s_copies["cosine_features"]

  # Two distinct images, k copies each: mean cosine = ((k - 1) + k c) / (2k - 1), c = cos(a, b).
  a, b = noise[0], noise[1]
  k = N // 2
  mix = np.concatenate([np.repeat(a[None], k, 0), np.repeat(b[None], k, 0)])
  s_mix = D.diversity_stats(model, variables, mix, batch_size=N)
  c = float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
  assert c < s_mix["cosine_images"] < 1.0
  assert s_mix["cosine_images"] == pytest.approx(((k - 1) + k * c) / (2 * k - 1), abs=1e-6)


def test_rejects_bad_input(teacher):
  model, variables = teacher
  with pytest.raises(ValueError, match="at least 2"):
    D.diversity_stats(model, variables, _noise(0, 1))
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    D.diversity_stats(model, variables, _noise(0)[0])


# ---------------------------------------------------------------------------------------
# Reporting.


def _fake_stats(scale, layers=4):
  per_layer = [
    {
      "layer": f"bn{i}",
      "mean_spread": scale * (i + 1),
      "std_spread": scale,
      "mean_gap": 0.1,
      "std_gap": 0.2,
    }
    for i in range(layers)
  ]
  out = {
    "per_layer": per_layer,
    "cosine_images": 1 - scale,
    "cosine_features": 0.5,
    "num_images": 8,
  }
  for key in D.METRICS:
    out[key] = float(np.mean([l[key] for l in per_layer]))
  return out


def test_format_table_has_every_set():
  named = {"real": _fake_stats(0.5), "zeroq": _fake_stats(0.1), "dsg": _fake_stats(0.3)}
  table = D.format_table(named)
  lines = table.splitlines()
  assert len(lines) == 2 + len(named)
  for name in named:
    assert any(line.startswith(f"| {name} |") for line in lines)
  assert "cosine_features" in lines[0]
  assert "0.9000" in table  # zeroq cosine_images


def test_plot_writes_png(tmp_path):
  pytest.importorskip("matplotlib")
  named = {"real": _fake_stats(0.5), "zeroq": _fake_stats(0.1), "dsg": _fake_stats(0.3)}
  path = tmp_path / "sub" / "diversity.png"
  D.plot_diversity(named, str(path))
  data = path.read_bytes()
  assert len(data) > 1000
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
