"""The attribution ledger (:mod:`sidecar.ledger.core`) and its parts.

Importers use ``from sidecar.ledger import Ledger, ...``; the split into
modules (baseline estimator, prefill fit, request state) is internal.
"""

from sidecar.ledger.baseline import (
    BASELINE_WINDOW_S,
    MIN_STANDBY_SAMPLES,
    SETTLE_S,
    BaselineEstimator,
    estimate_idle_watts,
)
from sidecar.ledger.core import MAX_WAIT_S, SILENT_AFTER_S, Ledger
from sidecar.ledger.prefill_fit import PrefillFit
from sidecar.ledger.requests import (
    PHASES,
    STATUSES,
    FinishedRequest,
    Phase,
    Status,
    computed_prompt,
)

__all__ = [
    "BASELINE_WINDOW_S",
    "MAX_WAIT_S",
    "MIN_STANDBY_SAMPLES",
    "PHASES",
    "SETTLE_S",
    "SILENT_AFTER_S",
    "STATUSES",
    "BaselineEstimator",
    "FinishedRequest",
    "Ledger",
    "Phase",
    "PrefillFit",
    "Status",
    "computed_prompt",
    "estimate_idle_watts",
]
