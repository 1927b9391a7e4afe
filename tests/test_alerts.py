"""The alert rules of daemonset/monitoring/prometheusrule.yaml: accepted by promtool; each
alert shown by promtool's rule unit tests (daemonset/monitoring/tests/alerts.test.yaml) to fire
on a synthetic series and to stay quiet on a healthy one; and built only from series the agent
really exports, selected by labels and label values it really emits — an alert on a
misspelt metric or label value is valid PromQL that never fires.
"""

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.markdown import anchors
from support.promql import Selector, exported_series, promtool, selectors

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "daemonset" / "monitoring"
RULE_FILE = MONITORING / "prometheusrule.yaml"
POD_MONITOR = MONITORING / "podmonitor.yaml"
UNIT_TESTS = MONITORING / "tests" / "alerts.test.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
RULES_NAME = "node-agent.rules.yaml"  # the rule file the unit tests load (`rule_files`)

# What issues 3 and 6 ask alerts for, and the alerts that answer them.
ALERTS_FOR = {
    "drift being repaired repeatedly": {"NodeAgentDriftRepairedRepeatedly"},
    "a node not in sync for 10 minutes": {"NodeAgentNotInSync"},
    "reconcile errors": {"NodeAgentReconcileErrors"},
    "containerd restart rolled back or failed": {
        "NodeAgentContainerdRestartRolledBack",
        "NodeAgentContainerdRestartFailed",
    },
    "agent absent from a node": {"NodeAgentDown", "NodeAgentMissing", "NodeAgentAbsent"},
    "a credentials source the agent cannot use": {
        "NodeAgentSourceRejected",
        "NodeAgentApiUnreachable",
    },
    "a kubelet that has not read the credential provider config the agent changed": {
        "NodeAgentKubeletRestartNeeded",
    },
    "a containerd restart rollout stuck waiting for restart slots": {
        "NodeAgentRestartRolloutStuck",
        "NodeAgentRestartWaitingLong",
    },
}

# Series the rules use that do not come from the agent, and where they come from.
EXTERNAL_SERIES = {
    "up": "Prometheus itself, one per scraped target",
    "kube_daemonset_status_desired_number_scheduled": "kube-state-metrics",
    "kube_daemonset_status_number_available": "kube-state-metrics",
}
# Labels Prometheus adds to every scraped agent series (job and node by the PodMonitor).
TARGET_LABELS = {"job", "node", "instance"}
# Agent labels whose values are configuration (Secret names, file paths), not a fixed set.
FREE_LABELS = {"source"}
JOB = "node-agent"


def rules() -> list[dict[str, Any]]:
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    return [rule for group in spec["groups"] for rule in group["rules"]]


def alert_names() -> set[str]:
    return {rule["alert"] for rule in rules()}


def unit_tests() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(UNIT_TESTS.read_text())
    return document


@pytest.fixture
def rule_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's `spec` as a plain Prometheus rule file, beside the unit tests."""
    spec = yaml.safe_load(RULE_FILE.read_text())["spec"]
    (tmp_path / RULES_NAME).write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return tmp_path


# --------------------------------------------------------------------------- reading PromQL


def test_selectors_are_read_the_way_prometheus_reads_them() -> None:
    expr = (
        'sum by (node) (increase(a_total{job="x", result=~"p|q"}[5m] offset 1m)) > 2 '
        'unless on(node) b == bool 0 or {__name__="c", k!="v"} '
        'or label_replace(d, "dst", "$1", "src", "(e_f)")'
    )
    assert selectors(expr) == [
        Selector("a_total", (("job", "=", "x"), ("result", "=~", "p|q"))),
        Selector("c", (("k", "!=", "v"),)),
        Selector("b"),
        Selector("d"),
    ]


# --------------------------------------------------------------------------- the agent's series


def rule_selectors() -> list[tuple[str, Selector]]:
    return [(rule["alert"], selector) for rule in rules() for selector in selectors(rule["expr"])]


