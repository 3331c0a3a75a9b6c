"""Data-free post-training quantization: sample synthesis, calibration, diagnostics."""
