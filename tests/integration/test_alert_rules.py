"""The chart's alerts under Prometheus's own rule engine: `promtool test rules` feeds each
alert synthetic series and checks it fires (with its labels and its annotations rendered
from the values) when it should, and stays quiet on healthy ones, noisy ones included.

The rules are the chart's rendered PrometheusRule; the expected annotations are the
rendered ones with Prometheus's templates ({{ $value }}, {{ $labels.pod }}) filled in by
hand, so a template that does not render as meant fails too. Needs promtool (Debian's
`prometheus` package; .ci/run installs it): skipped without it, except in CI.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from tests.integration.test_helm_chart import CHART, objects, render
from tests.support import require_binary

NS = "llm"
E = f'namespace="{NS}",job="demo-llm-serve-engine"'
G = f'namespace="{NS}",job="demo-llm-serve-gateway"'
POD_A, POD_B = "demo-llm-serve-engine-7d9f8c6b5-x2k4p", "demo-llm-serve-engine-7d9f8c6b5-q8w2z"
GATEWAY_POD = "demo-llm-serve-gateway-5f6d7c8b9-m3n4b"
ALERTS = ("LLMEngineNoneReady", "LLMEngineQueueGrowing", "LLMEngineTimeToFirstTokenHigh",
          "LLMGatewayErrorRatioHigh", "LLMGatewayRejectingRequests", "LLMEngineRestarting")  # fmt: skip
BUCKETS = ("0.5", "1", "2.5", "5", "10", "30", "+Inf")


def series(name: str, labels: str, values: str) -> dict:
    return {"series": f"{name}{{{labels}}}", "values": values}


def ready(values: str, pod: str = POD_A) -> dict:
    return series("llm_engine_ready", f'{E},pod="{pod}"', values)


def queue(values: str, pod: str = POD_A) -> dict:
    return series("llm_engine_queue_depth", f'{E},pod="{pod}"', values)


def ttft(per_minute: dict[str, int]) -> list[dict]:
    """TTFT histogram buckets growing by `per_minute[le]` observations a minute (cumulative)."""
    return [
        series("llm_engine_time_to_first_token_seconds_bucket", f'{E},pod="{POD_A}",le="{le}"',
               f"0+{per_minute[le]}x30")
        for le in BUCKETS
    ]  # fmt: skip


def requests(route: str, status: str, per_minute: int) -> dict:
    method = "GET" if route.endswith("z") else "POST"
    labels = f'{G},pod="{GATEWAY_POD}",route="{route}",method="{method}",status="{status}"'
    return series("llm_gateway_requests_total", labels, f"0+{per_minute}x30")


def restarts(pod: str, container: str, values: str) -> dict:
    labels = f'namespace="{NS}",pod="{pod}",container="{container}",uid="u-{pod}"'
    return series("kube_pod_container_status_restarts_total", labels, values)


CHAT = "/v1/chat/completions"
FAST = {"0.5": 60, "1": 60, "2.5": 60, "5": 60, "10": 60, "30": 60, "+Inf": 60}
SLOW = {"0.5": 0, "1": 0, "2.5": 0, "5": 60, "10": 60, "30": 60, "+Inf": 60}  # all in (2.5, 5]
# Healthy, if noisy: a queue that comes and goes, one that stays but does not grow, 1% of
# 5xx and of 429s, probes answering 503 (not API traffic), a gateway container restarting
# (not an engine) and another release's engine restarting.
HEALTHY = [
    ready("1x30"), ready("1x30", POD_B),
    queue("0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0 3 0"), queue("2x30", POD_B),
    *ttft(FAST),
    requests(CHAT, "200", 100), requests(CHAT, "500", 1), requests(CHAT, "429", 1),
    requests("/readyz", "503", 50),
    restarts(POD_A, "engine", "0x30"), restarts(GATEWAY_POD, "gateway", "0+1x30"),
    restarts("other-llm-serve-engine-6c5d4b3a2-k9j8h", "engine", "0+1x30"),
]  # fmt: skip


@dataclass
class Firing:
    """An alert that must be quiet at `quiet_at` and firing at `firing_at` on `inputs`."""

    alert: str
    inputs: list[dict]
    quiet_at: str
    firing_at: str
    value: dict[str, str] = field(default_factory=dict)  # Prometheus template -> its text
    labels: dict[str, str] = field(default_factory=dict)  # beyond alertname, severity, namespace


FIRING = [
    Firing("LLMEngineNoneReady", [ready("1x5 0x25"), ready("1x5 0x25", POD_B)], "8m", "12m"),
    # Nothing scraped at all counts as nothing ready.
    Firing("LLMEngineNoneReady", [series("llm_gateway_requests_in_flight", G, "0x30")], "3m", "7m"),
    Firing("LLMEngineQueueGrowing", [queue("0+1x30"), queue("0x30", POD_B)], "4m", "10m",
           {"{{ $value }}": "10"}),
    Firing("LLMEngineQueueGrowing", [queue("0 0 0 0 0 0 0 0 0 0 4+2x20")], "13m", "20m",
           {"{{ $value }}": "24"}),
    Firing("LLMEngineTimeToFirstTokenHigh", ttft(SLOW), "6m", "15m",
           {"{{ $value | humanizeDuration }}": "4.875s"}),
    Firing("LLMGatewayErrorRatioHigh", [requests(CHAT, "200", 100), requests(CHAT, "500", 20),
                                        requests("/v1/models", "200", 0)], "4m", "10m",
           {"{{ $value | humanizePercentage }}": "16.67%"}),
    Firing("LLMGatewayRejectingRequests", [requests(CHAT, "200", 100), requests(CHAT, "429", 25)],
           "8m", "15m", {"{{ $value | humanizePercentage }}": "20%"}),
    Firing("LLMEngineRestarting", [restarts(POD_A, "engine", "0x10 1x20")], "5m", "15m",
           {"{{ $value | humanize }}": "1", "{{ $labels.pod }}": POD_A},
           {"pod": POD_A, "container": "engine", "uid": f"u-{POD_A}"}),
]  # fmt: skip


def rule_file(values: dict | None = None) -> dict:
    docs = objects(
        render(helm.Chart.load(CHART), {"monitoring": {"enabled": True}, **(values or {})})
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return {"groups": rule["spec"]["groups"]}


def expected(rule: dict, case: Firing) -> dict:
    annotations = {}
    for key, text in rule["annotations"].items():
        for template, value in case.value.items():
            text = text.replace(template, value)
        assert "{{" not in text, f"{case.alert}: unfilled template in {text!r}"
        annotations[key] = text
    labels = {**rule["labels"], **case.labels}
    return {"exp_labels": labels, "exp_annotations": annotations}


def unit_tests(rules: dict) -> dict:
    """promtool's test file: each firing case in its own group, then the healthy series."""
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    tests = []
    for case in FIRING:
        quiet = {"eval_time": case.quiet_at, "alertname": case.alert, "exp_alerts": []}
        firing = {"eval_time": case.firing_at, "alertname": case.alert,
                  "exp_alerts": [expected(by_name[case.alert], case)]}  # fmt: skip
        tests.append({"interval": "1m", "input_series": case.inputs,
                      "alert_rule_test": [quiet, firing]})  # fmt: skip
    quiet = [{"eval_time": t, "alertname": a, "exp_alerts": []}
             for a in ALERTS for t in ("6m", "12m", "20m", "29m")]  # fmt: skip
    tests.append({"interval": "1m", "input_series": HEALTHY, "alert_rule_test": quiet})
    return {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}


