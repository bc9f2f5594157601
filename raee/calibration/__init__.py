"""Calibration of exit strategies on the validation split, and offline replay of exit rules.

- :mod:`~raee.calibration.tables`    per-split tables: every layer's head logits, each example's neighbours
- :mod:`~raee.calibration.simulate`  replay a strategy's own decisions on those tables (no backbone run)
- :mod:`~raee.calibration.target`    what a user asks (``exit.target=accuracy exit.max_drop=0``) and the choice
- :mod:`~raee.calibration.calibrate` sweep a strategy's knob on validation, choose, cache
"""

from raee.calibration.target import TARGETS, Calibrated, CalibrationTarget, choose_point

__all__ = ["TARGETS", "Calibrated", "CalibrationTarget", "choose_point"]
