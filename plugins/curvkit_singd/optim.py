"""Named optimizers for SINGD, IKFAC and INGD with the ``singd`` package's defaults.

``lr`` is β₂ (default 1e-3), ``momentum`` α₂ (0.9), ``weight_decay`` γ (0), applied after
preconditioning (``weight_decay_mode="after"``) — the order of ``singd.optim.SINGD``. The
classes live in :mod:`curvkit.optim` (they name the method; the core never imports this
plugin) and are re-exported here.
"""

from __future__ import annotations

from curvkit.optim.optimizer import IKFAC, INGD, SINGD

__all__ = ["IKFAC", "INGD", "SINGD"]
