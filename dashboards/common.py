"""Building blocks shared by the llm-energy-sidecar Grafana dashboards.

Every helper is a pure function that returns a grafana-foundation-sdk builder (pinned to the
Grafana 11.6 build). Panel helpers take a title, a description and a unit as required
arguments, so no panel can be written without saying what its number means and in which unit.

Queries read the sidecar's metrics directly (not recording rules), so the dashboards work on
any Prometheus that scrapes a sidecar. ``namespace`` and ``pod`` come from the scrape (a
PodMonitor); with another scrape config they are empty, which the ``.*`` "All" value matches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from grafana_foundation_sdk.builders import bargauge, heatmap, piechart, stat, table, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    TableSortByFieldState,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.piechart import PieChartLegendOptions
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    GraphDrawStyle,
    HeatmapCellLayout,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale
from grafana_foundation_sdk.models.piechart import PieChartLegendValues, PieChartType
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

__all__ = [
    "BUDGET_THRESHOLDS",
    "DATASOURCE",
    "DEFAULT_SUBSTITUTIONS",
    "IDLE_PHASES",
    "IDLE_THRESHOLDS",
    "PanelBuilder",
    "PanelQuery",
    "Units",
    "bargauge_panel",
    "dashboard",
    "heatmap_panel",
    "iter_dashboard_queries",
    "piechart_panel",
    "query",
    "sel",
    "stat_panel",
    "substitute",
    "table_panel",
    "timeseries_panel",
    "to_json",
    "variables",
]

DATASOURCE: Final = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
"""Every panel and variable queries the Prometheus chosen in the ``datasource`` variable."""

IDLE_PHASES: Final = 'phase=~"idle_serving|idle_standby"'

PanelBuilder = Builder[dm.Panel]
"""Any panel builder (time series, stat, table, ...)."""

SCHEMA_TAGS: Final = ("llm-energy", "energy", "carbon")


class Units:
    """Grafana unit ids (grafana/grafana ``packages/grafana-data/src/valueFormats``)."""

    WATT: Final = "watt"
    JOULE: Final = "joule"
    GRAMS: Final = "massg"
    RATIO: Final = "percentunit"
    REQUESTS_PER_S: Final = "reqps"
    COUNT: Final = "short"
    TOKENS_PER_S: Final = "suffix: tok/s"
    GRAMS_PER_KWH: Final = "suffix: gCO2e/kWh"


# Template variables ---------------------------------------------------------------------------

_VARIABLE_SOURCES: Final[Mapping[str, tuple[str, str]]] = {
    "namespace": ("Namespace", "llm_energy_build_info"),
    "pod": ("Pod", "llm_energy_build_info"),
    "model": ("Model", "llm_energy_requests_total"),
    "gpu": ("GPU", "llm_energy_gpu_power_watts"),
}
"""Label and the metric whose label values fill each variable."""
_CASCADING: Final = ("namespace", "pod")
"""Variables that narrow the choices of the variables after them."""
_VARIABLE_HELP: Final[Mapping[str, str]] = {
    "namespace": "Kubernetes namespace of the sidecars (from the PodMonitor scrape).",
    "pod": "Pods (replicas) whose sidecar is shown.",
    "model": "Model names as the sidecar labels them (at most --max-models, then 'other').",
    "gpu": "GPU index as the sidecar's container sees it.",
}


def variables(names: Sequence[str]) -> list[Builder[dm.VariableModel]]:
    """The ``datasource`` variable, then the query variables in ``names`` (multi, All = ``.*``).

    A variable whose query filters on ``pod`` must come after ``pod`` and so on; the order of
    ``names`` is the order in the dashboard.
    """
    result: list[Builder[dm.VariableModel]] = [
        DatasourceVariable("datasource")
        .label("Data source")
        .description("The Prometheus that scrapes the llm-energy-sidecar pods.")
        .type("prometheus")
    ]
    for index, name in enumerate(names):
        label, metric = _VARIABLE_SOURCES[name]
        narrowing = [f'{n}=~"${n}"' for n in names[:index] if n in _CASCADING]
        selector = f"{{{', '.join(narrowing)}}}" if narrowing else ""
        expr = f"label_values({metric}{selector}, {name})"
        result.append(
            QueryVariable(name)
            .label(label)
            .description(_VARIABLE_HELP[name])
            .datasource(DATASOURCE)
            .query(expr)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.NATURAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )
    return result


def sel(*matchers: str, namespace: bool = True, pod: bool = False) -> str:
    """A label-selector body: the template-variable matchers plus ``matchers``.

    >>> sel('model=~"$model"', pod=True)
    'namespace=~"$namespace", pod=~"$pod", model=~"$model"'
    """
    parts: list[str] = []
    if namespace:
        parts.append('namespace=~"$namespace"')
    if pod:
        parts.append('pod=~"$pod"')
    parts.extend(matchers)
    return ", ".join(parts)


# Queries -------------------------------------------------------------------------------------


def query(
    expr: str,
    legend: str = "__auto",
    *,
    ref_id: str = "A",
    instant: bool = False,
    table_format: bool = False,
    heatmap_format: bool = False,
) -> PrometheusQuery:
    """A Prometheus query on the dashboard's data source."""
    q = PrometheusQuery().datasource(DATASOURCE).ref_id(ref_id).expr(expr).legend_format(legend)
    q = q.instant() if instant else q.range()
    if table_format:
        q = q.format(PromQueryFormat.TABLE)
    elif heatmap_format:
        q = q.format(PromQueryFormat.HEATMAP)
    else:
        q = q.format(PromQueryFormat.TIME_SERIES)
    return q


