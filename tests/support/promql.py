"""Reading PromQL the way the monitoring tests need it (alert rules and dashboard panels):
the series selectors an expression uses, the series the agent exports, and promtool."""

import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from node_agent.metrics import TARGETS, AgentMetrics

# One API source configured, so the per-source series exist (their values are configuration).
SOURCE = "node-agent/registry-credentials"


@dataclass(frozen=True)
class Selector:
    """A series selector in an expression: metric name and label matchers."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...] = ()  # (label, operator, value)


_BRACED = re.compile(r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)?\s*\{(?P<matchers>[^}]*)\}")
_MATCHER = re.compile(
    r'(?P<label>[A-Za-z_]\w*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"'
)
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*(?P<call>\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[Selector]:
    """Every series selector in a PromQL expression (names with and without braces); function
    names, grouping clauses, ranges, string literals and keywords are not selectors."""
    found: list[Selector] = []

    def braced(match: re.Match[str]) -> str:
        matchers = tuple(
            (m["label"], m["op"], m["value"]) for m in _MATCHER.finditer(match["matchers"])
        )
        name = match["name"] if (match["name"] or "and").lower() not in _KEYWORDS else ""
        name = name or next((v for k, _, v in matchers if k == "__name__"), "")
        found.append(Selector(name, tuple(m for m in matchers if m[0] != "__name__")))
        return " "

    rest = _BRACED.sub(braced, expr)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = _CLAUSE.sub(" ", rest)
    for match in _IDENTIFIER.finditer(rest):
        if not match["call"] and match[0].lower() not in _KEYWORDS:
            found.append(Selector(match[0]))
    return found


def exported_series() -> tuple[set[str], dict[str, dict[str, set[str]]]]:
    """The agent's sample names (`metric_names()`, so `_total`, `_bucket`... included) and,
    per sample name, each label with the values it takes — with every target, one API
    source and stuck-pod recovery configured, the agent creates every label set it will ever
    use up front."""
    metrics = AgentMetrics(CollectorRegistry())
    metrics.add_targets(TARGETS)
    metrics.add_sources([SOURCE])
    metrics.add_stuck_pod_recovery()
    labels: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for family in metrics.registry.collect():
        for sample in family.samples:
            series = labels[sample.name]  # created even for a sample without labels
            for label, value in sample.labels.items():
                series[label].add(value)
    return metrics.metric_names(), labels


def promtool() -> str:
    path = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(path).exists():
        pytest.skip("promtool not found (Debian package prometheus; .ci/install-system-deps.sh)")
    return path
