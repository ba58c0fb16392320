"""Named optimizers for SINGD, IKFAC and INGD with the ``singd`` package's defaults.

``lr`` is β₂ (default 1e-3), ``momentum`` α₂ (0.9), ``weight_decay`` γ (0), applied after
preconditioning (``weight_decay_mode="after"``) — the order of ``singd.optim.SINGD``. The
classes are built from this plugin's method specs (their ``class_name``) by
:mod:`curvkit.optim` and re-exported here: ``curvkit_singd.optim.SINGD is curvkit.optim.SINGD``.
"""

from __future__ import annotations

from curvkit.optim import IKFAC, INGD, SINGD  # type: ignore[attr-defined]

__all__ = ["IKFAC", "INGD", "SINGD"]