def _thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


_NEUTRAL: Final = _thresholds((None, "green"))
BUDGET_THRESHOLDS: Final = ((None, "green"), (0.8, "orange"), (1.0, "red"))
IDLE_THRESHOLDS: Final = ((None, "green"), (0.5, "orange"), (0.7, "red"))


# Panels --------------------------------------------------------------------------------------


_Panel = TypeVar(
    "_Panel",
    stat.Panel,
    timeseries.Panel,
    bargauge.Panel,
    piechart.Panel,
    table.Panel,
    heatmap.Panel,
)


def _framed(
    panel: _Panel, title: str, description: str, unit: str, width: int, height: int
) -> _Panel:
    """What every panel carries: title, description (what the number means), unit, size."""
    return (
        panel.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
    )


def _with_queries(panel: _Panel, queries: Iterable[PrometheusQuery]) -> _Panel:
    for q in queries:
        panel = panel.with_target(q)
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    queries: Iterable[PrometheusQuery],
    *,
    width: int = 4,
    height: int = 4,
    decimals: int | None = None,
    thresholds: Sequence[tuple[float | None, str]] | None = None,
    text_mode: BigValueTextMode = BigValueTextMode.AUTO,
) -> stat.Panel:
    """A single number (last value of an instant query)."""
    panel = (
        _framed(stat.Panel(), title, description, unit, width, height)
        .graph_mode(BigValueGraphMode.NONE)
        .color_mode(BigValueColorMode.VALUE if thresholds else BigValueColorMode.NONE)
        .text_mode(text_mode)
        .orientation(VizOrientation.AUTO)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(_thresholds(*thresholds) if thresholds else _NEUTRAL)
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    return _with_queries(panel, queries)


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    queries: Iterable[PrometheusQuery],
    *,
    width: int = 12,
    height: int = 8,
    stacked: bool = False,
    fill_opacity: float = 10,
    min_value: float | None = 0,
    max_value: float | None = None,
    dashed_refs: Sequence[str] = (),
    dotted_refs: Sequence[str] = (),
    thresholds: Sequence[tuple[float | None, str]] | None = None,
) -> timeseries.Panel:
    """A time series; ``dashed_refs``/``dotted_refs`` draw those queries as unfilled lines."""
    panel = (
        _framed(timeseries.Panel(), title, description, unit, width, height)
        .draw_style(GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(fill_opacity)
        .legend(
            VizLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .calcs(["mean", "lastNotNull"])
        )
        .thresholds(_thresholds(*thresholds) if thresholds else _NEUTRAL)
    )
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL).group("A"))
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    for refs, dash in ((dashed_refs, [10.0, 10.0]), (dotted_refs, [0.0, 10.0])):
        for ref in refs:
            panel = panel.override_by_query(
                ref,
                [
                    dm.DynamicConfigValue(
                        id_val="custom.lineStyle",
                        value={"fill": "dash" if dash[0] else "dot", "dash": dash},
                    ),
                    dm.DynamicConfigValue(id_val="custom.lineWidth", value=2),
                    dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
                    dm.DynamicConfigValue(
                        id_val="custom.stacking", value={"mode": "none", "group": "A"}
                    ),
                ],
            )
    return _with_queries(panel, queries)


def bargauge_panel(
    title: str,
    description: str,
    unit: str,
    queries: Iterable[PrometheusQuery],
    *,
    width: int = 8,
    height: int = 8,
    thresholds: Sequence[tuple[float | None, str]] | None = None,
    min_value: float | None = 0,
    max_value: float | None = None,
) -> bargauge.Panel:
    """Horizontal bars, one per series (use instant queries)."""
    panel = (
        _framed(bargauge.Panel(), title, description, unit, width, height)
        .orientation(VizOrientation.HORIZONTAL)
        .display_mode(BarGaugeDisplayMode.GRADIENT)
        .show_unfilled(True)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(_thresholds(*thresholds) if thresholds else _NEUTRAL)
    )
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    return _with_queries(panel, queries)


