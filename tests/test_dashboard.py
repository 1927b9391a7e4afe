"""The Grafana dashboard of daemonset/monitoring/dashboards/node-agent.json: every panel query
is PromQL that promtool accepts (written as recording rules into a generated rule file), built
only from series and labels the agent exports, and the dashboard shows what an operator looks
at first; it ships as a ConfigMap the Grafana dashboard sidecar picks up.
"""

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from support.promql import exported_series, promtool, selectors
from test_manifests import kustomize_base_with

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "daemonset"
MONITORING = BASE / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "node-agent.json"
CONFIG_MAP = "node-agent-dashboard"

# Grafana's own interval variables, as Grafana would fill them in for a 6-hour view.
GRAFANA_INTERVALS = {"__rate_interval": "2m", "__interval": "30s", "__range": "6h"}
# What the issue asks the dashboard to show, and the series that show it.
SHOWN = {
    "per-node in-sync": "node_agent_in_sync",
    "errors": "node_agent_reconcile_total",
    "source errors": "node_agent_source_errors_total",
    "restarts by result": "node_agent_containerd_restarts_total",
    "restart-slot waits": "node_agent_restart_pending",
    "drift repairs": "node_agent_drift_repairs_total",
    "time since last success": "node_agent_last_success_timestamp_seconds",
}
# Labels Prometheus adds to every scraped agent series (job and node by the PodMonitor).
TARGET_LABELS = {"job", "node", "instance"}


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels(container: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside rows included."""
    found = []
    for panel in container.get("panels", []):
        found.append(panel)
        found.extend(panels(panel))
    return found


def variables() -> list[dict[str, Any]]:
    return list(dashboard()["templating"]["list"])


def panel_queries() -> list[tuple[str, str]]:
    """(panel title and refId, PromQL) for every query of every panel."""
    return [
        (f"{panel['title']} {target['refId']}", target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def variable_queries() -> list[tuple[str, str]]:
    """(variable, PromQL) for query variables: the series inside `label_values(EXPR, label)`."""
    found = []
    for variable in variables():
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((?P<expr>.+),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: {query!r} is not label_values(...)"
            found.append((f"${variable['name']}", match["expr"]))
    return found


def substituted(expr: str) -> str:
    """`expr` as Grafana sends it: interval variables filled in, a multi-value variable as the
    regex of "All"; any other `$name` is an unknown variable."""
    values = dict(GRAFANA_INTERVALS)
    values |= {v["name"]: v.get("allValue", "") for v in variables() if v["type"] == "query"}

    def value(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"]
        assert name in values, f"unknown dashboard variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$(?:\{(?P<braced>\w+)\}|(?P<plain>\w+))", value, expr)


def all_queries() -> list[tuple[str, str]]:
    return [(where, substituted(expr)) for where, expr in panel_queries() + variable_queries()]


def test_every_panel_has_a_title_a_description_and_at_least_one_query() -> None:
    for panel in panels(dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel.get("title")
        assert panel.get("targets"), f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']} {target['refId']}: empty query"


def test_promtool_accepts_every_query_as_a_recording_rule(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, (_, expr) in enumerate(all_queries())
    ]
    rule_file = tmp_path / "dashboard.rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_rejects_a_broken_query_so_the_check_above_can_fail(tmp_path: Path) -> None:
    rule_file = tmp_path / "broken.rules.yaml"
    rule = {"record": "dashboard:broken", "expr": "sum by (node) (rate(node_agent_in_sync[5m])"}
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [rule]}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0


def test_every_series_a_query_uses_is_one_the_agent_exports() -> None:
    names, _ = exported_series()
    for where, expr in all_queries():
        used = selectors(expr)
        assert used, f"{where}: no series found in {expr!r}"
        for selector in used:
            assert selector.metric in names, f"{where}: the agent exports no {selector.metric}"


def test_label_matchers_use_labels_the_agent_emits_or_prometheus_adds() -> None:
    _, labels = exported_series()
    for where, expr in all_queries():
        for selector in selectors(expr):
            for label, _, _ in selector.matchers:
                assert label in TARGET_LABELS | labels[selector.metric].keys(), (
                    f"{where}: {selector.metric} has no label {label!r}"
                )


def test_every_query_selects_the_job_the_pod_monitor_sets() -> None:
    for where, expr in all_queries():
        for selector in selectors(expr):
            assert ("job", "=", "node-agent") in selector.matchers, f"{where}: {selector.metric}"


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = {s.metric for _, expr in all_queries() for s in selectors(expr)}
    for what, metric in SHOWN.items():
        assert metric in used, f"no panel shows {what} ({metric})"


def test_the_data_source_is_a_variable_so_any_prometheus_can_be_picked() -> None:
    (source,) = (v for v in variables() if v["type"] == "datasource")
    assert source["query"] == "prometheus"
    for panel in panels(dashboard()):
        assert panel["datasource"] == {"type": "prometheus", "uid": f"${{{source['name']}}}"}


# --------------------------------------------------------------------------- the ConfigMap


def rendered_monitoring(tmp_path: Path) -> list[dict[str, Any]]:
    return kustomize_base_with(tmp_path, MONITORING)


def test_the_monitoring_component_ships_the_dashboard_as_a_config_map_for_the_sidecar(
    tmp_path: Path,
) -> None:
    (config_map,) = (
        body
        for body in rendered_monitoring(tmp_path)
        if body["kind"] == "ConfigMap" and body["metadata"]["name"] == CONFIG_MAP
    )
    assert config_map["metadata"]["namespace"] == "node-agent"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    kubernetes_validate.validate(config_map, str(kubernetes_validate.latest_version()), strict=True)
