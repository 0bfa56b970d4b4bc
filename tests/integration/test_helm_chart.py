"""The llm-serve chart rendered by Helm's own library (helm-python-sdk, no binary).

Every rendered object must pass the Kubernetes API schemas, every environment variable
must be a real setting of the service that receives it, and bad values must be refused
by values.schema.json with a message naming the key.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import entry_points
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from llm_engine.settings import EngineSettings
from llm_gateway.settings import GatewaySettings, KeyLimits

CHART = Path(__file__).resolve().parents[2] / "charts" / "llm-serve"
KUBE_VERSION = "1.30.0"
NAMESPACE = "llm"
BASE = {"model": {"uri": "s3://models/runs/demo"}}
CASES = {
    "default": {},
    "gpu": {
        "engine": {
            "gpu": {"enabled": True, "count": 1},
            "dtype": "bfloat16",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    },
    "existing-secret": {
        "apiKeys": {"existingSecret": "team-keys", "secretKey": "keys.json"},
        "s3": {"endpoint": "http://minio.storage:9000", "existingSecret": "s3-creds"},
        "otel": {"enabled": True, "endpoint": "http://otel-collector.observability:4317"},
    },
    "autoscaling": {
        "apiKeys": {"keys": ["sk-test-0123456789"]},
        "gateway": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
        "engine": {"replicas": 3, "maxModelLen": 4096, "kvCacheGiB": 1.5},
    },
    "rate-limits": {
        "apiKeys": {
            "keys": ["sk-test-0123456789", {"key": "sk-team-0123456789", "rpm": 60, "tpm": 2000000}]
        },
        "gateway": {
            "rateLimit": {
                "requestsPerMinute": 600,
                "tokensPerMinute": 1500000,
                "redisUrl": "redis://redis.cache:6379/0",
            }
        },
    },
}
# Read by the services through libraries, not settings classes: S3 credentials by
# llm.storage (checked against its source below), OpenTelemetry's own variables, and the
# pod name that OTEL_RESOURCE_ATTRIBUTES interpolates.
AWS_VARS = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
OTEL_VARS = {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_RESOURCE_ATTRIBUTES",
             "OTEL_TRACES_EXPORTER"}  # fmt: skip
DOWNWARD_API = {"POD_NAME"}
PLAIN_VARS = {"HOME"}  # /tmp: the root filesystem is read-only


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(CHART)


def render(chart, values: dict) -> dict[str, str]:
    return chart.render(merge(BASE, values), name="demo", namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def find(docs: list[dict], kind: str, suffix: str = "") -> list[dict]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def container(docs: list[dict], component: str) -> dict:
    (deploy,) = find(docs, "Deployment", f"-{component}")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module", params=list(CASES))
def case(request, chart):
    return request.param, objects(render(chart, CASES[request.param]))


@pytest.mark.parametrize("name", list(CASES))
def test_lint_is_clean(name):
    values = merge(BASE, CASES[name])
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and report["messages"] == [], report


def test_every_object_is_valid_for_kubernetes(case):
    _, docs = case
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "NetworkPolicy", "ServiceAccount"} <= kinds
    assert {"PodDisruptionBudget"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_env_vars_are_real_settings(case, monkeypatch):
    _, docs = case
    # The object-store variables the chart sets are the ones `storage` builds its S3 client
    # from: set them, and the filesystem it makes carries them.
    from llm import storage

    aws = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "chart-key",
           "AWS_SECRET_ACCESS_KEY": "chart-secret"}  # fmt: skip
    assert set(aws) == AWS_VARS
    for name, value in aws.items():
        monkeypatch.setenv(name, value)
    fs, _ = storage.url_to_fs("s3://bucket/run")
    assert (fs.key, fs.secret, fs.endpoint_url) == ("chart-key", "chart-secret", aws[
        "AWS_ENDPOINT_URL"
    ])  # fmt: skip
    for component, settings_cls, prefix in (
        ("engine", EngineSettings, "LLM_ENGINE_"),
        ("gateway", GatewaySettings, "LLM_GATEWAY_"),
    ):
        env = container(docs, component)["env"]
        names = [e["name"] for e in env]
        assert len(names) == len(set(names)), names
        ours = {n.removeprefix(prefix).lower() for n in names if n.startswith(prefix)}
        assert ours <= set(settings_cls.model_fields), ours - set(settings_cls.model_fields)
        assert (
            set(names) - {prefix + f.upper() for f in ours}
            <= AWS_VARS | OTEL_VARS | DOWNWARD_API | PLAIN_VARS
        )
        # The literal values (and a stand-in for each Secret) must parse as settings.
        for var in env:
            if var["name"].startswith(prefix):
                value = var.get("value", json.dumps(["sk-from-secret-000"]))
                monkeypatch.setenv(var["name"], value)
        settings_cls()


def test_commands_are_console_scripts(case):
    _, docs = case
    scripts = {ep.name for ep in entry_points(group="console_scripts")}
    for component, script in (("engine", "llm-engine"), ("gateway", "llm-gateway")):
        assert container(docs, component)["command"] == [script]
        assert script in scripts


def test_gateway_balances_over_the_headless_engine_service(case):
    _, docs = case
    (headless,) = find(docs, "Service", "-engine-headless")
    assert headless["spec"]["clusterIP"] == "None"
    env = {e["name"]: e.get("value") for e in container(docs, "gateway")["env"]}
    port = headless["spec"]["ports"][0]["port"]
    host = f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert env["LLM_GATEWAY_ENGINE"] == f"dns:///{host}:{port}"
    engine = container(docs, "engine")
    assert engine["readinessProbe"]["grpc"]["port"] == port
    assert container(docs, "gateway")["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_only_the_gateway_reaches_the_engine(case):
    _, docs = case
    (policy,) = find(docs, "NetworkPolicy")
    (engine,) = find(docs, "Deployment", "-engine")
    (gateway,) = find(docs, "Deployment", "-gateway")
    assert policy["spec"]["podSelector"]["matchLabels"] == engine["spec"]["selector"]["matchLabels"]
    (grpc_rule,) = policy["spec"]["ingress"]  # /metrics: only listed scrapers (none here)
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": gateway["spec"]["selector"]["matchLabels"]}}
    ]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    scraped = objects(
        render(helm.Chart.load(CHART), {"networkPolicy": {"metricsScrapers": [monitoring]}})
    )
    (policy,) = find(scraped, "NetworkPolicy")
    assert policy["spec"]["ingress"][1] == {
        "from": [monitoring],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    }
    env = {e["name"]: e.get("value") for e in container(docs, "engine")["env"]}
    ports = {p["name"]: p["containerPort"] for p in container(docs, "engine")["ports"]}
    assert ports["metrics"] == int(env["LLM_ENGINE_METRICS_PORT"]) > 0


def test_termination_grace_covers_the_engine_drain(case):
    _, docs = case
    (engine,) = find(docs, "Deployment", "-engine")
    env = {e["name"]: e.get("value") for e in container(docs, "engine")["env"]}
    drain = float(env["LLM_ENGINE_SHUTDOWN_GRACE_S"])
    assert engine["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_gateway_metrics_are_off_the_public_port(chart):
    docs = objects(render(chart, {}))
    gateway = container(docs, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert ports["metrics"] == int(env["LLM_GATEWAY_METRICS_PORT"]) != ports["http"]
    (service,) = find(docs, "Service", "-gateway")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_probes_and_graceful_stop(chart):
    docs = objects(render(chart, {}))
    engine = container(docs, "engine")
    assert engine["livenessProbe"]["grpc"]["service"] == "liveness"
    gateway = container(docs, "gateway")
    assert gateway["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    (deployment,) = find(docs, "Deployment", "-gateway")
    period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert period > 5 + float(env["LLM_GATEWAY_SHUTDOWN_GRACE_S"])


def test_the_engine_token_is_on_by_default_and_shared_with_the_gateway(chart):
    import base64

    docs = objects(render(chart, {}))
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    token = secrets["demo-llm-serve-engine-token"]["data"]["engine-token"]
    assert len(base64.b64decode(token)) == 48
    refs = {
        name: {e["name"]: e for e in container(docs, name)["env"]}[var]["valueFrom"]
        for name, var in (("engine", "LLM_ENGINE_AUTH_TOKEN"),
                          ("gateway", "LLM_GATEWAY_ENGINE_TOKEN"))
    }  # fmt: skip
    assert refs["engine"] == refs["gateway"]
    assert refs["engine"]["secretKeyRef"]["name"] == "demo-llm-serve-engine-token"
    (policy,) = find(docs, "NetworkPolicy")
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])  # nothing open to all
    off = objects(render(chart, {"engineAuth": {"enabled": False}}))
    assert "LLM_ENGINE_AUTH_TOKEN" not in {e["name"] for e in container(off, "engine")["env"]}


def test_gpu_values(chart):
    docs = objects(render(chart, CASES["gpu"]))
    engine = container(docs, "engine")
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["LLM_ENGINE_DEVICE"] == "cuda"
    pod = find(docs, "Deployment", "-engine")[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_existing_secrets_are_referenced_not_created(chart):
    docs = objects(render(chart, CASES["existing-secret"]))
    assert [s["metadata"]["name"] for s in find(docs, "Secret")] == ["demo-llm-serve-engine-token"]
    gw = {e["name"]: e for e in container(docs, "gateway")["env"]}
    ref = gw["LLM_GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "team-keys", "key": "keys.json"}
    engine = {e["name"]: e for e in container(docs, "engine")["env"]}
    assert engine["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert engine["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert engine["OTEL_SERVICE_NAME"]["value"] == "llm-engine"
    # The engine exports spans only when told to: an endpoint alone is not enough.
    for name in ("engine", "gateway"):
        env = {e["name"]: e.get("value") for e in container(docs, name)["env"]}
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    plain = objects(render(chart, CASES["autoscaling"]))  # otel off: no OTEL_* at all
    for name in ("engine", "gateway"):
        assert not [e for e in container(plain, name)["env"] if e["name"].startswith("OTEL_")]


def test_without_keys_a_key_is_generated_unless_open_on_purpose(chart):
    import base64

    docs = objects(render(chart, {}))
    (secret,) = find(docs, "Secret", "-api-keys")
    (generated,) = json.loads(base64.b64decode(secret["data"]["api-keys"]))
    assert generated.startswith("sk-") and len(generated) == 43
    gw = {e["name"]: e for e in container(docs, "gateway")["env"]}
    assert (
        gw["LLM_GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]
        == secret["metadata"]["name"]
    )
    assert "LLM_GATEWAY_ALLOW_UNAUTHENTICATED" not in gw
    assert "kubectl -n llm get secret" in render(chart, {})["llm-serve/templates/NOTES.txt"]

    docs = objects(render(chart, {"apiKeys": {"allowUnauthenticated": True}}))
    assert find(docs, "Secret", "-api-keys") == []
    gw = {e["name"]: e.get("value") for e in container(docs, "gateway")["env"]}
    assert gw["LLM_GATEWAY_ALLOW_UNAUTHENTICATED"] == "true" and "LLM_GATEWAY_API_KEYS" not in gw


def test_created_api_key_secret_holds_a_json_list(chart):
    import base64

    docs = objects(render(chart, CASES["autoscaling"]))
    (secret,) = find(docs, "Secret", "-api-keys")
    (key,) = secret["data"]
    assert json.loads(base64.b64decode(secret["data"][key])) == ["sk-test-0123456789"]


def test_rate_limits_reach_the_gateway(chart):
    import base64

    docs = objects(render(chart, CASES["rate-limits"]))
    env = {e["name"]: e for e in container(docs, "gateway")["env"]}
    assert env["LLM_GATEWAY_RATE_LIMIT_RPM"]["value"] == "600"
    assert env["LLM_GATEWAY_RATE_LIMIT_TPM"]["value"] == "1500000"  # not 1.5e+06
    assert env["LLM_GATEWAY_RATE_LIMIT_REDIS_URL"]["value"] == "redis://redis.cache:6379/0"
    (secret,) = find(docs, "Secret", "-api-keys")
    keys = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert GatewaySettings(api_keys=keys).load_key_limits() == {
        "sk-test-0123456789": KeyLimits(),
        "sk-team-0123456789": KeyLimits(rpm=60, tpm=2000000),
    }
    # A Redis URL with a password comes from a Secret; no limits set: no variables at all.
    values = {"gateway": {"rateLimit": {"redisExistingSecret": "redis-auth"}}}
    env = {e["name"]: e for e in container(objects(render(chart, values)), "gateway")["env"]}
    ref = env["LLM_GATEWAY_RATE_LIMIT_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "redis-auth", "key": "redis-url"}
    plain = container(objects(render(chart, {})), "gateway")["env"]
    assert not [e for e in plain if e["name"].startswith("LLM_GATEWAY_RATE_LIMIT")]


def test_autoscaling_values(chart):
    docs = objects(render(chart, CASES["autoscaling"]))
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    (gateway,) = find(docs, "Deployment", "-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in gateway["spec"]  # the HPA owns it
    assert find(docs, "Deployment", "-engine")[0]["spec"]["replicas"] == 3
    env = {e["name"]: e.get("value") for e in container(docs, "engine")["env"]}
    assert (env["LLM_ENGINE_MAX_MODEL_LEN"], env["LLM_ENGINE_KV_CACHE_GIB"]) == ("4096", "1.5")


def test_root_filesystems_are_read_only_with_a_sized_tmp(chart):
    docs = objects(render(chart, {}))
    for name, size in (("engine", "8Gi"), ("gateway", "256Mi")):
        (deployment,) = find(docs, "Deployment", f"-{name}")
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
        assert tmp["emptyDir"] == {"sizeLimit": size}
        assert {"name": "HOME", "value": "/tmp"} in c["env"]


def test_notes_show_the_openai_sdk(chart):
    notes = render(chart, {})["llm-serve/templates/NOTES.txt"]
    assert "from openai import OpenAI" in notes
    assert "demo-llm-serve-gateway" in notes
    assert "<one of your API keys>" in notes
    open_notes = render(chart, {"apiKeys": {"allowUnauthenticated": True}})
    assert "accepts every request" in open_notes["llm-serve/templates/NOTES.txt"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": {"uri": ""}}, "/model/uri"),
        ({"model": {"uri": "runs/relative"}}, "/model/uri"),
        ({"engine": {"replicas": 0}}, "/engine/replicas"),
        ({"engine": {"dtype": "fp8"}}, "/engine/dtype"),
        ({"engine": {"port": "50051"}}, "/engine/port"),
        ({"gateway": {"autoscalling": {"enabled": True}}}, "autoscalling"),
        ({"apiKeys": {"keys": "sk-not-a-list"}}, "/apiKeys/keys"),
        ({"apiKeys": {"keys": [{"key": "sk-0123456789", "rpn": 5}]}}, "/apiKeys/keys/0"),
        (
            {"gateway": {"rateLimit": {"requestsPerMinute": 0}}},
            "/gateway/rateLimit/requestsPerMinute",
        ),
        (
            {"gateway": {"rateLimit": {"redisUrl": "http://redis:6379"}}},
            "/gateway/rateLimit/redisUrl",
        ),
    ],
)
def test_invalid_values_are_rejected(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(chart, values)
