"""QDQ ONNX export: the graph ONNX Runtime runs is the student dfq_jax evaluates."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # the `export` extra
pytest.importorskip("onnxruntime")

from dfq_test_utils import perturbed_student, tiny_config  # noqa: E402

from dfq_jax import evaluate as evaluate_lib  # noqa: E402
from dfq_jax import run as run_lib  # noqa: E402
from dfq_jax.data import eval_set as eval_set_lib  # noqa: E402
from dfq_jax.export import qdq, runtime  # noqa: E402
from dfq_jax.export.onnx_models import export_model  # noqa: E402
from dfq_jax.export.workdir import load_student  # noqa: E402
from dfq_jax.models import teacher as teacher_lib  # noqa: E402
from dfq_jax.quant import QuantPolicy, numerics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_integer_weights_dequantize_to_the_fake_quantized_kernel(bits, mode):
  w = np.asarray(jax.random.normal(jax.random.key(0), (3, 3, 16, 32)), np.float32)
  q, delta, z = qdq.quantized_weight(w, bits, mode)
  if mode == "symmetric":
    assert not z.any()  # what int8 engines need
  half = 2 ** (bits - 1)
  assert q.min() >= -half and q.max() <= half - 1
  np.testing.assert_allclose(
    (q.astype(np.float32) - z) * delta,
    np.asarray(numerics.quantize_weight(jnp.asarray(w), bits, mode)),
    rtol=1e-6,
    atol=1e-7,
  )


def _student(
  shortcut, bits, negative_gamma=True, weight_mode="asymmetric", name="resnet8_cifar", size=16
):
  policy = QuantPolicy(w_bits=bits, a_bits=bits, weight_mode=weight_mode)
  return perturbed_student(name, policy, shortcut, negative_gamma, size)


@pytest.mark.parametrize(
  "name, shortcut, bits, weight_mode",
  [
    ("resnet8_cifar", "A", 4, "asymmetric"),
    ("resnet8_cifar", "A", 8, "asymmetric"),
    ("resnet8_cifar", "B", 4, "asymmetric"),
    ("resnet8_cifar", "B", 8, "asymmetric"),
    ("resnet8_cifar", "A", 8, "symmetric"),
    # ImageNet families at 32x32 (the final pool is global): basic blocks, both bottleneck
    # stride placements, MobileNetV2 in both layouts (depthwise convs, ReLU6, linear
    # bottlenecks; pytorchcv's bias-free classifier).
    ("resnet18", "", 4, "asymmetric"),
    ("mobilenetv2", "", 4, "asymmetric"),
    ("resnet50", "", 4, "asymmetric"),
    ("resnet50_torchvision", "", 8, "symmetric"),
    ("mobilenetv2_torchvision", "", 8, "asymmetric"),
  ],
)
def test_onnxruntime_logits_equal_dfq_jax(name, shortcut, bits, weight_mode):
  size = 16 if name.endswith("_cifar") else 32
  student, variables, x = _student(shortcut, bits, weight_mode=weight_mode, name=name, size=size)
  ours = np.asarray(student.apply(variables, x))
  model = export_model(student, variables, {"bits": str(bits)})
  # 4-bit weights are stored as ONNX INT4 (two a byte), 8-bit ones as INT8; a layer whose
  # zero points do not fit (a channel range that excludes 0: depthwise kernels) one size up.
  kinds = {t.data_type for t in model.graph.initializer if "/w_q_" in t.name}
  p = onnx.TensorProto
  expected = p.INT4 if bits == 4 else p.INT8
  assert expected in kinds and kinds <= {expected, p.INT8, p.INT16}, kinds
  nchw = np.transpose(np.asarray(x), (0, 3, 1, 2))
  # As written (no ORT rewrites): the same arithmetic up to float32 rounding of the scales.
  plain = runtime.session(model.SerializeToString(), optimize=False).run(None, {"input": nchw})[0]
  # Nearly every logit to float32 rounding; a rounding tie of one activation (x / Δ vs s * x)
  # moves a few by at most a quantization step.
  scale = np.abs(ours).max()
  fast = runtime.session(model.SerializeToString()).run(None, {"input": nchw})[0]
  if name.startswith("resnet50"):
    # 50 layers carry a flipped tie on through ~16 further quantizers (measured: 19-88 % of
    # the logits to float32 rounding, mean error 0.2-1 % of the largest logit; random
    # weights make near-equal logits): the predictions, and the logits on average.
    assert np.mean(plain.argmax(1) == ours.argmax(1)) >= 0.9
    assert np.abs(plain - ours).mean() < 2e-2 * scale
    assert np.mean(fast.argmax(1) == ours.argmax(1)) >= 0.8
    return
  assert np.mean(np.abs(plain - ours) < 1e-5 * scale) > 0.85
  assert np.abs(plain - ours).max() < 1e-2 * scale
  # ORT's optimised graph (folded weights, fused convs) rounds differently; predictions agree.
  assert np.mean(fast.argmax(1) == ours.argmax(1)) >= 0.95
  assert np.abs(fast - ours).max() < 0.1 * np.abs(ours).max()  # a few rounding flips


def test_a_weight_range_without_zero_is_stored_in_int16_and_activations_are_refused():
  # A channel whose weights share a sign (a depthwise 3x3 kernel has only 9): zero point
  # outside int8, exact in int16.
  kernel = np.array([[1.0, 0.0], [2.0, -1.0], [1.5, 0.5]], np.float32)  # channel 0 in [1, 2]
  q, delta, z = qdq.quantized_weight(kernel, 8)
  q, z, storage = qdq.weight_storage(q, z, "weights of dw")
  assert q.dtype == z.dtype == np.int16 and storage == "int16"
  np.testing.assert_allclose(
    (q.astype(np.float32) - z) * delta, np.asarray(numerics.quantize_weight(kernel, 8)), atol=1e-6
  )
  far = qdq.affine_params(np.float32([1000.0]), np.float32([1000.001]), 8)[1]
  with pytest.raises(ValueError, match="weights of conv1.*does not fit int16"):
    qdq.weight_storage(np.zeros(1), far, "weights of conv1")
  with pytest.raises(ValueError, match="activation act1.*does not contain 0"):
    qdq.check_zero_point(
      qdq.affine_params(np.float32(1.0), np.float32(2.0), 8)[1][None], "activation act1"
    )


def _cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "dfq_jax.export", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def _listing(workdir):
  return sorted(
    (os.path.relpath(os.path.join(d, f), workdir), os.path.getmtime(os.path.join(d, f)))
    for d, _, files in os.walk(workdir)
    for f in files
  )


def test_cli_exports_finished_runs_and_changes_nothing_there(tiny_teacher_dir, tmp_path):
  train_dir, eval_dir = str(tmp_path / "train"), str(tmp_path / "eval")
  run_lib.run(tiny_config(tiny_teacher_dir, "adadfq"), train_dir, log=lambda *a: None)
  run_lib.run(tiny_config(tiny_teacher_dir, "eval"), eval_dir, log=lambda *a: None)
  for workdir, which in ((train_dir, "final"), (train_dir, "best"), (eval_dir, "final")):
    # What is exported is what the run evaluated: the stored student's top-1 is the one in
    # results.json.
    config, student, variables = load_student(workdir, which)
    ds = eval_set_lib.load_eval_set(config)
    norm = eval_set_lib.normalization(config)
    top1 = 100 * float(
      evaluate_lib.evaluate(
        [(student.apply, variables)], ds.images, ds.labels, norm.mean, norm.std, 64
      ).top1[0]
    )
    results = json.loads(open(os.path.join(workdir, "results.json")).read())
    key = {"final": "final_top1", "best": "best_top1"}[which]
    assert top1 == pytest.approx(results[key if key in results else "quant_top1"], abs=1e-3)
    before = _listing(workdir)
    out = tmp_path / f"{os.path.basename(workdir)}_{which}.onnx"
    proc = _cli(f"--workdir={workdir}", f"--out={out}", f"--which={which}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _listing(workdir) == before
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["num_classes"] == "10" and meta["which"] == which and "mean" in meta
    # The file holds that student: ORT as written equals dfq_jax.
    x = np.asarray(jax.random.normal(jax.random.key(2), (8, 16, 16, 3)))
    ours = np.asarray(student.apply(variables, x))
    theirs = runtime.session(model.SerializeToString(), optimize=False).run(
      None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
    )[0]
    assert np.mean(np.abs(theirs - ours) < 1e-5 * np.abs(ours).max()) > 0.95
  # The float teacher, the baseline: no QDQ node, ORT equals the teacher's logits.
  out = tmp_path / "teacher.onnx"
  assert _cli(f"--workdir={eval_dir}", f"--out={out}", "--teacher").returncode == 0
  model = onnx.load(str(out))
  assert not {n.op_type for n in model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
  config = tiny_config(tiny_teacher_dir, "eval")
  teacher = teacher_lib.teacher_model(config)
  x = np.asarray(jax.random.normal(jax.random.key(4), (8, 16, 16, 3)))
  ours = np.asarray(teacher.apply(teacher_lib.load_teacher(config), x))
  theirs = runtime.session(model.SerializeToString()).run(
    None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))}
  )[0]
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())
  # Bad input: one error line, exit code 2, nothing written.
  for args, message in (
    ([f"--workdir={train_dir}", f"--out={tmp_path / 'train_final.onnx'}"], "--overwrite"),
    ([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'x.onnx'}"], "holds no run"),
    ([f"--workdir={eval_dir}", f"--out={tmp_path / 'y.onnx'}", "--which=best"], "one student"),
  ):
    proc = _cli(*args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()
