"""The integer graph of a deployment-quantizer student: ONNX Runtime runs integer kernels.

A student of `QuantPolicy.deploy` (symmetric per-channel weights; the input, every conv
output that meets a residual sum and the pooled features quantized) exports as QDQ ONNX
in the patterns ONNX Runtime fuses into integer operators:

  DQ(x u8), DQ(w s8 per channel), DQ(bias s32) -> Conv -> Q(u8) [-> Clip]  QLinearConv
  DQ(a), DQ(b) -> Add -> Q [-> Clip]                                       QLinearAdd
  DQ -> GlobalAveragePool -> Q                                QLinearGlobalAveragePool
  Flatten -> DQ(x), DQ(w), DQ(bias s32) -> Gemm (float logits)             QGemm
  MaxPool and the option-A shortcut (Slice, Pad) on the uint8 tensors themselves.

Activations are uint8: dfq_jax's k-bit grid q + 2^(k-1) in [0, 2^k - 1] with zero point
z = -round(s lo) (methods.md §2.3; ORT fuses uint8, not int8, activations when a Clip
follows the QuantizeLinear). A ReLU or ReLU6 and the k-bit range before a quantizer become
one integer Clip after it, exactly: Q is monotone, so Q(relu(x)) = max(Q(x), Q(0) = z) and
Q(min(x, 6)) = min(Q(x), Q(6)). BatchNorm folds into the weight scale, |γ| Δ_w, a negative
γ flipping the sign of the integer weights (exact for the symmetric levels -Q..Q), and
into an int32 bias of scale s_x s_w (its rounding, < s_x s_w / 2, is the one change to the
student's arithmetic; k-bit weights are stored as ⌊127 / Q⌋ q at scale Δ_w / ⌊127 / Q⌋,
the same real weights, so that this rounding is ⌊127 / Q⌋ times finer). Every operation
is also recorded in `ops`, the integer program that integer_reference.py runs in integer
arithmetic.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dfq_jax.export import qdq
from dfq_jax.export.integer_reference import UINT8_MAX
from dfq_jax.export.onnx_graph import GraphBuilder, _node
from dfq_jax.quant.layers import QuantPolicy

INT8_MAX = 127
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class QTensor:
  """A uint8 NCHW tensor of the graph, real value (u - zero) * scale."""

  name: str
  scale: np.float32
  zero: int


@dataclasses.dataclass
class Pending:
  """A float result (conv, add, pool) waiting for the quantizer that follows it."""

  op: dict
  relu: bool = False
  relu6: bool = False


class IntegerGraphBuilder(GraphBuilder):
  """The integer graph of a deployment-quantizer student (ValueError for another)."""

  def __init__(self, variables: dict, policy: QuantPolicy | None):
    if policy is None or not policy.deploy:
      raise ValueError(
        "the integer graph needs a student of the deployment quantizer (quant.deploy=True, "
        "config argument 'deploy'): it quantizes every tensor an integer kernel reads."
      )
    super().__init__(variables, policy)
    self.ops: list[dict] = []

  # -- values -----------------------------------------------------------------------------

  def _dq(self, x: str, scale, zero: np.ndarray, base: str, axis: int | None = None) -> str:
    attrs = {} if axis is None else {"axis": axis}
    inputs = [x, self.const(f"{base}_scale", np.asarray(scale, np.float32))]
    inputs.append(self.const(f"{base}_zero", zero))
    return self.op("DequantizeLinear", inputs, f"{base}_dq", **attrs)

  def _dq_tensor(self, x: QTensor) -> str:
    return self._dq(x.name, x.scale, np.uint8(x.zero), x.name)

  def _weight(self, path: str, kernel: np.ndarray, gamma: np.ndarray, role: str):
    """(int8 weights, float32 scales [C]) of `kernel` [..., C] scaled per channel by γ."""
    bits = self.policy.weight_bits(path, role)
    if bits is None:
      raise ValueError(
        f"{path} is left in full precision; the integer graph needs every conv and the "
        "classifier quantized: drop the rule or first/last bits that keep it in FP."
      )
    q, delta, _ = qdq.quantized_weight(kernel, bits, "symmetric")
    # Stored as k q at scale Δ / k, k = ⌊127 / Q⌋ (Q = 2^(b-1) - 1): the same real weights
    # and the same integer products up to the factor k, so the int32 bias (and the
    # accumulator) resolve s_x s_w / k: at 4 bits an 18x finer bias rounding.
    k = INT8_MAX // (2 ** (bits - 1) - 1)
    sign = np.where(gamma < 0, -k, k).astype(np.int16) * (gamma != 0)
    scale = np.where(gamma == 0, delta, delta * np.abs(gamma)) / np.float32(k)
    return (q.astype(np.int16) * sign).astype(np.int8), scale.astype(np.float32)

  def _bias(self, path: str, bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    b = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if np.abs(b).max(initial=0) > INT32_MAX:
      raise ValueError(f"{path}: the folded bias does not fit int32 at scale s_x s_w.")
    return b.astype(np.int32)

  # -- layers (the interface onnx_models.py walks) ----------------------------------------

  def conv_bn(self, x, conv: str, bn: str, stride: int, role: str = "", groups: int = 1):
    x = self._tensor(x, conv)
    kernel, gamma, bias = self.folded(conv, bn)
    w, w_scale = self._weight(conv, kernel, gamma, role)
    bias_scale = (x.scale * w_scale).astype(np.float32)
    kh, kw = kernel.shape[:2]
    op = {
      "op": "conv",
      "path": conv,
      "x": x.name,
      "x_scale": x.scale,
      "x_zero": x.zero,
      "w": np.transpose(w, (3, 2, 0, 1)),  # OIHW
      "w_scale": w_scale,
      "bias": self._bias(conv, bias, bias_scale),
      "bias_scale": bias_scale,
      "stride": stride,
      "pad": (kh // 2, kw // 2),
      "group": groups,
    }
    return Pending(op)

  def relu(self, x, base: str):
    return dataclasses.replace(self._pending(x, base), relu=True)

  def relu6(self, x, base: str):
    return dataclasses.replace(self._pending(x, base), relu=True, relu6=True)

  def add(self, a, b, base: str):
    a, b = self._tensor(a, base), self._tensor(b, base)
    op = {"op": "add", "path": base, "a": a.name, "b": b.name}
    op.update(a_scale=a.scale, a_zero=a.zero, b_scale=b.scale, b_zero=b.zero)
    return Pending(op)

  def quant_act(self, x, path: str, deploy: bool = False):
    bits = self.policy.act_bits(path, deploy)
    if bits is None:
      raise ValueError(
        f"activation {path} is left in full precision; the integer graph needs every "
        "activation quantizer: drop the rule that keeps it in FP."
      )
    if isinstance(x, str):  # the float input image
      x = Pending({"op": "quantize", "path": path, "x": x})
    x = self._pending(x, path)
    r = _node(self.ranges, path)
    lo, hi = self.policy.act_range(np.float32(r["x_min"]), np.float32(r["x_max"]))
    scale, zero = qdq.unsigned_params(lo, hi, bits)
    low, high = (zero if x.relu else 0), 2**bits - 1
    if x.relu6:  # Q(6), as QuantizeLinear computes it
      high = min(high, int(np.clip(np.round(np.float32(6.0) / scale) + zero, 0, UINT8_MAX)))
    op = dict(x.op, y_scale=scale, y_zero=zero, lo=low, hi=high)
    op["out"] = self._emit(op)
    self.ops.append(op)
    return QTensor(op["out"], scale, zero)

  def deploy_act(self, x, path: str):
    return self.quant_act(x, path, deploy=True)

  def max_pool(self, x):
    x = self._tensor(x, "maxpool")
    out = super().max_pool(x.name)
    self.ops.append({"op": "maxpool", "x": x.name, "out": out})
    return QTensor(out, x.scale, x.zero)

  def shortcut_a(self, x, name: str, in_planes: int, planes: int, stride: int):
    """x[:, :, ::s, ::s] and planes // 4 channels of real 0 (the zero point) each side."""
    x = self._tensor(x, name)
    pad = planes // 4
    sliced = self.op(
      "Slice",
      [
        x.name,
        self.const(f"{name}/starts", np.zeros(2, np.int64)),
        self.const(f"{name}/ends", np.full(2, 2**62, np.int64)),
        self.const(f"{name}/axes", np.array([2, 3], np.int64)),
        self.const(f"{name}/steps", np.array([stride, stride], np.int64)),
      ],
      f"{name}/subsample",
    )
    pads = np.array([0, pad, 0, 0, 0, planes - in_planes - pad, 0, 0], np.int64)
    out = self.op(
      "Pad",
      [sliced, self.const(f"{name}/pads", pads), self.const(f"{name}/pad_value", np.uint8(x.zero))],
      f"{name}/shortcut",
      mode="constant",
    )
    op = {"op": "subsample_pad", "x": x.name, "out": out, "stride": stride, "zero": x.zero}
    op["pads"] = (pad, planes - in_planes - pad)
    self.ops.append(op)
    return QTensor(out, x.scale, x.zero)

  def classifier(self, x, path: str) -> str:
    """Global average pool (quantized by `pool_act`) and the classifier: float logits."""
    x = self._tensor(x, path)
    pooled = self.deploy_act(
      Pending({"op": "gap", "path": "pool", "x": x.name, **_scaled(x)}), "pool_act"
    )
    p = _node(self.params, path)
    kernel = np.asarray(p["kernel"], np.float32)  # [in, out]
    w, w_scale = self._weight(path, kernel, np.ones(kernel.shape[-1], np.float32), "last")
    bias_scale = (pooled.scale * w_scale).astype(np.float32)
    bias = self._bias(path, np.asarray(p["bias"], np.float32), bias_scale) if "bias" in p else None
    flat = self.op("Flatten", [pooled.name], "flatten", axis=1)
    inputs = [
      self._dq(flat, pooled.scale, np.uint8(pooled.zero), "flatten"),
      self._dq(self.const(f"{path}/w_q", w), w_scale, np.zeros(w.shape[1], np.int8), path, axis=1),
    ]
    if bias is not None:
      zeros = np.zeros(bias.shape, np.int32)
      inputs.append(self._dq(self.const(f"{path}/b_q", bias), bias_scale, zeros, f"{path}/b", 0))
    out = self.op("Gemm", inputs, "logits")
    op = {"op": "gemm", "path": path, "x": pooled.name, "out": out, "w": w, "w_scale": w_scale}
    op.update(x_scale=pooled.scale, x_zero=pooled.zero, bias=bias)
    self.ops.append(op)
    return out

  # -- helpers ----------------------------------------------------------------------------

  def _tensor(self, x, where: str) -> QTensor:
    if not isinstance(x, QTensor):
      raise TypeError(f"{where}: expected a quantized tensor, got {type(x).__name__}.")
    return x

  def _pending(self, x, where: str) -> Pending:
    if not isinstance(x, Pending):
      raise TypeError(f"{where}: expected a float result before a quantizer, got {x!r}.")
    return x

  def _emit(self, op: dict) -> str:
    """The ONNX nodes of a quantized `op` (its output parameters set); returns the output."""
    base = op["path"]
    if op["op"] == "quantize":
      y = op["x"]
    elif op["op"] == "conv":
      x = self._dq(op["x"], op["x_scale"], np.uint8(op["x_zero"]), f"{base}/x")
      c = op["w"].shape[0]
      w = self._dq(
        self.const(f"{base}/w_q", op["w"]), op["w_scale"], np.zeros(c, np.int8), f"{base}/w", 0
      )
      zeros = np.zeros(c, np.int32)
      b = self._dq(self.const(f"{base}/b_q", op["bias"]), op["bias_scale"], zeros, f"{base}/b", 0)
      kh, kw = op["w"].shape[2:]
      ph, pw = op["pad"]
      y = self.op(
        "Conv",
        [x, w, b],
        base,
        strides=[op["stride"]] * 2,
        pads=[ph, pw, ph, pw],
        kernel_shape=[kh, kw],
        group=op["group"],
      )
    elif op["op"] == "add":
      a = self._dq(op["a"], op["a_scale"], np.uint8(op["a_zero"]), f"{base}/a")
      b = self._dq(op["b"], op["b_scale"], np.uint8(op["b_zero"]), f"{base}/b")
      y = self.op("Add", [a, b], base)
    else:  # gap
      x = self._dq(op["x"], op["x_scale"], np.uint8(op["x_zero"]), f"{base}/x")
      y = self.op("GlobalAveragePool", [x], base)
    scale = self.const(f"{base}/y_scale", np.float32(op["y_scale"]))
    y = self.op(
      "QuantizeLinear",
      [y, scale, self.const(f"{base}/y_zero", np.uint8(op["y_zero"]))],
      f"{base}/q",
    )
    if (op["lo"], op["hi"]) != (0, UINT8_MAX):
      bounds = [
        self.const(f"{base}/lo", np.uint8(op["lo"])),
        self.const(f"{base}/hi", np.uint8(op["hi"])),
      ]
      y = self.op("Clip", [y, *bounds], f"{base}/clip")
    return y


def _scaled(x: QTensor) -> dict:
  return {"x_scale": x.scale, "x_zero": x.zero}
