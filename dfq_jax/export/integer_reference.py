"""An integer-arithmetic reference of the exported integer graph (integer_graph.py).

  run(ops, images) -> logits      images float32 [N, 3, H, W], logits float32 [N, classes]

Runs the recorded integer program in numpy as an int8 engine does: uint8 activations and
int8 weights, exact integer accumulation (int32 range; computed in float64, exact below
2^53) of (u - z_x) w plus the int32 bias, and per-channel requantization
u_y = clip(round(float32(acc) * M) + z_y) with M = s_x s_w / s_y in float32, rounding half
to even (ONNX Runtime's MLAS requantization). The residual sum uses the scale ratios
s_a / s_y and s_b / s_y, the global pool s_x / (s_y HW), the classifier
float32(acc) s_x s_w. Tests compare it with ONNX Runtime's integer kernels.
"""

from __future__ import annotations

import numpy as np

UINT8_MAX = 255


def _requantize(value: np.ndarray, zero: int, lo: int, hi: int) -> np.ndarray:
  """round-half-even(value) + zero, saturated to uint8 and then clipped to [lo, hi]."""
  u = np.clip(np.rint(value) + zero, 0, UINT8_MAX)
  return np.clip(u, lo, hi).astype(np.uint8)


def _quantize(env, op):
  x = env[op["x"]].astype(np.float32)
  return _requantize(x / np.float32(op["y_scale"]), op["y_zero"], op["lo"], op["hi"])


def _conv_accumulate(x: np.ndarray, w: np.ndarray, stride: int, pad, group: int) -> np.ndarray:
  """Exact integer conv [N, C, H, W] (x - z_x already) * [O, C/g, kh, kw] -> [N, O, H', W']."""
  n, c, _, _ = x.shape
  o, cg, kh, kw = w.shape
  ph, pw = pad
  x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  win = win[:, :, ::stride, ::stride]  # [N, C, H', W', kh, kw]
  win = win.reshape(n, group, cg, *win.shape[2:])
  wg = w.astype(np.float64).reshape(group, o // group, cg, kh, kw)
  acc = np.einsum("ngcyxij,gocij->ngoyx", win, wg, optimize=True)
  return acc.reshape(n, o, *acc.shape[3:])


def _conv(env, op):
  x = env[op["x"]].astype(np.int64) - op["x_zero"]
  acc = _conv_accumulate(x, op["w"], op["stride"], op["pad"], op["group"])
  acc = acc + op["bias"].astype(np.float64)[None, :, None, None]
  m = (np.float32(op["x_scale"]) * op["w_scale"].astype(np.float32)) / np.float32(op["y_scale"])
  y = acc.astype(np.float32) * m.astype(np.float32)[None, :, None, None]
  return _requantize(y, op["y_zero"], op["lo"], op["hi"])


def _add(env, op):
  ys = np.float32(op["y_scale"])
  ra, rb = np.float32(op["a_scale"]) / ys, np.float32(op["b_scale"]) / ys
  fixed = np.float32(op["y_zero"]) - (ra * np.float32(op["a_zero"]) + rb * np.float32(op["b_zero"]))
  a, b = env[op["a"]].astype(np.float32), env[op["b"]].astype(np.float32)
  y = _fma(b, rb, _fma(a, ra, fixed))
  return _requantize(y, 0, op["lo"], op["hi"])


def _fma(x, y, z) -> np.ndarray:
  """float32 x * y + z rounded once (a fused multiply-add; exact products in float64)."""
  return (x.astype(np.float64) * np.float64(y) + np.asarray(z, np.float64)).astype(np.float32)


def _gap(env, op):
  x = env[op["x"]].astype(np.int64)
  hw = x.shape[2] * x.shape[3]
  acc = x.sum(axis=(2, 3), keepdims=True) - op["x_zero"] * hw
  m = np.float32(op["x_scale"]) / (np.float32(op["y_scale"]) * np.float32(hw))
  return _requantize(acc.astype(np.float32) * m, op["y_zero"], op["lo"], op["hi"])


def _maxpool(env, op):
  x = np.pad(env[op["x"]], ((0, 0), (0, 0), (1, 1), (1, 1)))  # uint8 >= 0: as -inf padding
  win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
  return win.max(axis=(-2, -1))


def _subsample_pad(env, op):
  x = env[op["x"]][:, :, :: op["stride"], :: op["stride"]]
  before, after = op["pads"]
  return np.pad(x, ((0, 0), (before, after), (0, 0), (0, 0)), constant_values=op["zero"])


def _gemm(env, op):
  x = env[op["x"]].reshape(env[op["x"]].shape[0], -1).astype(np.float64) - op["x_zero"]
  acc = x @ op["w"].astype(np.float64)
  if op["bias"] is not None:
    acc = acc + op["bias"].astype(np.float64)
  return acc.astype(np.float32) * (np.float32(op["x_scale"]) * op["w_scale"].astype(np.float32))


KERNELS = {
  "quantize": _quantize,
  "conv": _conv,
  "add": _add,
  "gap": _gap,
  "maxpool": _maxpool,
  "subsample_pad": _subsample_pad,
  "gemm": _gemm,
}


def run(ops: list[dict], images: np.ndarray, keep: bool = False):
  """Logits [N, classes] of the integer program `ops` on float32 NCHW `images` (with
  `keep`, also every intermediate uint8 tensor by its graph name)."""
  env = {"input": np.asarray(images, np.float32)}
  for op in ops:
    env[op["out"]] = KERNELS[op["op"]](env, op)
  logits = env[ops[-1]["out"]]
  return (logits, env) if keep else logits
