"""Every PromQL expression the deployment ships, parsed, and the metric names it reads.

The expressions come from the chart's PrometheusRule and engine autoscaler (KEDA triggers),
its Grafana dashboard (panel targets and variable queries, with Grafana's variables given
values as Grafana would) and the prometheus-adapter rules in deploy/prometheus-adapter/
(with the adapter's template fields filled in as the adapter fills them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "charts" / "llm-serve" / "dashboards" / "llm-serve.json"
ADAPTER = REPO / "deploy" / "prometheus-adapter" / "values.yaml"

# Series the rules read that our code does not export: kube-state-metrics' container
# restart counter (docs/operations.md names it as a prerequisite of LLMEngineRestarting).
KUBE_STATE_METRICS = frozenset({"kube_pod_container_status_restarts_total"})


def grafana_values(namespace: str, engine_job: str, gateway_job: str) -> dict[str, str]:
    return {
        "$__rate_interval": "1m",
        "${datasource}": "prometheus",
        "$namespace": namespace,
        "$engine": engine_job,
        "$gateway": gateway_job,
    }


def substitute(expr: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):  # $engine_x before $engine
        expr = expr.replace(name, values[name])
    assert "$" not in expr, f"an unknown variable in {expr!r}"
    return expr


def dashboard_expressions(dashboard: dict, values: dict[str, str]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable (`label_values(SEL, L)`'s
    selector) of a Grafana dashboard."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", substitute(target["expr"], values)))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert m, var["query"]
            out.append((f"variable {var['name']}", substitute(m.group(1), values)))
    return out


def adapter_expressions(values: dict | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) of each prometheus-adapter rule's series and metrics queries, filled in
    for one pod as the adapter does."""
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    fill = {"<<.LabelMatchers>>": 'namespace="llm",pod=~"demo-llm-serve-engine-.+"',
            "<<.GroupBy>>": "pod"}  # fmt: skip
    fill.update(values or {})
    out = []
    for rule in rules:
        name = rule["name"]["as"]
        series = re.match(r"\w+", rule["seriesQuery"]).group(0)
        query = rule["metricsQuery"].replace("<<.Series>>", series)
        for key, value in fill.items():
            query = query.replace(key, value)
        out += [(f"adapter {name} series", rule["seriesQuery"]), (f"adapter {name}", query)]
    return out


def chart_expressions(docs: list[dict]) -> list[tuple[str, str]]:
    """(where, PromQL) of the rendered PrometheusRule alerts and ScaledObject triggers."""
    out = []
    for doc in docs:
        if doc["kind"] == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                out += [(f"alert {r['alert']}", r["expr"]) for r in group["rules"]]
        elif doc["kind"] == "ScaledObject":
            for t in doc["spec"]["triggers"]:
                if t["type"] == "prometheus":
                    out.append((f"trigger {t['name']}", t["metadata"]["query"]))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (raises ValueError if it does not parse)."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def load_dashboard(text: str | None = None) -> dict:
    return json.loads(text if text is not None else DASHBOARD.read_text())


# The sample names each metric type's family exposes (prometheus-client's text format).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


def sample_names(families) -> set[str]:
    """Every series name the families can expose, observed yet or not."""
    return {f.name + suffix for f in families for suffix in _SUFFIXES[f.type]}


def code_metric_names() -> set[str]:
    """What the engine's and gateway's code registers, without running them (the live
    check in tests/e2e/test_monitoring_live.py reads real /metrics)."""
    from types import SimpleNamespace

    from prometheus_client.metrics import MetricWrapperBase

    from llm_engine import metrics
    from llm_gateway.telemetry import Metrics

    families = []
    for name in dir(metrics):
        metric = getattr(metrics, name)
        if isinstance(metric, MetricWrapperBase):
            families += metric.collect()
    gateway = Metrics()
    gateway.watch_pool(SimpleNamespace(endpoints={}))
    families += gateway.registry.collect()
    return sample_names(families)


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names its matchers test) of each selector in `expr`."""
    out: list[tuple[str, set[str]]] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            out.append((node.name, {m.name for m in node.matchers.matchers}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return out
