"""The shipped Grafana dashboard only queries metrics the gateway exports."""

from __future__ import annotations

import json
import re

from gateway.metrics import Metrics
from tests.harness import ROOT


def test_every_metric_the_dashboard_queries_is_in_the_catalogue() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exported = set()
    for family in Metrics().registry.collect():
        exported.update(sample.name for sample in family.samples)
        exported.update({family.name, f"{family.name}_total", f"{family.name}_bucket"})
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bmcp_gateway_[a-z_]+", target["expr"])}
    assert queried, "the dashboard queries nothing"
    assert queried - exported == set()
    assert len(dashboard["panels"]) >= 10
