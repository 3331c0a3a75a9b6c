"""The deployment quantizer's integer graph: ONNX Runtime runs integer kernels that equal
our integer-arithmetic reference, close to dfq_jax's fake-quantized student."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # the `export` extra
pytest.importorskip("onnxruntime")

from dfq_test_utils import load_config, perturbed_student, set_values, tiny_config  # noqa: E402

from dfq_jax import run as run_lib  # noqa: E402
from dfq_jax.export import integer_reference, latency, runtime  # noqa: E402
from dfq_jax.export.exporter import compare_on_eval_set, export  # noqa: E402
from dfq_jax.export.integer_graph import IntegerGraphBuilder  # noqa: E402
from dfq_jax.export.onnx_models import export_model, integer_program  # noqa: E402
from dfq_jax.export.workdir import load_student  # noqa: E402
from dfq_jax.models import get_model  # noqa: E402
from dfq_jax.quant import QuantPolicy  # noqa: E402
from dfq_jax.quant.config import policy_from_config  # noqa: E402

# ORT's optimised graph of the integer export: these and the layout ops, nothing float.
INTEGER_KERNELS = {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"}
LAYOUT_OPS = {"Transpose", "Slice", "Pad", "Flatten", "Clip", "NhwcMaxPool", "MaxPool"}


def _deploy(bits):
  return QuantPolicy(w_bits=bits, a_bits=bits, weight_mode="symmetric", deploy=True)


def _n_convs(variables) -> int:
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  return sum(1 for path, leaf in flat if "kernel" in jax.tree_util.keystr(path) and leaf.ndim == 4)


@pytest.mark.parametrize(
  "name, shortcut, bits",
  [
    ("resnet8_cifar", "A", 4),  # option A: integer Slice + Pad with the zero point
    ("resnet8_cifar", "B", 8),
    ("resnet18", "", 4),  # max-pool on uint8
    ("resnet50", "", 8),  # bottlenecks, projection shortcuts
    ("mobilenetv2", "", 4),  # depthwise, ReLU6 as integer Clip, linear bottlenecks
    ("mobilenetv2_torchvision", "", 8),
  ],
)
def test_onnxruntime_integer_kernels_equal_the_integer_reference(name, shortcut, bits):
  size = 16 if name.endswith("_cifar") else 32
  student, variables, x = perturbed_student(name, _deploy(bits), shortcut, size=size)
  model, ops = integer_program(student, variables, {})
  data = model.SerializeToString()
  nchw = np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))
  kernels = runtime.kernel_counts(data)
  # Every conv is a QLinearConv (int32 accumulation), the sums QLinearAdd, the pool and the
  # classifier integer too; the only float op left quantizes the input image.
  assert kernels["QLinearConv"] == _n_convs(variables)
  assert kernels["QLinearGlobalAveragePool"] == kernels["QGemm"] == kernels["QuantizeLinear"] == 1
  assert set(kernels) <= INTEGER_KERNELS | LAYOUT_OPS | {"QuantizeLinear"}, kernels
  fast = runtime.session(data).run(None, {"input": nchw})[0]
  ref = integer_reference.run(ops, nchw)
  scale = np.abs(ref).max()
  # Integer arithmetic both (the reference rounds the residual sum with ORT's fused
  # multiply-add): equal, up to a rounding tie (none measured in these models).
  per_image = np.abs(fast - ref).max(axis=1)
  assert np.mean(per_image <= 1e-6 * scale) >= 0.9
  assert per_image.max() <= 0.02 * scale
  # dfq_jax's fake-quantized student: the int32 bias (off by up to half an accumulator
  # step, s_x s_w / 2) and the float32 requantization multipliers move values that sit
  # near a rounding boundary by one level, and at 4 bits such a level travels on through
  # later layers (random weights, near-equal logits): predictions, and logits on average.
  ours = np.asarray(student.apply(variables, x))
  assert np.mean(ours.argmax(1) == ref.argmax(1)) >= 0.9
  assert np.abs(ours - ref).mean() < (0.05 if bits == 4 else 0.02) * np.abs(ours).max()


def test_the_integer_graph_as_written_computes_the_same():
  # No ORT fusion: DequantizeLinear / float ops / QuantizeLinear give the integer values.
  student, variables, x = perturbed_student("resnet8_cifar", _deploy(4), "B")
  model, ops = integer_program(student, variables, {})
  nchw = np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2)))
  plain = runtime.session(model.SerializeToString(), optimize=False).run(None, {"input": nchw})[0]
  ref = integer_reference.run(ops, nchw)
  # Its float Add then QuantizeLinear rounds a sum at a tie differently from the fused
  # QLinearAdd (a multiply-add on the integers): a level here and there.
  per_image = np.abs(plain - ref).max(axis=1)
  assert np.mean(per_image <= 1e-5 * np.abs(ref).max()) >= 0.75
  assert per_image.max() <= 0.02 * np.abs(ref).max()


def test_deployment_quantizers_exist_only_with_deploy_and_their_ranges_hold_zero():
  x = jnp.zeros((1, 16, 16, 3))
  paper = get_model("resnet8_cifar", num_classes=10, quant=QuantPolicy(w_bits=4, a_bits=4))
  deploy = get_model("resnet8_cifar", num_classes=10, quant=_deploy(4), shortcut="B")
  names = lambda v: {"/".join(k) for k in _paths(v["quant_stats"])}
  paper_acts = names(paper.init(jax.random.key(0), x))
  deploy_acts = names(deploy.init(jax.random.key(0), x))
  # Without deploy the student is the papers' (checkpoints unchanged); with it, the input,
  # the conv outputs before the sums, the projections and the pool are quantized too.
  assert not any(
    p.split("/")[-1].startswith(("input_", "conv2_", "shortcut_", "pool_")) for p in paper_acts
  )
  assert deploy_acts - paper_acts == {
    "input_act",
    "pool_act",
    *(f"layer{s}_0/conv2_act" for s in (1, 2, 3)),
    *(f"layer{s}_0/shortcut_act" for s in (2, 3)),
  }
  policy = _deploy(4)
  assert policy.act_bits("input_act", deploy=True) == 8  # deploy_bits
  assert QuantPolicy().act_bits("input_act", deploy=True) is None
  lo, hi = policy.act_range(jnp.float32(0.5), jnp.float32(2.0))
  assert float(lo) == 0.0 and float(hi) == 2.0  # 0 in range: exact zero padding, uint8 zero point
  with pytest.raises(ValueError, match="weight_mode=symmetric"):
    QuantPolicy(deploy=True)


def _paths(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict) and "x_min" in value:
      yield (*prefix, key)
    elif isinstance(value, dict):
      yield from _paths(value, (*prefix, key))


def test_integer_graph_refuses_layers_left_in_full_precision():
  policy = QuantPolicy(weight_mode="symmetric", deploy=True, rules=(("^layer1_0/act1$", None, 32),))
  student, variables, _ = perturbed_student("resnet8_cifar", policy, "A")
  with pytest.raises(ValueError, match="activation layer1_0/act1 is left in full precision"):
    export_model(student, variables, {})
  with pytest.raises(ValueError, match="deployment quantizer"):
    IntegerGraphBuilder(variables, QuantPolicy())


def test_a_trained_deploy_student_ships_as_the_integer_model_it_evaluated(
  tiny_teacher_dir, tmp_path
):
  # The thing trained is the thing evaluated is the thing shipped: a short AdaDFQ run with
  # the deployment quantizer, exported, gives ONNX Runtime's integer kernels the predictions
  # of dfq_jax's evaluation of the stored student.
  workdir = str(tmp_path / "run")
  config = set_values(
    tiny_config(tiny_teacher_dir, "adadfq"),
    **{"quant.deploy": True, "quant.weight_mode": "symmetric"},
  )
  run_lib.run(config, workdir, log=lambda *a: None)
  config, student, variables, data = export(workdir, str(tmp_path / "s.onnx"))
  assert os.path.exists(tmp_path / "s.onnx")
  assert "QLinearConv" in runtime.kernel_counts(data) and "Conv" not in runtime.kernel_counts(data)
  # --evaluate's report: dfq_jax's top-1 of the exported student is the run's own final
  # top-1; ORT's integer kernels predict as dfq_jax does and equal the integer reference.
  report = compare_on_eval_set(config, student, variables, data)
  results = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert report["dfq_jax_top1"] == pytest.approx(results["final_top1"], abs=1e-6)
  assert report["prediction_agreement"] >= 95.0
  assert report["integer_reference_images"] == 64
  assert report["integer_reference_prediction_agreement"] == 100.0
  assert report["integer_reference_images_equal"] >= 90.0
  meta = {p.key: p.value for p in onnx.load(str(tmp_path / "s.onnx")).metadata_props}
  assert "deployment" in meta["bits"] and meta["graph"].startswith("integer")
  _, loaded, _ = load_student(workdir, "final")
  assert loaded.quant.deploy


def test_deploy_config_argument_and_latency_bench(tmp_path):
  config = load_config("cifar10_resnet20.py", "adadfq,w4a4,deploy")
  policy = policy_from_config(config)
  assert policy.deploy and policy.weight_mode == "symmetric" and policy.deploy_bits == 8
  config.quant.weight_mode = "asymmetric"
  with pytest.raises(ValueError, match="needs symmetric weights"):
    policy_from_config(config)
  # python -m dfq_jax.export.latency: size and alternating-round latency of exported files.
  student, variables, _ = perturbed_student("resnet8_cifar", _deploy(8), "A")
  paths = []
  for name, m in (("int", student), ("fp", get_model("resnet8_cifar", num_classes=10))):
    path = tmp_path / f"{name}.onnx"
    v = variables if m is student else {k: variables[k] for k in ("params", "batch_stats")}
    path.write_bytes(export_model(m, v, {"bits": name}).SerializeToString())
    paths.append(str(path))
  rows = latency.compare(paths, batch=4, calls=2, rounds=2, size=16)
  assert [r["bits"] for r in rows] == ["int", "fp"]
  assert all(r["latency_s"] > 0 and len(r["round_medians_s"]) == 2 for r in rows)
  assert "QLinearConv" in rows[0]["kernels"] and "QLinearConv" not in rows[1]["kernels"]
  with pytest.raises(ValueError, match="is not a file"):
    latency.compare([str(tmp_path / "none.onnx")], 1, 1, 1, 16)
