"""The chart's monitoring against a live engine and gateway (processes on 127.0.0.1, started
on the metrics ports the rendered chart gives them).

1. Every metric and label that the alerts, dashboard, KEDA triggers and prometheus-adapter
   rules read is on their real /metrics (kube-state-metrics' restart counter aside).
2. A real Prometheus server, configured from the rendered ServiceMonitors as
   prometheus-operator configures it (the Service's port resolved to the pods' port, the
   path, the relabelling of `job`; the target labels Kubernetes service discovery attaches
   given as static labels), scrapes both, evaluates the rendered PrometheusRule without an
   error (no engine-ready alert while one is ready), and answers every dashboard, KEDA and
   adapter query; those that must have data do. Needs the `prometheus` binary (Debian's
   package; .ci/run installs it): skipped without it, except in CI.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import helm_python as helm
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.e2e.e2e_services import Service, running_stack
from tests.integration.test_helm_chart import CHART, NAMESPACE, container, find, objects, render
from tests.promql import (
    KUBE_STATE_METRICS,
    adapter_expressions,
    chart_expressions,
    dashboard_expressions,
    grafana_values,
    load_dashboard,
    metric_names,
    selectors,
)
from tests.support import free_port, require_binary, stop_process

pytestmark = pytest.mark.slow

ENGINE_JOB, GATEWAY_JOB = "demo-llm-serve-engine", "demo-llm-serve-gateway"
PODS = {"engine": "demo-llm-serve-engine-7d9f8c6b5-x2k4p",
        "gateway": "demo-llm-serve-gateway-5f6d7c8b9-m3n4b"}  # fmt: skip
# Labels a target gets from Prometheus (service discovery, relabelling) rather than from
# the process's /metrics.
TARGET_LABELS = {"namespace", "job", "pod", "service", "container", "endpoint", "instance"}


@pytest.fixture(scope="module")
def chart_docs() -> list[dict]:
    values = {
        "monitoring": {"enabled": True},
        "engine": {"metricsPort": free_port(), "autoscaling": {"enabled": True}},
        "gateway": {"metricsPort": free_port()},
    }
    return objects(render(helm.Chart.load(CHART), values))


def env_of(docs: list[dict], component: str) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs, component)["env"]}


@pytest.fixture(scope="module")
def live(
    chart_docs: list[dict], tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    """The engine and gateway with the chart's metrics ports, slots and queue, after a few
    requests (streamed and not, and one 404) so every labelled series exists."""
    engine_env, gateway_env = env_of(chart_docs, "engine"), env_of(chart_docs, "gateway")
    engine_args = ["--metrics-port", engine_env["LLM_ENGINE_METRICS_PORT"],
                   "--slots", engine_env["LLM_ENGINE_SLOTS"],
                   "--max-queue", engine_env["LLM_ENGINE_MAX_QUEUE"]]  # fmt: skip
    gateway_args = ["--metrics-port", gateway_env["LLM_GATEWAY_METRICS_PORT"]]
    logs = tmp_path_factory.mktemp("monitoring")
    with running_stack(tiny_checkpoint, logs, engine_args, gateway_args) as (engine, gateway):
        base = f"http://127.0.0.1:{gateway.port}/v1"
        model = httpx.get(f"{base}/models").json()["data"][0]["id"]
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert httpx.post(f"{base}/chat/completions", json=chat, timeout=60).status_code == 200
        with httpx.stream("POST", f"{base}/chat/completions", json={**chat, "stream": True},
                          timeout=60) as r:  # fmt: skip
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        completion = {"model": model, "prompt": "The ", "max_tokens": 3}
        assert httpx.post(f"{base}/completions", json=completion, timeout=60).status_code == 200
        missing = {**chat, "model": "no-such-model"}
        assert httpx.post(f"{base}/chat/completions", json=missing).status_code == 404
        yield engine, gateway


def scrape(url: str) -> dict[str, set[str]]:
    """Series name -> label names, from a /metrics page."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def monitored(docs: list[dict], component: str) -> tuple[dict, dict, dict]:
    """The component's ServiceMonitor, its one endpoint, and the Service it selects."""
    (monitor,) = find(docs, "ServiceMonitor", f"-{component}")
    (endpoint,) = monitor["spec"]["endpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    (service,) = [s for s in find(docs, "Service") if selector <= s["metadata"]["labels"].items()]
    return monitor, endpoint, service


def metrics_urls(docs: list[dict]) -> dict[str, str]:
    """component -> the /metrics URL its ServiceMonitor points at, resolved through its
    Service's port to the pods' containerPort, on 127.0.0.1."""
    urls = {}
    for component in ("engine", "gateway"):
        _, endpoint, service = monitored(docs, component)
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        ports = {p["name"]: p["containerPort"] for p in container(docs, component)["ports"]}
        urls[component] = f"http://127.0.0.1:{ports[port['targetPort']]}{endpoint['path']}"
    return urls


def all_expressions(docs: list[dict]) -> list[tuple[str, str]]:
    (configmap,) = find(docs, "ConfigMap", "-dashboard")
    dashboard = load_dashboard(configmap["data"]["llm-serve.json"])
    return [
        *chart_expressions(docs),
        *dashboard_expressions(dashboard, grafana_values(NAMESPACE, ENGINE_JOB, GATEWAY_JOB)),
        *adapter_expressions(
            {"<<.LabelMatchers>>": f'namespace="{NAMESPACE}",pod="{PODS["engine"]}"'}
        ),
    ]


def test_every_metric_the_monitoring_reads_is_exported(live, chart_docs) -> None:
    urls = metrics_urls(chart_docs)
    exported = {**scrape(urls["engine"]), **scrape(urls["gateway"])}
    assert "llm_engine_ready" in exported and "llm_gateway_requests_total" in exported
    for where, expr in all_expressions(chart_docs):
        names = metric_names(expr) - KUBE_STATE_METRICS
        assert names <= set(exported), f"{where}: {names - set(exported)} not on /metrics"
        for metric, labels in selectors(expr):
            if metric in exported:
                unknown = labels - exported[metric] - TARGET_LABELS
                assert not unknown, f"{where}: {metric} has no label {unknown}"


# -- a real Prometheus -----------------------------------------------------------------


def relabel_config(relabeling: dict) -> dict:
    """A prometheus-operator RelabelConfig as Prometheus's relabel_config."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    out = {keys.get(k, k): v for k, v in relabeling.items()}
    if "action" in out:
        out["action"] = out["action"].lower()
    return out


def scrape_configs(docs: list[dict]) -> list[dict]:
    """The scrape jobs prometheus-operator generates from the rendered ServiceMonitors, for
    the processes on 127.0.0.1 (interval shortened to 1 s for the test)."""
    urls = metrics_urls(docs)
    jobs = []
    for component in ("engine", "gateway"):
        monitor, endpoint, service = monitored(docs, component)
        url = httpx.URL(urls[component])
        jobs.append({
            "job_name": f"serviceMonitor/{NAMESPACE}/{monitor['metadata']['name']}/0",
            "scrape_interval": "1s", "scrape_timeout": "1s",
            "metrics_path": endpoint["path"],
            "static_configs": [{"targets": [f"127.0.0.1:{url.port}"], "labels": {
                # What Kubernetes service discovery attaches and the operator keeps; the job
                # is the Service's name until the monitor's relabelling renames it.
                "namespace": NAMESPACE, "service": service["metadata"]["name"],
                "job": service["metadata"]["name"], "pod": PODS[component],
                "container": component, "endpoint": endpoint["port"],
            }}],
            "relabel_configs": [relabel_config(r) for r in endpoint.get("relabelings", [])],
        })  # fmt: skip
    return jobs


@pytest.fixture(scope="module")
def prometheus(live, chart_docs, tmp_path_factory) -> Iterator[str]:
    binary = require_binary("prometheus", "Debian: apt-get install prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    (rule,) = find(chart_docs, "PrometheusRule")
    (work / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yaml")],
        "scrape_configs": scrape_configs(chart_docs),
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: _get(f"{url}/-/ready") is not None, 60,
               lambda: (work / "prometheus.log").read_text()[-3000:])  # fmt: skip
        yield url
    finally:
        stop_process(proc)
        log.close()


def _get(url: str, **params: str) -> dict | None:
    try:
        r = httpx.get(url, params=params, timeout=5)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else {}


def _until(condition, timeout: float, why=lambda: "") -> None:
    """Wait for `condition`; past `timeout` fail with what `why()` says."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {why()}")
        time.sleep(0.25)


