"""The environmental report (``llm-energy-sidecar report``) and its ``run.json`` input.

Importing this package is cheap: matplotlib is imported only when figures are
drawn (:mod:`sidecar.report.render`), so the sidecar never needs the extra.
"""

from sidecar.report.inputs import ReportError

__all__ = ["ReportError"]
