"""The building blocks of a QDQ ONNX graph of a dfq_jax student, BatchNorm folded.

Per conv: y = BN(conv(x, fq(W))) = conv(x, γ ⊙ fq(W)) + (β - γ μ), γ = scale / sqrt(var +
eps), so the exported weight is DequantizeLinear(q, γ Δ, z) with dfq_jax's integers q
(the per-channel grid scaled by γ: exact, no re-quantization; for γ < 0 the scale is
negative, which ONNX allows) and the folded bias is float. Each QuantAct becomes
[Clip] -> QuantizeLinear -> DequantizeLinear with its trained range. Layers the policy
leaves in full precision are plain float weights. Input: float32 NCHW, normalised as the
teacher was trained. The per-architecture graphs are in onnx_models.py.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dfq_jax.export import qdq
from dfq_jax.quant.layers import FULL_PRECISION, QuantPolicy

OPSET = 21
BN_EPS = 1e-5


def _node(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


class GraphBuilder:
  """Nodes and initializers of one student (or teacher: `policy` None) graph."""

  def __init__(self, variables: dict, policy: QuantPolicy | None):
    self.params, self.stats = variables["params"], variables.get("batch_stats", {})
    self.ranges = variables.get("quant_stats", {})
    # The float teacher: every layer full precision, no QDQ nodes.
    self.policy = policy or QuantPolicy(w_bits=FULL_PRECISION, a_bits=FULL_PRECISION)
    self.nodes, self.inits, self._n = [], [], 0

  def name(self, base: str) -> str:
    self._n += 1
    return f"{base}_{self._n}"

  def const(self, base: str, value: np.ndarray) -> str:
    name = self.name(base)
    self.inits.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def const_int4(self, base: str, value: np.ndarray) -> str:
    """An ONNX INT4 initializer (packed two a byte) of integers in [-8, 7]."""
    name = self.name(base)
    value = np.asarray(value)
    nibbles = (value.astype(np.int8).ravel() & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
      nibbles = np.append(nibbles, np.uint8(0))
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)  # first value low
    self.inits.append(
      helper.make_tensor(name, TensorProto.INT4, value.shape, packed.tobytes(), raw=True)
    )
    return name

  def op(self, op_type: str, inputs, base: str, **attrs) -> str:
    out = self.name(base)
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
    return out

  def weight(self, path: str, kernel: np.ndarray, gamma: np.ndarray, role: str) -> str:
    """The layer's weight for ONNX (conv: OIHW from HWIO; dense: [in, out] for Gemm), each
    output channel scaled by `gamma`: DequantizeLinear of dfq_jax's integers, or float."""
    conv = kernel.ndim == 4
    to_onnx = (lambda a: np.transpose(a, (3, 2, 0, 1))) if conv else (lambda a: a)
    bits = self.policy.weight_bits(path, role)
    if bits is None:
      return self.const(f"{path}/w", to_onnx(kernel * gamma).astype(np.float32))
    q, delta, z = qdq.quantized_weight(kernel, bits, self.policy.weight_mode)
    q, z, storage = qdq.weight_storage(q, z, f"weights of {path}", bits)
    const = self.const_int4 if storage == "int4" else self.const
    return self.op(
      "DequantizeLinear",
      [
        const(f"{path}/w_q", to_onnx(q)),
        self.const(f"{path}/w_scale", (delta * gamma).astype(np.float32)),
        const(f"{path}/w_zero", z),
      ],
      f"{path}/w_dq",
      axis=0 if conv else 1,
    )

  def folded(self, conv: str, bn: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kernel HWIO, γ [C], bias [C]) with BN(conv(x, W)) = conv(x, γ ⊙ W) + bias."""
    kernel = np.asarray(_node(self.params, conv)["kernel"], np.float32)
    p, s = _node(self.params, bn), _node(self.stats, bn)
    gamma = np.asarray(p["scale"], np.float32) / np.sqrt(np.asarray(s["var"], np.float32) + BN_EPS)
    bias = np.asarray(p["bias"], np.float32) - gamma * np.asarray(s["mean"], np.float32)
    return kernel, gamma, bias

  def conv_bn(
    self, x: str, conv: str, bn: str, stride: int, role: str = "", groups: int = 1
  ) -> str:
    """QConv (PyTorch padding k // 2) + BatchNorm, folded into one Conv."""
    kernel, gamma, bias = self.folded(conv, bn)
    w = self.weight(conv, kernel, gamma, role)
    kh, kw = kernel.shape[:2]
    return self.op(
      "Conv",
      [x, w, self.const(f"{conv}/b", bias.astype(np.float32))],
      conv,
      strides=[stride, stride],
      pads=[kh // 2, kw // 2, kh // 2, kw // 2],
      kernel_shape=[kh, kw],
      group=groups,
    )

  def quant_act(self, x: str, path: str, deploy: bool = False) -> str:
    bits = self.policy.act_bits(path, deploy)
    if bits is None:
      return x
    r = _node(self.ranges, path)
    lo, hi = self.policy.act_range(np.float32(r["x_min"]), np.float32(r["x_max"]))
    delta, z = qdq.affine_params(lo, hi, bits)
    z = qdq.check_zero_point(np.asarray(z).reshape(()), f"activation {path}")
    if bits < 8:
      half = 2.0 ** (bits - 1)
      lo = np.float32((-half - z) * delta)
      hi = np.float32((half - 1 - z) * delta)
      x = self.op(
        "Clip", [x, self.const(f"{path}/lo", lo), self.const(f"{path}/hi", hi)], f"{path}/clip"
      )
    scale, zero = self.const(f"{path}/scale", np.float32(delta)), self.const(f"{path}/zero", z)
    y = self.op("QuantizeLinear", [x, scale, zero], f"{path}/q")
    return self.op("DequantizeLinear", [y, scale, zero], f"{path}/dq")

  def deploy_act(self, x: str, path: str) -> str:
    """A deployment quantizer (`QuantAct(deploy=True)`): the identity unless it deploys."""
    return self.quant_act(x, path, deploy=True)

  def relu(self, x: str, base: str) -> str:
    return self.op("Relu", [x], base)

  def add(self, a: str, b: str, base: str) -> str:
    return self.op("Add", [a, b], base)

  def max_pool(self, x: str) -> str:
    """torch's MaxPool2d(3, 2, 1) (ONNX pads are ignored by the max, like torch's -inf)."""
    return self.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)

  def shortcut_a(self, x: str, name: str, in_planes: int, planes: int, stride: int) -> str:
    """Option A (x[:, ::2, ::2] and planes // 4 zero channels on each side) as a fixed
    1x1 stride-2 conv with 0/1 weights: exact in float, and a plain conv for ORT's QDQ
    passes (its QDQ propagation through Slice/Pad builds an ill-typed QuantizeLinear,
    ORT 1.32)."""
    pad = planes // 4
    select = np.zeros((planes, in_planes, 1, 1), np.float32)
    select[np.arange(in_planes) + pad, np.arange(in_planes), 0, 0] = 1.0
    return self.op(
      "Conv",
      [x, self.const(f"{name}/short_select", select)],
      f"{name}/shortcut",
      strides=[stride, stride],
      kernel_shape=[1, 1],
    )

  def relu6(self, x: str, base: str) -> str:
    zero, six = (
      self.const(f"{base}/zero", np.float32(0.0)),
      self.const(f"{base}/six", np.float32(6.0)),
    )
    return self.op("Clip", [x, zero, six], base)

  def classifier(self, x: str, path: str) -> str:
    """Global average pool, flatten and the (role 'last') dense layer: the logits."""
    pooled = self.op("Flatten", [self.op("GlobalAveragePool", [x], "pool")], "flatten", axis=1)
    pooled = self.deploy_act(pooled, "pool_act")
    p = _node(self.params, path)
    kernel = np.asarray(p["kernel"], np.float32)  # [in, out]
    inputs = [pooled, self.weight(path, kernel, np.ones(kernel.shape[-1], np.float32), "last")]
    if "bias" in p:
      inputs.append(self.const(f"{path}/b", np.asarray(p["bias"], np.float32)))
    return self.op("Gemm", inputs, "logits")

  def model(self, logits: str, num_classes: int, metadata: dict[str, str]) -> onnx.ModelProto:
    """The checked ONNX model with input 'input' [batch, 3, H, W] and `metadata`."""
    graph = helper.make_graph(
      self.nodes,
      "dfq_jax_student",
      [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
      [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", num_classes])],
      self.inits,
    )
    model = helper.make_model(
      graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dfq_jax"
    )
    for key, value in metadata.items():
      model.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(model)
    return model