def query(url: str, expr: str) -> list[dict]:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def test_prometheus_scrapes_what_the_service_monitors_point_at(prometheus, chart_docs) -> None:
    def targets() -> list[dict]:
        return _get(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]

    def targets_up() -> bool:
        active = targets()
        return len(active) == 2 and all(t["health"] == "up" for t in active)

    _until(targets_up, 30, lambda: json.dumps(targets(), indent=1))
    active = targets()
    jobs = {t["labels"]["job"]: t for t in active}
    assert set(jobs) == {ENGINE_JOB, GATEWAY_JOB}, json.dumps(active, indent=1)
    for t in active:
        assert t["health"] == "up", t  # port and path are the ones served
        assert httpx.URL(t["scrapeUrl"]).path == "/metrics"
    # The series carry the labels the alerts and dashboard select by.
    engine_sel = f'namespace="{NAMESPACE}",job="{ENGINE_JOB}"'
    _until(lambda: query(prometheus, f"llm_engine_ready{{{engine_sel}}}"), 20)
    ((sample,),) = [query(prometheus, f"sum(llm_engine_ready{{{engine_sel}}})")]
    assert float(sample["value"][1]) == 1
    gateway_sel = f'namespace="{NAMESPACE}",job="{GATEWAY_JOB}",route=~"/v1/.*"'
    assert query(prometheus, f"sum(llm_gateway_requests_total{{{gateway_sel}}}) > 0")


