"""Learning-rate policy (methods.md §0) and the scaled timeline of shortened runs."""

import numpy as np
import pytest

from dfq_jax import config_base, schedule


@pytest.mark.parametrize(
  "epoch, expected",
  [(0, 1.0), (99, 1.0), (100, 0.1), (199, 0.1), (200, 0.01), (300, 0.001), (399, 0.001)],
)
def test_multistep_lr_known_values(epoch, expected):
  np.testing.assert_allclose(
    schedule.multistep_lr(1.0, epoch, (100, 200, 300)), expected, rtol=1e-6
  )


def test_paper_timeline():
  t = schedule.Timeline.from_config(config_base.base_config())
  assert t.total_steps == 80000
  assert t.warmup_steps == 800 and t.range_freeze_step == 800
  assert t.student_milestones == (20000, 40000, 60000)


def test_shortened_timeline_scales_milestones_and_floors_phases():
  c = config_base.base_config()
  c.total_steps = 4000
  t = schedule.Timeline.from_config(c)
  assert t.total_steps == 4000
  assert t.generator_milestones == (1000, 2000, 3000)
  # 4/400 of 4000 is 40 steps; the opening phases keep at least min_phase_steps.
  assert t.warmup_steps == 200 and t.range_freeze_step == 200
  c.min_phase_steps = 0
  t = schedule.Timeline.from_config(c)
  assert t.warmup_steps == 40 and t.range_freeze_step == 40
  c.total_steps, c.min_phase_steps = 100, 200
  assert schedule.Timeline.from_config(c).warmup_steps == 100  # never past the end


def test_phase_and_evaluation_cadence():
  c = config_base.base_config()
  c.total_steps = 2000
  t = schedule.Timeline.from_config(c)
  # (train_student, update_ranges): warm-up and range phase are the first 200 iterations.
  assert t.phase(0) == (False, True) and t.phase(199) == (False, True)
  assert t.phase(200) == (True, False) and t.phase(1999) == (True, False)
  assert t.eval_every_steps == 1000
  # Parity evaluates after every epoch of the original (200 iterations), as its code does
  # before it reports the best epoch.
  config_base.apply_parity(c)
  assert c.eval_every_steps == 0  # 0 = every epoch
  assert schedule.Timeline.from_config(c).eval_every_steps == 200
  c.range_update_epochs = 400  # ranges that keep adapting through the whole run
  assert schedule.Timeline.from_config(c).phase(1999) == (True, True)
