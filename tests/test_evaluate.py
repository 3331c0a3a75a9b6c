"""Evaluator: top-1/top-5/agreement on fake models with controlled predictions, padding of
the last batch (one compile), on-device normalisation, label validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfq_jax.data import IMAGENET_NORM, ImageDataset, normalize
from dfq_jax.evaluate import EvalResults, evaluate, evaluate_dataset, validate_labels

C = 10
N = 23  # not a multiple of the batch size


def _data():
  """Image i has all pixels equal to i (i < 256), so a model can read back the index."""
  images = np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None, None], (N, 4, 4, 3)).copy()
  labels = (np.arange(N) * 7 % C).astype(np.int32)
  return images, labels


# Normalisation with mean 0 and std 1/255 makes x == the uint8 value exactly.
MEAN, STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)


def _lookup_model(ranking, traces=None):
  """logits[i] ranks the classes as ranking[i] (first = top-1): a lookup on the index."""
  ranking = np.asarray(ranking)
  scores = np.zeros((len(ranking), C), np.float32)
  for i, r in enumerate(ranking):
    scores[i, r] = np.arange(len(r), 0, -1)  # first entry gets the highest score
  table = jnp.asarray(scores)

  def f(x):
    if traces is not None:
      traces.append(x.shape)
    idx = jnp.round(x[:, 0, 0, 0]).astype(jnp.int32)
    return table[idx]

  return f


def _rankings(labels, rng, top1_right, top5_right):
  """Rankings where the label is first for `top1_right`, 2nd..5th for `top5_right`, else
  6th or worse."""
  out = []
  for i, y in enumerate(labels):
    others = [c for c in range(C) if c != y]
    rng.shuffle(others)
    if top1_right[i]:
      pos = 0
    elif top5_right[i]:
      pos = int(rng.integers(1, 5))
    else:
      pos = int(rng.integers(5, C))
    out.append(others[:pos] + [y] + others[pos:])
  return np.array(out)


def test_top1_top5_agreement_and_padding():
  images, labels = _data()
  rng = np.random.default_rng(0)
  t1a = rng.random(N) < 0.6
  t5a = t1a | (rng.random(N) < 0.5)
  t1b = rng.random(N) < 0.3
  t5b = t1b | (rng.random(N) < 0.5)
  ra, rb = _rankings(labels, rng, t1a, t5a), _rankings(labels, rng, t1b, t5b)
  traces_a, traces_b = [], []
  res = evaluate(
    [_lookup_model(ra, traces_a), _lookup_model(rb, traces_b)],
    images,
    labels,
    MEAN,
    STD,
    batch_size=5,
    names=["fp", "w4a4"],
  )
  assert isinstance(res, EvalResults)
  assert res.n == N and res.num_classes == C and res.topk == 5 and res.names == ("fp", "w4a4")
  np.testing.assert_array_equal(res.predictions[0], ra[:, 0])
  np.testing.assert_array_equal(res.predictions[1], rb[:, 0])
  np.testing.assert_array_equal(res.correct1, [t1a.sum(), t1b.sum()])
  np.testing.assert_array_equal(res.correct5, [t5a.sum(), t5b.sum()])
  np.testing.assert_allclose(res.top1, [t1a.mean(), t1b.mean()])
  np.testing.assert_allclose(res.top5, [t5a.mean(), t5b.mean()])
  np.testing.assert_allclose(res.agreement, [1.0, np.mean(ra[:, 0] == rb[:, 0])])
  per_class = [np.mean(ra[labels == c, 0] == c) for c in range(C)]
  np.testing.assert_allclose(res.per_class_top1[0], per_class)
  # 23 images in batches of 5: padded last batch, so each model traced exactly once.
  assert traces_a == [(5, 4, 4, 3)] and traces_b == [(5, 4, 4, 3)]
  assert "w4a4" in res.summary() and "agreement" in res.summary()
  assert res.as_dict()["fp"]["top1"] == pytest.approx(t1a.mean())


def test_padding_does_not_count():
  """A model that is right on every real image and on every padded one: counts stay N."""
  images, labels = _data()
  ranking = _rankings(labels, np.random.default_rng(1), np.ones(N, bool), np.ones(N, bool))
  for bs in (1, 4, 22, 23, 24, 1000):
    res = evaluate(_lookup_model(ranking), images, labels, MEAN, STD, batch_size=bs)
    assert res.correct1[0] == N and res.correct5[0] == N and res.predictions.shape == (1, N)


def test_pair_form_and_normalisation_on_device():
  """(apply, variables): the model sees (u8/255 - mean)/std computed on device."""
  images = np.random.default_rng(2).integers(0, 256, (7, 3, 3, 3), dtype=np.uint8)
  seen = {}

  def apply(variables, x):
    seen["x"] = x
    return jnp.mean(x, axis=(1, 2)) @ variables["w"]  # [B, 3] @ [3, C]

  w = jnp.asarray(np.random.default_rng(3).normal(size=(3, C)).astype(np.float32))
  labels = np.zeros(7, np.int32)
  res = evaluate(
    (apply, {"w": w}), images, labels, IMAGENET_NORM.mean, IMAGENET_NORM.std, batch_size=7
  )
  x = normalize(images, IMAGENET_NORM.mean, IMAGENET_NORM.std)
  want = np.argmax(x.mean(axis=(1, 2)) @ np.asarray(w), axis=1)
  np.testing.assert_array_equal(res.predictions[0], want)
  # Preset name instead of constants gives the same.
  res2 = evaluate((apply, {"w": w}), images, labels, "imagenet", None, batch_size=3)
  np.testing.assert_array_equal(res2.predictions, res.predictions)


def test_label_validation():
  images, labels = _data()
  model = _lookup_model(np.tile(np.arange(C), (N, 1)))
  bad = labels.copy()
  bad[4] = C
  with pytest.raises(ValueError, match=r"1 of 23 labels are outside \[0, 10\).*index 4"):
    evaluate(model, images, bad, MEAN, STD, batch_size=8)
  bad[4] = -1
  with pytest.raises(ValueError, match="outside"):
    evaluate(model, images, bad, MEAN, STD, batch_size=8)
  with pytest.raises(ValueError, match="model0 outputs 10 logits but num_classes=100"):
    evaluate(model, images, labels, MEAN, STD, num_classes=100)
  with pytest.raises(ValueError, match="outside"):
    validate_labels(np.array([0, 1, 5]), 5)
  validate_labels(np.array([0, 1, 4]), 5)
  with pytest.raises(ValueError, match="integers"):
    validate_labels(np.array([0.0, 1.0]), 5)


def test_input_checks():
  images, labels = _data()
  model = _lookup_model(np.tile(np.arange(C), (N, 1)))
  with pytest.raises(ValueError, match="uint8"):
    evaluate(model, images.astype(np.float32), labels, MEAN, STD)
  with pytest.raises(ValueError, match="labels must have shape"):
    evaluate(model, images, labels[:-1], MEAN, STD)
  with pytest.raises(ValueError, match="different class counts"):
    evaluate([model, lambda x: jnp.zeros((x.shape[0], 3))], images, labels, MEAN, STD)


def test_topk_with_few_classes_and_dataset_wrapper():
  images = np.zeros((6, 2, 2, 3), np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  ds = ImageDataset(images, labels, ("a", "b", "c"), "tiny")

  def model(x):
    return jnp.tile(jnp.array([[3.0, 2.0, 1.0]]), (x.shape[0], 1))

  res = evaluate_dataset(model, ds, "cifar10", batch_size=4)
  assert res.topk == 3 and res.top5[0] == 1.0
  assert res.top1[0] == pytest.approx(2 / 6)


def test_resnet_on_real_images():
  """Smoke test with the repo's CIFAR ResNet (depth 8, random weights) on 100 real images:
  both model forms agree with a direct jitted forward pass."""
  import os
  from pathlib import Path

  root = Path(os.environ.get("DFQ_CIFAR10_JPEG", "/work/shared/data/cifar10-jpeg"))
  if not (root / "test").is_dir():
    pytest.skip("shared CIFAR-10 JPEGs not available")
  from dfq_jax.data import load_image_folder
  from dfq_jax.models.resnet_cifar import ResNetCifar

  ds = load_image_folder(root, "test", limit=100)
  model = ResNetCifar(depth=8)
  # model.init compiles the random initialisers (~15 s on the 2-core box): shapes only,
  # then deterministic numpy weights.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "'var'" in name or "'scale'" in name:
      return jnp.ones(s.shape, s.dtype)
    if "'mean'" in name or "'bias'" in name:
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(np.float32))

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  res = evaluate_dataset(
    [(model.apply, variables), lambda x: model.apply(variables, x)],
    ds,
    "akamaster_resnet20",
    batch_size=64,
  )
  x = normalize(ds.images, IMAGENET_NORM.mean, IMAGENET_NORM.std)
  want = np.argmax(np.asarray(jax.jit(model.apply)(variables, x)), axis=1)
  assert np.mean(res.predictions[0] == want) >= 0.99  # float reassociation may flip a tie
  assert res.agreement[1] >= 0.99


def test_host_sharded_counts_combine_to_the_single_host_result():
  """Two simulated hosts, each evaluating images[p::2], sum to the full evaluation."""
  from dfq_jax.evaluate import combine_host_counts, evaluate, host_counts

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (37, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 7, 37).astype(np.int32)
  w = rng.normal(size=(48, 7)).astype(np.float32)
  model_a = lambda x: x.reshape(x.shape[0], -1) @ w
  model_b = lambda x: x.reshape(x.shape[0], -1) @ (w + 0.5 * np.sign(w))
  names = ("a", "b")
  mean, std = (0.5,) * 3, (0.25,) * 3
  full = evaluate([model_a, model_b], images, labels, mean, std, 8, num_classes=7, names=names)
  parts = [
    evaluate(
      [model_a, model_b], images[p::2], labels[p::2], mean, std, 8, num_classes=7, names=names
    )
    for p in range(2)
  ]
  combined = combine_host_counts(
    np.stack([host_counts(r) for r in parts]), names, 7, full.topk, 0.0
  )
  assert combined.n == 37
  np.testing.assert_array_equal(combined.correct1, full.correct1)
  np.testing.assert_array_equal(combined.correct5, full.correct5)
  np.testing.assert_allclose(combined.agreement, full.agreement)
  np.testing.assert_allclose(combined.per_class_top1, full.per_class_top1)


def test_compiler_options_are_accepted_and_keep_predictions():
  """Evaluation jitted with the Eigen-convolution option gives the same predictions."""
  from dfq_jax import xla_options
  from dfq_jax.models import get_model

  model = get_model("resnet8_cifar", num_classes=10)
  images = np.asarray(jax.random.randint(jax.random.key(0), (24, 32, 32, 3), 0, 256), np.uint8)
  labels = np.arange(24) % 10
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  spec = (model.apply, variables)
  options = xla_options.compiler_options("eigen")
  assert options  # on this CPU the option is accepted
  plain = evaluate(spec, images, labels, MEAN, STD, batch_size=8)
  eigen = evaluate(spec, images, labels, MEAN, STD, batch_size=8, compiler_options=options)
  np.testing.assert_array_equal(plain.predictions, eigen.predictions)
  np.testing.assert_array_equal(plain.correct1, eigen.correct1)
