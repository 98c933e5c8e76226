"""The shipped Grafana dashboard only queries metrics the gateway exports, and every series it draws is named,
filtered by the dashboard's variables, and placed: the catalogue in `gateway.metrics` says which labels each
metric carries, so the checks below read it rather than repeat it."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from gateway import pinning
from gateway.metrics import Metrics
from tests.harness import ROOT

DASHBOARD = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
CHARTS = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]
SCRAPE_LABELS = frozenset({"instance", "job"})  # Prometheus adds them to every series it scrapes
_SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
_SELECTOR = re.compile(r"\b(mcp_gateway_\w+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_AGGREGATION = re.compile(r"\b(?:sum|max|min|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\(")
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _catalogue() -> dict[str, frozenset[str]]:
    """Each series name the gateway exports (`_total`, `_bucket`, ...), with the labels a scraped series has."""
    metrics = Metrics()
    labels = {metric._name: frozenset(metric._labelnames) for metric in vars(metrics).values()
              if isinstance(metric, MetricWrapperBase)}
    return {family.name + suffix: labels[family.name] | SCRAPE_LABELS | ({"le"} if suffix == "_bucket" else set())
            for family in metrics.registry.collect() for suffix in _SERIES[family.type]}


CATALOGUE = _catalogue()


def _targets(starting: str = "") -> list[Any]:
    """The queries of every chart (those starting with `starting`), as test parameters named by chart and refId."""
    return [pytest.param(panel, target, id=f"{panel['title']} {target['refId']}")
            for panel in CHARTS for target in panel["targets"] if target["expr"].startswith(starting)]


def _selectors(expr: str) -> list[tuple[str, set[tuple[str, str, str]]]]:
    """Each metric the query selects, with its label matchers as (label, operator, value)."""
    return [(found[1], set(_MATCHER.findall(found[2] or ""))) for found in _SELECTOR.finditer(expr)]


def _groupings(expr: str) -> list[frozenset[str]]:
    """The labels each aggregation keeps (none for an aggregation without `by`)."""
    return [frozenset(label.strip() for label in (by or "").split(",") if label.strip())
            for by in _AGGREGATION.findall(expr)]


def _series_labels(expr: str) -> frozenset[str]:
    """The labels of the series a query returns: what every aggregation keeps, else the metric's own."""
    groupings = _groupings(expr)
    if not groupings:
        return frozenset.intersection(*(CATALOGUE[metric] for metric, _ in _selectors(expr)))
    kept = frozenset.intersection(*groupings)
    return kept - {"le"} if expr.startswith("histogram_quantile") else kept


def test_every_metric_the_dashboard_queries_is_in_the_catalogue() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exported = set()
    for family in Metrics().registry.collect():
        exported.update(sample.name for sample in family.samples)
        exported.update({family.name, f"{family.name}_total", f"{family.name}_bucket"})
    queried = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
               for name in re.findall(r"\bmcp_gateway_[a-z_]+", target["expr"])}
    assert queried, "the dashboard queries nothing"
    assert queried - exported == set()
    assert len(dashboard["panels"]) >= 10


@pytest.mark.parametrize(("panel", "target"), _targets())
def test_every_series_has_a_legend_made_of_labels_it_carries(panel: dict[str, Any], target: dict[str, Any]) -> None:
    legend, expr = target.get("legendFormat", ""), target["expr"]
    assert legend.strip(), "no legend: Grafana names the series {} or by its raw labels"
    used, carried = set(_LEGEND_LABEL.findall(legend)), _series_labels(expr)
    assert used <= carried, f"{sorted(used - carried)} are not labels of {expr}"
    if _groupings(expr):
        assert carried <= used, f"series split by {sorted(carried - used)} would share one name"
    for grouping in _groupings(expr):
        for metric, _ in _selectors(expr):
            assert grouping <= CATALOGUE[metric], f"{metric} has no {sorted(grouping - CATALOGUE[metric])}"


@pytest.mark.parametrize("panel", CHARTS, ids=[panel["title"] for panel in CHARTS])
def test_series_of_one_chart_have_distinct_legends(panel: dict[str, Any]) -> None:
    legends = [target.get("legendFormat") for target in panel["targets"]]
    assert len(set(legends)) == len(legends)


