"""``llm-energy-sidecar report``: read a source, compute, draw, then write everything at once.

Every check that can fail on the user's input (flags, files, Prometheus'
answers) runs before anything is written, and the files are drawn into a
temporary folder beside ``--out`` and moved in at the end, so a bad input or a
crash leaves ``--out`` as it was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sidecar.report.figures import report_json
from sidecar.report.inputs import ReportError, ReportInputs, parse_time
from sidecar.report.markdown import render_markdown
from sidecar.report.render import (
    FIGURE_FILES,
    draw_phases,
    draw_power,
    draw_requests,
    draw_stages,
    require_matplotlib,
)


@dataclass(frozen=True, slots=True)
class ReportRequest:
    trace: Path | None
    prometheus: str | None
    selector: str | None
    from_text: str | None
    to_text: str | None
    out: Path
    carbon_intensity_g_per_kwh: float | None
    pue: float | None


def load_inputs(req: ReportRequest, *, now_s: float | None = None) -> ReportInputs:
    """The report's inputs from whichever source the request names."""
    from_s = None if req.from_text is None else parse_time("--from", req.from_text, now_s=now_s)
    to_s = None if req.to_text is None else parse_time("--to", req.to_text, now_s=now_s)
    if from_s is not None and to_s is not None and from_s >= to_s:
        raise ReportError("--from: it is not before --to")
    if req.out.exists() and not req.out.is_dir():
        raise ReportError(f"--out: {req.out} exists and is not a directory")
    if req.pue is not None and req.pue < 1.0:
        raise ReportError(f"--pue: {req.pue} is below 1 (a PUE is at least 1)")
    if req.trace is not None:
        if req.selector is not None:
            raise ReportError("--selector: only with --prometheus")
        from sidecar.report.from_trace import from_trace

        return from_trace(
            req.trace,
            from_s=from_s,
            to_s=to_s,
            carbon_intensity_g_per_kwh=req.carbon_intensity_g_per_kwh,
            pue=req.pue,
        )
    assert req.prometheus is not None
    from sidecar.report.from_prometheus import from_prometheus

    return from_prometheus(
        req.prometheus,
        selector=req.selector,
        from_s=from_s,
        to_s=to_s,
        carbon_intensity_g_per_kwh=req.carbon_intensity_g_per_kwh,
        pue=req.pue,
        now_s=now_s,
    )


def write_report(inp: ReportInputs, out: Path) -> list[Path]:
    """Draw and write ``report.md``, ``report.json`` and the PNGs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as tmp_name:
        tmp = Path(tmp_name)
        figures = [FIGURE_FILES["power"], FIGURE_FILES["phases"], FIGURE_FILES["requests"]]
        draft = report_json(inp, figures)
        draw_power(inp, tmp / FIGURE_FILES["power"], draft["power_watts"]["mean"])
        draw_phases(inp, tmp / FIGURE_FILES["phases"])
        draw_requests(inp, tmp / FIGURE_FILES["requests"])
        if draw_stages(draft, tmp / FIGURE_FILES["stages"]):
            figures.append(FIGURE_FILES["stages"])
        doc = report_json(inp, figures)
        (tmp / "report.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(doc), encoding="utf-8")
        written = []
        for name in [*figures, "report.json", "report.md"]:
            target = out / name
            shutil.move(tmp / name, target)
            written.append(target)
    return written


def run_report(req: ReportRequest) -> list[Path]:
    """The whole command: fails with :class:`ReportError` before writing anything."""
    require_matplotlib()
    inputs = load_inputs(req)
    return write_report(inputs, req.out)
