"""A CIFAR ResNet student as a QDQ ONNX graph, BatchNorm folded into the convolutions.

Per conv: y = BN(conv(x, fq(W))) = conv(x, γ ⊙ fq(W)) + (β - γ μ), γ = scale / sqrt(var +
eps), so the exported weight is DequantizeLinear(q, γ Δ, z) with dfq_jax's integers q
(the per-channel grid scaled by γ: exact, no re-quantization; for γ < 0 the scale is
negative, which ONNX allows) and the folded bias is float. Each QuantAct becomes
[Clip] -> QuantizeLinear -> DequantizeLinear with its trained range. Input: float32 NCHW,
normalised as the teacher was trained. Shortcut A (akamaster: a stride-2 subsample plus zero
channels) is a fixed 0/1 1x1 conv; B (pytorchcv) a folded 1x1 projection.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dfq_jax.export import qdq
from dfq_jax.quant.layers import FULL_PRECISION, QuantPolicy

OPSET = 21
BN_EPS = 1e-5


class _Graph:
  """Nodes and initializers with unique names."""

  def __init__(self):
    self.nodes, self.inits, self._n = [], [], 0

  def name(self, base: str) -> str:
    self._n += 1
    return f"{base}_{self._n}"

  def const(self, base: str, value: np.ndarray) -> str:
    name = self.name(base)
    self.inits.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def op(self, op_type: str, inputs, base: str, **attrs) -> str:
    out = self.name(base)
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
    return out


def _node(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


class _Exporter:
  def __init__(self, variables: dict, policy: QuantPolicy, shortcut: str):
    self.params, self.stats = variables["params"], variables["batch_stats"]
    self.ranges, self.policy = variables.get("quant_stats", {}), policy
    self.shortcut = shortcut
    self.g = _Graph()

  def weight(self, path: str, kernel: np.ndarray, gamma: np.ndarray, role: str) -> str:
    """The layer's weight for ONNX (conv: OIHW from HWIO; dense: [in, out] for Gemm), each
    output channel scaled by `gamma`: DequantizeLinear of dfq_jax's integers, or float."""
    conv = kernel.ndim == 4
    to_onnx = (lambda a: np.transpose(a, (3, 2, 0, 1))) if conv else (lambda a: a)
    bits = self.policy.weight_bits(path, role)
    if bits is None:
      return self.g.const(f"{path}/w", to_onnx(kernel * gamma).astype(np.float32))
    q, delta, z = qdq.quantized_weight(kernel, bits, self.policy.weight_mode)
    z = qdq.check_zero_point(z, f"weights of {path}")
    g = self.g
    return g.op(
      "DequantizeLinear",
      [
        g.const(f"{path}/w_q", to_onnx(q)),
        g.const(f"{path}/w_scale", (delta * gamma).astype(np.float32)),
        g.const(f"{path}/w_zero", z),
      ],
      f"{path}/w_dq",
      axis=0 if conv else 1,
    )

  def conv_bn(self, x: str, conv: str, bn: str, stride: int, role: str = "") -> str:
    kernel = np.asarray(_node(self.params, conv)["kernel"], np.float32)  # HWIO
    p, s = _node(self.params, bn), _node(self.stats, bn)
    gamma = np.asarray(p["scale"], np.float32) / np.sqrt(np.asarray(s["var"], np.float32) + BN_EPS)
    bias = np.asarray(p["bias"], np.float32) - gamma * np.asarray(s["mean"], np.float32)
    w = self.weight(conv, kernel, gamma, role)
    k = kernel.shape[0]
    pad = k // 2 if k > 1 else 0
    return self.g.op(
      "Conv",
      [x, w, self.g.const(f"{conv}/b", bias.astype(np.float32))],
      conv,
      strides=[stride, stride],
      pads=[pad, pad, pad, pad],
      kernel_shape=[k, k],
    )

  def quant_act(self, x: str, path: str) -> str:
    bits = self.policy.act_bits(path)
    if bits is None:
      return x
    r = _node(self.ranges, path)
    delta, z = qdq.affine_params(r["x_min"], r["x_max"], bits)
    z = qdq.check_zero_point(np.asarray(z).reshape(()), f"activation {path}")
    g = self.g
    if bits < 8:
      half = 2.0 ** (bits - 1)
      lo = np.float32((-half - z) * delta)
      hi = np.float32((half - 1 - z) * delta)
      x = g.op("Clip", [x, g.const(f"{path}/lo", lo), g.const(f"{path}/hi", hi)], f"{path}/clip")
    scale, zero = g.const(f"{path}/scale", np.float32(delta)), g.const(f"{path}/zero", z)
    y = g.op("QuantizeLinear", [x, scale, zero], f"{path}/q")
    return g.op("DequantizeLinear", [y, scale, zero], f"{path}/dq")

  def block(self, x: str, name: str, in_planes: int, planes: int, stride: int) -> str:
    g = self.g
    out = g.op("Relu", [self.conv_bn(x, f"{name}/conv1", f"{name}/bn1", stride)], f"{name}/relu1")
    out = self.quant_act(out, f"{name}/act1")
    out = self.conv_bn(out, f"{name}/conv2", f"{name}/bn2", 1)
    if self.shortcut == "B" and (stride != 1 or in_planes != planes):
      short = self.conv_bn(x, f"{name}/shortcut_conv", f"{name}/shortcut_bn", stride)
    elif stride != 1 or in_planes != planes:
      # Option A (x[:, ::2, ::2] and zero channels on both sides) as a fixed 1x1 stride-2
      # conv with 0/1 weights: exact in float, and a plain conv for ORT's QDQ passes (its
      # QDQ propagation through Slice/Pad builds an ill-typed QuantizeLinear, ORT 1.32).
      pad = planes // 4
      select = np.zeros((planes, in_planes, 1, 1), np.float32)
      select[np.arange(in_planes) + pad, np.arange(in_planes), 0, 0] = 1.0
      short = g.op(
        "Conv",
        [x, g.const(f"{name}/short_select", select)],
        f"{name}/shortcut",
        strides=[stride, stride],
        kernel_shape=[1, 1],
      )
    else:
      short = x
    out = g.op("Relu", [g.op("Add", [out, short], f"{name}/add")], f"{name}/relu2")
    return self.quant_act(out, f"{name}/act2")

  def build(self, depth: int, width: int, num_classes: int) -> onnx.GraphProto:
    g = self.g
    x = g.op("Relu", [self.conv_bn("input", "conv1", "bn1", 1, role="first")], "relu1")
    x = self.quant_act(x, "act1")
    in_planes, n = width, (depth - 2) // 6
    for stage in range(3):
      planes = width * 2**stage
      for b in range(n):
        stride = 2 if stage > 0 and b == 0 else 1
        x = self.block(x, f"layer{stage + 1}_{b}", in_planes, planes, stride)
        in_planes = planes
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    kernel = np.asarray(self.params["linear"]["kernel"], np.float32)  # [in, out]
    w = self.weight("linear", kernel, np.ones(kernel.shape[-1], np.float32), "last")
    bias = g.const("linear/b", np.asarray(self.params["linear"]["bias"], np.float32))
    logits = g.op("Gemm", [pooled, w, bias], "logits")
    return helper.make_graph(
      g.nodes,
      "dfq_jax_student",
      [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
      [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", num_classes])],
      g.inits,
    )


def export_resnet_cifar(model, variables: dict, metadata: dict[str, str]) -> onnx.ModelProto:
  """The ONNX model of a `ResNetCifar` student (`model.quant` its QuantPolicy), or of the
  float teacher (`model.quant` None)."""
  # The float teacher (quant=None): every layer full precision, no QDQ nodes.
  policy = model.quant or QuantPolicy(w_bits=FULL_PRECISION, a_bits=FULL_PRECISION)
  graph = _Exporter(variables, policy, model.shortcut).build(
    model.depth, model.width, model.num_classes
  )
  onnx_model = helper.make_model(
    graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dfq_jax"
  )
  for key, value in metadata.items():
    onnx_model.metadata_props.add(key=key, value=str(value))
  onnx.checker.check_model(onnx_model)
  return onnx_model