def test_rules_and_queries_evaluate_on_the_live_series(prometheus, chart_docs) -> None:
    """Every rule evaluates without error and none fires; every dashboard, KEDA and adapter
    query runs, and the capacity signals the autoscaler reads have values."""

    def evaluated() -> list[dict]:
        groups = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return (
            rules
            if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
            else []
        )

    _until(lambda: evaluated() and query(prometheus, "llm_engine_slots"), 30)
    time.sleep(2)  # a few evaluations over the scraped series
    rules = evaluated()
    assert len(rules) == 6
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", rule  # a healthy, lightly used stack
    for where, expr in all_expressions(chart_docs):
        if "series" in where:  # an adapter's seriesQuery selects, it is not evaluated
            continue
        query(prometheus, expr)  # parses and evaluates on the server
    triggers = {w: e for w, e in chart_expressions(chart_docs) if w.startswith("trigger")}
    ((slots,),) = [query(prometheus, triggers["trigger slot-usage"])]
    assert 0 <= float(slots["value"][1]) <= 1  # replicas' worth of busy slots: one replica
    ((waiting,),) = [query(prometheus, triggers["trigger queue-depth"])]
    assert float(waiting["value"][1]) == 0
    adapter = dict(adapter_expressions(
        {"<<.LabelMatchers>>": f'namespace="{NAMESPACE}",pod="{PODS["engine"]}"'}
    ))  # fmt: skip
    ((usage,),) = [query(prometheus, adapter["adapter llm_engine_slot_usage"])]
    assert usage["metric"] == {"pod": PODS["engine"]} and 0 <= float(usage["value"][1]) <= 1