def test_every_series_in_the_rules_is_exported_by_the_agent_or_listed_as_external() -> None:
    names, _ = exported_series()
    used = {selector.metric for _, selector in rule_selectors()}
    assert used - names - EXTERNAL_SERIES.keys() == set()
    assert EXTERNAL_SERIES.keys() <= used, "an external series no rule uses: drop it from the list"
    for alert in alert_names():
        assert any(a == alert for a, _ in rule_selectors()), f"{alert}: no series found"


def test_label_matchers_on_agent_series_use_labels_and_values_the_agent_emits() -> None:
    names, labels = exported_series()
    for alert, selector in rule_selectors():
        if selector.metric not in names:
            continue
        for label, operator, value in selector.matchers:
            if label in TARGET_LABELS:
                continue
            emitted = labels[selector.metric]
            assert label in emitted, f"{alert}: {selector.metric} has no label {label!r}"
            if label in FREE_LABELS:
                continue
            wanted = value.split("|") if operator in ("=~", "!~") else [value]
            assert set(wanted) <= emitted[label], (
                f"{alert}: {selector.metric}{{{label}{operator}{value!r}}}: the agent emits "
                f"{sorted(emitted[label])}"
            )


def test_every_agent_series_in_the_rules_is_selected_by_the_job_the_pod_monitor_sets() -> None:
    names, _ = exported_series()
    (endpoint,) = yaml.safe_load(POD_MONITOR.read_text())["spec"]["podMetricsEndpoints"]
    assert {"action": "replace", "targetLabel": "job", "replacement": JOB} in endpoint[
        "relabelings"
    ]
    for alert, selector in rule_selectors():
        if selector.metric in names or selector.metric == "up":
            assert ("job", "=", JOB) in selector.matchers, f"{alert}: {selector.metric}"


# --------------------------------------------------------------------------- the alerts


def test_the_alerts_are_the_ones_the_issue_asks_for() -> None:
    assert alert_names() == set().union(*ALERTS_FOR.values())
    assert len(rules()) == len(alert_names()), "alert names must be unique"


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, rule["alert"]


def test_promtool_accepts_the_rules(rule_dir: Path) -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", RULES_NAME],
        cwd=rule_dir, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass(rule_dir: Path) -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", UNIT_TESTS.name],
        cwd=rule_dir, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_load_the_rule_file_written_from_the_prometheus_rule() -> None:
    assert unit_tests()["rule_files"] == [RULES_NAME]


def test_each_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_quiet() -> None:
    cases = [case for test in unit_tests()["tests"] for case in test["alert_rule_test"]]
    for alert in alert_names():
        outcomes = [bool(case["exp_alerts"]) for case in cases if case["alertname"] == alert]
        assert True in outcomes, f"{alert}: no unit test where it fires"
        assert False in outcomes, f"{alert}: no unit test where it stays quiet"


def test_a_healthy_cluster_is_shown_to_raise_no_alert_at_all() -> None:
    (healthy,) = (t for t in unit_tests()["tests"] if t["name"].startswith("a healthy cluster"))
    quiet = {case["alertname"] for case in healthy["alert_rule_test"] if not case["exp_alerts"]}
    assert quiet == alert_names()


def test_every_alert_links_its_own_runbook_section_and_the_section_exists() -> None:
    found = anchors(RUNBOOKS.read_text())
    for rule in rules():
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == RUNBOOKS.relative_to(REPO).as_posix(), rule["alert"]
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: links another alert's runbook"
        assert anchor in found, f"{rule['alert']}: docs/runbooks.md has no #{anchor}"


def test_each_runbook_says_what_the_alert_means_how_to_confirm_it_and_what_to_do() -> None:
    text = RUNBOOKS.read_text()
    for alert in alert_names():
        section = text.partition(f"\n## {alert}\n")[2].partition("\n## ")[0]
        assert section, f"docs/runbooks.md: no section for {alert}"
        for part in ("**Means.**", "**Confirm.**", "**Do.**"):
            assert part in section, f"docs/runbooks.md, {alert}: no {part}"


def test_every_runbook_section_belongs_to_an_alert_that_exists() -> None:
    sections = set(re.findall(r"^## (\S+)$", RUNBOOKS.read_text(), flags=re.MULTILINE))
    assert sections == alert_names()