def promtool(tmp_path: Path, rules: dict) -> subprocess.CompletedProcess:
    binary = require_binary("promtool", "Debian: apt-get install prometheus")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit_tests(rules), sort_keys=False))
    check = subprocess.run([binary, "check", "rules", str(tmp_path / "rules.yaml")],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    return subprocess.run([binary, "test", "rules", "test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_every_alert_fires_on_trouble_and_stays_quiet_when_healthy(tmp_path: Path) -> None:
    rules = rule_file()
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == set(ALERTS) == {case.alert for case in FIRING}
    result = promtool(tmp_path, rules)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "alert"),
    [
        ({"errorRatio": 0.5}, "LLMGatewayErrorRatioHigh"),  # 16.7% of 5xx no longer alert
        ({"ttftP95Seconds": 5}, "LLMEngineTimeToFirstTokenHigh"),  # 4.875 s is below it
        ({"restarts": 2}, "LLMEngineRestarting"),  # one restart is below it
    ],
)
def test_the_thresholds_are_the_values(tmp_path: Path, values: dict, alert: str) -> None:
    """The same scenarios against rules rendered with a higher threshold: the alert that
    should now stay quiet makes promtool fail (so the scenarios do test the thresholds)."""
    result = promtool(tmp_path, rule_file({"monitoring": {"enabled": True, "rules": values}}))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    failed = {a for a in ALERTS if f"alertname: {a}" in output}
    assert failed == {alert}, output