def piechart_panel(
    title: str,
    description: str,
    unit: str,
    queries: Iterable[PrometheusQuery],
    *,
    width: int = 6,
    height: int = 8,
) -> piechart.Panel:
    """A donut of shares (use instant queries)."""
    panel = (
        _framed(piechart.Panel(), title, description, unit, width, height)
        .pie_type(PieChartType.DONUT)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .legend(
            PieChartLegendOptions()
            .show_legend(True)
            .display_mode(LegendDisplayMode.TABLE)
            .placement(LegendPlacement.RIGHT)
            .values([PieChartLegendValues.VALUE, PieChartLegendValues.PERCENT])
        )
    )
    return _with_queries(panel, queries)


def table_panel(
    title: str,
    description: str,
    unit: str,
    queries: Iterable[PrometheusQuery],
    *,
    columns: Mapping[str, tuple[str, str]],
    hidden: Sequence[str] = ("Time",),
    width: int = 24,
    height: int = 8,
    sort_by: str | None = None,
) -> table.Panel:
    """Instant table queries merged on their labels.

    ``columns`` maps a query's value column (``Value #A``) to its header and unit; ``unit`` is
    the default for the rest.
    """
    panel = (
        _framed(table.Panel(), title, description, unit, width, height)
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": dict.fromkeys(hidden, True),
                    "renameByName": {field: header for field, (header, _) in columns.items()},
                },
            )
        )
    )
    for header, column_unit in columns.values():
        panel = panel.override_by_name(
            header, [dm.DynamicConfigValue(id_val="unit", value=column_unit)]
        )
    if sort_by is not None:
        panel = panel.sort_by([TableSortByFieldState().display_name(sort_by).desc(True)])
    return _with_queries(panel, queries)


def heatmap_panel(
    title: str,
    description: str,
    y_unit: str,
    queries: Iterable[PrometheusQuery],
    *,
    width: int = 12,
    height: int = 9,
) -> heatmap.Panel:
    """A heatmap of pre-bucketed Prometheus histogram data (``format: heatmap``)."""
    panel = (
        _framed(heatmap.Panel(), title, description, y_unit, width, height)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit(y_unit))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(HeatmapCellLayout.LE))
        .cell_values(heatmap.CellValues().unit(Units.COUNT))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
            .reverse(False)
        )
        .show_legend()
    )
    return _with_queries(panel, queries)


# Dashboards ----------------------------------------------------------------------------------


def dashboard(
    uid: str,
    title: str,
    description: str,
    variable_names: Sequence[str],
    layout: Sequence[tuple[str, Sequence[PanelBuilder]]],
) -> Dashboard:
    """A dashboard of titled rows; panel ids are numbered in layout order, so they are stable."""
    board = (
        Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(list(SCHEMA_TAGS))
        .editable()
        .time("now-6h", "now")
        .refresh("1m")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .variables(variables(variable_names))
    )
    panel_id = 0
    for row_title, panels in layout:
        panel_id += 1
        board = board.with_row(Row(row_title).id(panel_id))
        for panel in panels:
            panel_id += 1
            built = panel.build()
            built.id_val = panel_id
            board = board.with_panel(_Built(built))
    return board


class _Built(Builder[dm.Panel]):
    """Wrap an already built panel so ``Dashboard.with_panel`` accepts it after numbering."""

    def __init__(self, panel: dm.Panel) -> None:
        self._panel = panel

    def build(self) -> dm.Panel:
        return self._panel


def to_json(board: Dashboard) -> str:
    """Dashboard JSON as committed: sorted keys, two-space indent, trailing newline."""
    return JSONEncoder(sort_keys=True, indent=2).encode(board.build()) + "\n"


# Queries for tests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PanelQuery:
    """One query of one panel, as Grafana would send it (before variable substitution)."""

    dashboard_uid: str
    panel_title: str
    ref_id: str
    expr: str
    instant: bool


def iter_dashboard_queries(board: Dashboard) -> Iterator[PanelQuery]:
    """Every (panel, query) of ``board`` in panel order."""
    document: dict[str, Any] = json.loads(to_json(board))
    uid = str(document["uid"])
    for panel in _walk_panels(document.get("panels", [])):
        for target in panel.get("targets", []) or []:
            yield PanelQuery(
                dashboard_uid=uid,
                panel_title=str(panel["title"]),
                ref_id=str(target.get("refId", "")),
                expr=str(target["expr"]),
                instant=bool(target.get("instant", False)),
            )


def _walk_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        if panel.get("type") == "row":
            yield from _walk_panels(panel.get("panels", []) or [])
        else:
            yield panel


DEFAULT_SUBSTITUTIONS: Final[Mapping[str, str]] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "namespace": ".*",
    "pod": ".*",
    "model": ".*",
    "gpu": ".*",
}
"""What ``substitute`` uses unless told otherwise: every variable on "All" (``.*``)."""

_VARIABLE: Final = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables (``$pod``, ``${pod}``, ``$__rate_interval``) in ``expr``.

    ``values`` overrides ``DEFAULT_SUBSTITUTIONS``; an unknown variable raises ``KeyError``.
    """
    table = {**DEFAULT_SUBSTITUTIONS, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return table[name]

    return _VARIABLE.sub(replace, expr)
