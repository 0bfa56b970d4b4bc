"""The chart's operator objects: engine autoscaling (KEDA or prometheus-adapter), monitoring
(ServiceMonitor/PodMonitor, PrometheusRule, Grafana dashboard), rendered by Helm's own
library (the engine's startupProbe: test_engine_probes.py).

Every ServiceMonitor, PodMonitor, PrometheusRule and ScaledObject must pass its operator's
CRD (tests/crds.py: schema, unknown fields, CEL rules), everything else the Kubernetes API
schemas; every PromQL expression must parse and read only metrics our code registers
(tests/promql.py; tests/e2e/test_monitoring_live.py checks a live engine's and gateway's
/metrics and a real Prometheus).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity
from tests.crds import CRD
from tests.integration.test_helm_chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    container,
    find,
    objects,
    render,
)
from tests.integration.test_helm_chart import merge as merge_values
from tests.promql import (
    KUBE_STATE_METRICS,
    adapter_expressions,
    chart_expressions,
    code_metric_names,
    dashboard_expressions,
    grafana_values,
    load_dashboard,
    metric_names,
)

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = REPO / "docs" / "operations.md"
SCRAPERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
CASES = {
    "keda+servicemonitor": {
        "monitoring": {"enabled": True},
        "networkPolicy": {"metricsScrapers": SCRAPERS},
        "engine": {"autoscaling": {"enabled": True}},
    },
    "adapter+podmonitor": {
        "monitoring": {
            "enabled": True,
            "kind": "PodMonitor",
            "labels": {"release": "kube-prometheus-stack"},
            "dashboard": {"annotations": {"grafana_folder": "LLM"}},
        },
        "engine": {
            "autoscaling": {
                "enabled": True,
                "provider": "prometheus-adapter",
                "minReplicas": 2,
                "maxReplicas": 8,
                "targetSlotUsage": 0.6,
                "targetQueueDepth": 2.5,
            }
        },
    },
}
OPERATOR_CRDS = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    "ScaledObject": "keda.sh_scaledobjects.yaml",
}
ENGINE_JOB, GATEWAY_JOB = "demo-llm-serve-engine", "demo-llm-serve-gateway"


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(CHART)


@pytest.fixture(scope="module")
def crds() -> dict[str, CRD]:
    return {kind: CRD(name) for kind, name in OPERATOR_CRDS.items()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, chart) -> tuple[str, list[dict]]:
    return request.param, objects(render(chart, CASES[request.param]))


def one(docs: list[dict], kind: str, suffix: str = "") -> dict:
    (doc,) = find(docs, kind, suffix)
    return doc


@pytest.mark.parametrize("name", list(CASES))
def test_lint_is_clean(name):
    values = merge_values({"model": {"uri": "s3://models/runs/demo"}}, CASES[name])
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and report["messages"] == [], report


def test_every_object_passes_its_schema(case, crds):
    name, docs = case
    kinds = {d["kind"] for d in docs}
    monitor = CASES[name]["monitoring"].get("kind", "ServiceMonitor")
    assert {monitor, "PrometheusRule", "ConfigMap"} <= kinds
    assert ("ScaledObject" if "keda" in name else "HorizontalPodAutoscaler") in kinds
    for doc in docs:
        if doc["kind"] in crds:
            assert crds[doc["kind"]].errors(doc) == [], doc["metadata"]["name"]
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_crds_catch_broken_objects(chart, crds):
    docs = objects(render(chart, CASES["keda+servicemonitor"]))
    scaled = copy.deepcopy(one(docs, "ScaledObject"))
    scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"] = 5, 2  # a CEL rule
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 0.75  # metadata holds strings
    errors = "\n".join(crds["ScaledObject"].errors(scaled))
    assert "minReplicaCount" in errors and "threshold" in errors, errors
    monitor = copy.deepcopy(one(docs, "ServiceMonitor", "-engine"))
    monitor["spec"]["endpoints"][0]["targetport"] = 9090  # a misspelt field
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    errors = "\n".join(crds["ServiceMonitor"].errors(monitor))
    assert "targetport" in errors and "interval" in errors, errors
    rule = copy.deepcopy(one(docs, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    assert crds["PrometheusRule"].errors(rule)


# -- monitoring ------------------------------------------------------------------------


def _pod(docs: list[dict], component: str) -> dict:
    return one(docs, "Deployment", f"-{component}")["spec"]["template"]


def test_monitors_scrape_the_port_the_processes_serve_metrics_on(case):
    """Monitor -> (Service port ->) the pods' `metrics` port -> LLM_*_METRICS_PORT, the
    port the process serves /metrics on; each job is relabelled to the name the alerts,
    dashboard and autoscaler select by."""
    name, docs = case
    kind = CASES[name]["monitoring"].get("kind", "ServiceMonitor")
    for component, prefix in (("engine", "LLM_ENGINE_"), ("gateway", "LLM_GATEWAY_")):
        monitor = one(docs, kind, f"-{component}")
        pod = _pod(docs, component)
        env = {e["name"]: e.get("value") for e in container(docs, component)["env"]}
        ports = {p["name"]: p["containerPort"] for p in container(docs, component)["ports"]}
        selector = monitor["spec"]["selector"]["matchLabels"]
        endpoints = monitor["spec"][
            "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
        ]
        (endpoint,) = endpoints
        assert endpoint["path"] == "/metrics"
        if kind == "ServiceMonitor":
            services = [s for s in find(docs, "Service")
                        if selector.items() <= s["metadata"]["labels"].items()]  # fmt: skip
            (service,) = services  # one Service per component: no target scraped twice
            assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            target = port["targetPort"]
        else:
            assert selector.items() <= pod["metadata"]["labels"].items()
            target = endpoint["port"]
        assert ports[target] == int(env[f"{prefix}METRICS_PORT"]) > 0
        (relabel,) = endpoint["relabelings"]
        job = ENGINE_JOB if component == "engine" else GATEWAY_JOB
        assert relabel == {"action": "replace", "targetLabel": "job", "replacement": job}
        assert (
            monitor["metadata"]["labels"].items()
            >= CASES[name]["monitoring"].get("labels", {}).items()
        )
    # The gateway's metrics stay off its public Service.
    (public,) = find(docs, "Service", "-gateway")
    assert [p["name"] for p in public["spec"]["ports"]] == ["http"]


def test_monitoring_is_off_by_default(chart):
    docs = objects(render(chart, {}))
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject"}
    assert not find(docs, "ConfigMap", "-dashboard")
    assert one(docs, "Deployment", "-engine")["spec"]["replicas"] == 1
    notes = render(chart, {"monitoring": {"enabled": True}})["llm-serve/templates/NOTES.txt"]
    assert "networkPolicy.metricsScrapers is empty" in notes


def test_every_promql_expression_parses_and_reads_only_our_metrics(case):
    _, docs = case
    dashboard = load_dashboard(one(docs, "ConfigMap", "-dashboard")["data"]["llm-serve.json"])
    exprs = [
        *chart_expressions(docs),
        *dashboard_expressions(dashboard, grafana_values(NAMESPACE, ENGINE_JOB, GATEWAY_JOB)),
        *adapter_expressions(),
    ]
    ours = code_metric_names()
    read: set[str] = set()
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where} reads no metric: {expr}"
        assert names <= ours | KUBE_STATE_METRICS, f"{where}: {names - ours}"
        read |= names
    # What the issue asks to see and alert on is all there.
    for metric in ("llm_engine_queue_depth", "llm_engine_active_slots", "llm_engine_slots",
                   "llm_engine_kv_cache_usage_ratio", "llm_engine_ready",
                   "llm_engine_time_to_first_token_seconds_bucket",
                   "llm_engine_inter_token_latency_seconds_bucket", "llm_gateway_requests_total",
                   "llm_gateway_tokens_total", "kube_pod_container_status_restarts_total"):  # fmt: skip
        assert metric in read, metric


def test_a_wrong_expression_is_caught():
    with pytest.raises(ValueError):
        metric_names("sum(rate(llm_engine_decode_tokens_total[5m])")  # unbalanced
    assert metric_names("sum(rate(llm_engine_decode_token_total[5m]))") - code_metric_names()


def test_alerts_name_what_to_look_at(chart):
    docs = objects(render(chart, CASES["keda+servicemonitor"]))
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert set(alerts) == {
        "LLMEngineNoneReady", "LLMEngineQueueGrowing", "LLMEngineTimeToFirstTokenHigh",
        "LLMGatewayErrorRatioHigh", "LLMGatewayRejectingRequests", "LLMEngineRestarting",
    }  # fmt: skip
    runbook = OPERATIONS.read_text()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["labels"]["namespace"] == NAMESPACE
        assert len(rule["annotations"]["description"]) > 200, name
        assert (
            ENGINE_JOB in rule["annotations"]["summary"]
            or GATEWAY_JOB in rule["annotations"]["summary"]
        )
        assert re.search(rf"^### {name}$", runbook, re.M), f"docs/operations.md lacks {name}"
    assert alerts["LLMEngineQueueGrowing"]["for"] == "5m"
    assert (
        "> 2" in alerts["LLMEngineTimeToFirstTokenHigh"]["expr"]
    )  # monitoring.rules.ttftP95Seconds
    tuned = objects(render(chart, merge_values(CASES["keda+servicemonitor"], {
        "monitoring": {"rules": {"ttftP95Seconds": 7.5, "errorRatio": 0.01, "restarts": 3}}
    })))  # fmt: skip
    exprs = {
        r["alert"]: r["expr"] for r in one(tuned, "PrometheusRule")["spec"]["groups"][0]["rules"]
    }
    assert exprs["LLMEngineTimeToFirstTokenHigh"].endswith("> 7.5")
    assert exprs["LLMGatewayErrorRatioHigh"].endswith("> 0.01")
    assert exprs["LLMEngineRestarting"].endswith(">= 3")
    off = objects(render(chart, {"monitoring": {"enabled": True, "rules": {"enabled": False}}}))
    assert not find(off, "PrometheusRule") and find(off, "ServiceMonitor")


def test_the_dashboard_shows_what_on_call_needs(case):
    name, docs = case
    configmap = one(docs, "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"].get("annotations", {}) == CASES[name]["monitoring"].get(
        "dashboard", {}
    ).get("annotations", {})
    dashboard = load_dashboard(configmap["data"]["llm-serve.json"])
    assert dashboard == load_dashboard()  # the file, byte for byte through the ConfigMap
    assert dashboard["uid"] == "llm-serve"
    titles = {p["title"] for p in dashboard["panels"]}
    for title in ("Requests by route and status", "Tokens/s in and out", "Time to first token",
                  "Inter-token latency", "Queue depth by engine", "Slot occupancy by engine",
                  "KV cache usage by engine", "Errors by code"):  # fmt: skip
        assert title in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel[
                "title"
            ]
    ttft = next(p for p in dashboard["panels"] if p["title"] == "Time to first token")
    assert {t["legendFormat"] for t in ttft["targets"]} >= {"p50", "p95", "p99"}


# -- engine autoscaling ----------------------------------------------------------------


def _drain_seconds(docs: list[dict]) -> int:
    return _pod(docs, "engine")["spec"]["terminationGracePeriodSeconds"]


def _check_behavior(behavior: dict, docs: list[dict], stabilization: int) -> None:
    """Scale-down waits `stabilization` s of low load, then removes one engine per period
    no shorter than an engine's whole drain; scale-up is immediate (a new engine still
    needs its model load)."""
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] == stabilization
    (policy,) = down["policies"]
    assert policy["type"] == "Pods" and policy["value"] == 1
    assert policy["periodSeconds"] >= _drain_seconds(docs)
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0


def test_keda_scales_the_engines_on_queue_depth_and_slot_usage(chart):
    docs = objects(render(chart, CASES["keda+servicemonitor"]))
    scaled = one(docs, "ScaledObject")
    engine = one(docs, "Deployment", "-engine")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": engine["metadata"]["name"]
    }  # fmt: skip
    assert "replicas" not in engine["spec"]  # the autoscaler owns it
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 4)
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    selector = f'{{namespace="{NAMESPACE}",job="{ENGINE_JOB}"}}'
    slots, queue = triggers["slot-usage"], triggers["queue-depth"]
    assert slots["metadata"]["query"] == (
        f"sum(llm_engine_active_slots{selector}) / max(llm_engine_slots{selector})"
    )
    assert queue["metadata"]["query"] == f"sum(llm_engine_queue_depth{selector})"
    assert (slots["metadata"]["threshold"], queue["metadata"]["threshold"]) == ("0.75", "4")
    for trigger in triggers.values():
        assert trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["serverAddress"].startswith("http://")
    assert scaled["spec"]["fallback"]["behavior"] == "currentReplicasIfHigher"
    hpa = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    _check_behavior(hpa["behavior"], docs, 600)
    assert one(docs, "PodDisruptionBudget", "-engine")["spec"]["maxUnavailable"] == 1
    longer = objects(render(chart, merge_values(CASES["keda+servicemonitor"], {
        "engine": {"shutdownGraceSeconds": 300, "autoscaling": {"scaleDownStabilizationSeconds": 900}}
    })))  # fmt: skip
    behavior = one(longer, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    _check_behavior(behavior["behavior"], longer, 900)


def test_prometheus_adapter_hpa_reads_the_adapters_metrics(chart):
    values = CASES["adapter+podmonitor"]
    docs = objects(render(chart, values))
    hpa = one(docs, "HorizontalPodAutoscaler", "-engine")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == one(docs, "Deployment", "-engine")["metadata"]["name"]
    )
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    targets = {
        m["pods"]["metric"]["name"]: float(parse_quantity(m["pods"]["target"]["averageValue"]))
        for m in hpa["spec"]["metrics"]
    }
    assert targets == {"llm_engine_slot_usage": 0.6, "llm_engine_queue_depth": 2.5}
    adapter = yaml.safe_load((REPO / "deploy/prometheus-adapter/values.yaml").read_text())
    served = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    assert set(targets) == served  # every metric the HPA reads, the adapter serves
    for rule in adapter["rules"]["custom"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    _check_behavior(hpa["spec"]["behavior"], docs, 600)
    assert not find(docs, "ScaledObject")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"engine": {"autoscaling": {"provider": "knative"}}}, "/engine/autoscaling/provider"),
        ({"engine": {"autoscaling": {"targetSlotUsage": 1.5}}}, "targetSlotUsage"),
        (
            {"engine": {"autoscaling": {"keda": {"serverAddress": "prometheus:9090"}}}},
            "serverAddress",
        ),
        ({"engine": {"startupSeconds": 0}}, "/engine/startupSeconds"),
        ({"monitoring": {"kind": "Probe"}}, "/monitoring/kind"),
        ({"monitoring": {"interval": "15 seconds"}}, "/monitoring/interval"),
        ({"monitoring": {"rules": {"ttftP95Seconds": 60}}}, "ttftP95Seconds"),
        ({"monitoring": {"dashbord": {}}}, "dashbord"),
    ],
)
def test_invalid_values_are_rejected(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(chart, values)


def test_min_above_max_replicas_fails(chart):
    values = {"engine": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}
    with pytest.raises(Exception, match="minReplicas must not exceed"):
        render(chart, values)