@pytest.mark.parametrize(("panel", "target"), _targets("histogram_quantile"))
def test_histogram_quantiles_aggregate_by_le(panel: dict[str, Any], target: dict[str, Any]) -> None:
    assert all("le" in grouping for grouping in _groupings(target["expr"]))


@pytest.mark.parametrize(("panel", "target"), _targets())
def test_every_query_is_filtered_by_instance_and_upstream(panel: dict[str, Any], target: dict[str, Any]) -> None:
    for metric, matchers in _selectors(target["expr"]):
        assert ("instance", "=~", "$instance") in matchers, metric
        if "upstream" in CATALOGUE[metric]:
            assert ("upstream", "=~", "$upstream") in matchers, metric


def _variable(name: str) -> dict[str, Any]:
    found = [variable for variable in DASHBOARD["templating"]["list"] if variable["name"] == name]
    assert len(found) == 1, f"one variable {name!r}"
    return found[0]


def test_the_datasource_is_a_prometheus_variable_every_query_uses() -> None:
    variable = _variable("datasource")
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    assert all(panel["datasource"] == chosen and all(t["datasource"] == chosen for t in panel["targets"])
               for panel in CHARTS)


@pytest.mark.parametrize(("name", "label"), [("instance", "instance"), ("upstream", "upstream")])
def test_instance_and_upstream_are_multi_value_variables_of_their_label(name: str, label: str) -> None:
    variable = _variable(name)
    assert (variable["type"], variable["multi"], variable["includeAll"]) == ("query", True, True)
    found = re.fullmatch(r"label_values\((mcp_gateway_\w+)(?:\{[^}]*\})?,\s*(\w+)\)", variable["definition"])
    assert found is not None and found[2] == label
    assert label in CATALOGUE[found[1]], f"{found[1]} has no {label} label"


@pytest.mark.parametrize(("metric", "matcher"), [
    pytest.param("mcp_gateway_session_refusals_total", ("kind", "=", "hijack"), id="session hijacks"),
    pytest.param("mcp_gateway_revocations_total", None, id="revocations"),
    pytest.param("mcp_gateway_jwks_refreshes_total", None, id="key fetches and failures"),
    pytest.param("mcp_gateway_upstream_token_fetches_total", None, id="upstream token fetches"),
    pytest.param("mcp_gateway_rate_limited_total", None, id="rate-limited refusals"),
    pytest.param("mcp_gateway_approvals_pending", None, id="approvals pending"),
    pytest.param("mcp_gateway_approval_decisions_total", None, id="approvals decided"),
    pytest.param("mcp_gateway_decisions_total", ("reason", "=", pinning.REFUSED), id="tool pinning refusals"),
    pytest.param("mcp_gateway_tool_definition_changes_total", None, id="tool definition changes"),
    pytest.param("mcp_gateway_upstream_errors_total", None, id="upstream errors"),
    pytest.param("mcp_gateway_audit_sink_errors_total", None, id="audit sink errors"),
    pytest.param("mcp_gateway_requests_refused_audit_total", None, id="requests refused for audit"),
    pytest.param("mcp_gateway_policy_reloads_total", None, id="policy reloads"),
])
def test_the_dashboard_charts(metric: str, matcher: tuple[str, str, str] | None) -> None:
    assert any(name == metric and (matcher is None or matcher in matchers)
               for panel in CHARTS for target in panel["targets"] for name, matchers in _selectors(target["expr"]))


def test_every_chart_has_queries_and_a_unit() -> None:
    assert [panel["title"] for panel in CHARTS if not panel["targets"]] == []
    assert [panel["title"] for panel in CHARTS if not panel["fieldConfig"]["defaults"].get("unit")] == []


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(set(ids)) == len(ids)


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = [(panel["id"], panel["gridPos"]) for panel in DASHBOARD["panels"]]
    assert [panel for panel, box in boxes if box["x"] + box["w"] > 24] == []
    overlapping = [(a, b) for (a, p), (b, q) in itertools.combinations(boxes, 2)
                   if p["x"] < q["x"] + q["w"] and q["x"] < p["x"] + p["w"]
                   and p["y"] < q["y"] + q["h"] and q["y"] < p["y"] + p["h"]]
    assert overlapping == []
