"""The student's quantization policy and range calibration, read from a run's config.

config.quant  -> `policy_from_config` -> QuantPolicy (which layers, how many bits)
config.calib  -> `check_calibration_config` (the no-training floor's range observer)
"""

from __future__ import annotations

import re

from dfq_jax.quant import numerics
from dfq_jax.quant.layers import QuantPolicy

# Values renamed by the architecture change; an old spelling gets an error naming the new.
RENAMED_RANGE_MODES = {"parity": "bias_corrected"}


def parse_rules(text: str) -> tuple[tuple[str, int | None, int | None], ...]:
  """'layer1_0/conv1=w8;linear=w8a8;act2=afp' -> ((regex, w, a), ...); fp = 32."""
  rules = []
  for item in filter(None, (s.strip() for s in (text or "").split(";"))):
    if "=" not in item:
      raise ValueError(f"quant rule {item!r} must be 'regex=wXaY' (e.g. 'conv1=w8').")
    pattern, bits = item.rsplit("=", 1)
    m = re.match(r"^(?:w(\d+|fp))?(?:a(\d+|fp))?$", bits.strip())
    if not m or not (m.group(1) or m.group(2)):
      raise ValueError(f"quant rule {item!r}: bits {bits!r} must look like w8, a8, w8a8 or wfp.")

    def to_bits(group):
      return None if group is None else (32 if group == "fp" else int(group))

    rules.append((pattern.strip(), to_bits(m.group(1)), to_bits(m.group(2))))
  return tuple(rules)


def policy_from_config(config) -> QuantPolicy:
  """The student's QuantPolicy from config.quant (validated; raises ValueError)."""
  q = config.quant
  if q.range_mode in RENAMED_RANGE_MODES:
    raise ValueError(
      f"quant.range_mode={q.range_mode!r} is now called "
      f"{RENAMED_RANGE_MODES[q.range_mode]!r}: pass "
      f"--config.quant.range_mode={RENAMED_RANGE_MODES[q.range_mode]}."
    )
  return QuantPolicy(
    w_bits=numerics.check_bits(q.w_bits, "quant.w_bits"),
    a_bits=numerics.check_bits(q.a_bits, "quant.a_bits"),
    first_bits=q.first_bits or None,
    last_bits=q.last_bits or None,
    rules=parse_rules(q.rules),
    range_mode=q.range_mode,
    weight_mode=q.weight_mode,
    deploy=bool(q.deploy),
    deploy_bits=numerics.check_bits(q.deploy_bits, "quant.deploy_bits"),
    axis_name="data" if config.stats_scope == "per_device" else None,
  )


def check_calibration_config(config) -> None:
  """Raises ValueError for a config.calib that cannot run."""
  c = config.calib
  if c.source not in ("noise", "real"):
    raise ValueError(f"calib.source={c.source!r}: use noise or real.")
  if c.method not in numerics.OBSERVERS:
    raise ValueError(f"calib.method={c.method!r} is unknown: use one of {numerics.OBSERVERS}.")
  if not 50.0 < c.percentile <= 100.0:
    raise ValueError(f"calib.percentile={c.percentile} must lie in (50, 100].")
