"""Export of a trained or calibrated student: BatchNorm folded, QDQ ONNX, checked in ONNX
Runtime (`python -m dfq_jax.export`). Needs the `export` extra (onnx, onnxruntime)."""
