"""The trainer's PyTorchJob: `llm-train submit` and deploy/kubeflow/ (base and GPU overlay).

Each job is checked against the training operator's CRD schema (a copy in
deploy/kubeflow/crd/, so no cluster is needed) and the Kubeflow SDK's models, and must
carry settings that `llm-train` itself accepts. Creation goes through the real
`kubernetes` client against a small fake API server.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import jsonschema
import pytest
import yaml
from kubeflow.training import ApiClient
from torch.distributed.run import get_args_parser

from llm.settings import TrainerSettings, load_settings
from llm_trainer import submit

KUBEFLOW = Path(__file__).resolve().parents[2] / "deploy" / "kubeflow"
SUBMIT = ["--image", "registry.local/llm-train:test", "--name", "tiny", "--namespace", "ml"]
SETTINGS = [
    "--set", "checkpoint.run_dir=s3://runs/tiny", "--set", "training.max_steps=300",
    "--set", "model.dim=256", "--set", "optimization.lr=3e-4", "--set", "training.progress=false",
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Only what a test sets reaches the settings (the trainer reads every LLM_* variable)."""
    import os

    for name in list(os.environ):
        if name.startswith("LLM_") or name.startswith("KUBERNETES_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def crd_schema() -> jsonschema.Draft7Validator:
    text = (KUBEFLOW / "crd" / "kubeflow.org_pytorchjobs.yaml").read_text()
    crd = next(d for d in yaml.load_all(text, Loader=yaml.CSafeLoader) if d)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"])


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    """The `add`/`replace` subset of RFC 6902 that kustomize applies for our overlay."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            if last == "-":
                node.append(op["value"])
            else:
                node[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in node, op
            node[last] = op["value"]
    return doc


def kustomize(directory: Path) -> dict:
    """Build a kustomization holding one PyTorchJob (kustomize itself is not installed here)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    (resource,) = kust["resources"]
    path = directory / resource
    job = kustomize(path) if path.is_dir() else yaml.safe_load(path.read_text())
    for patch in kust.get("patches", []):
        assert (patch["target"]["kind"], patch["target"]["name"]) == (
            "PyTorchJob",
            job["metadata"]["name"],
        )
        job = apply_json6902(job, yaml.safe_load((directory / patch["path"]).read_text()))
    return job


def dry_run(capsys, *args: str) -> dict:
    assert submit.main([*SUBMIT, *args, "--dry-run"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def worker(job: dict) -> dict:
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return container


def trainer_settings_from(job: dict, monkeypatch) -> TrainerSettings:
    """What `llm-train` resolves inside the worker from the job's LLM_* variables."""
    for var in worker(job)["env"]:
        if var["name"].startswith("LLM_") and "value" in var:  # not the downward API's
            monkeypatch.setenv(var["name"], var["value"])
    return load_settings()


def check_job(job: dict, validator: jsonschema.Draft7Validator) -> None:
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]

    class Response:  # what ApiClient.deserialize reads from an HTTP response
        data = json.dumps(job)

    model = ApiClient().deserialize(Response(), "KubeflowOrgV1PyTorchJob")
    elastic = model.spec.elastic_policy
    assert elastic.rdzv_backend == "c10d"
    assert 1 <= elastic.min_replicas <= elastic.max_replicas and elastic.max_restarts > 0
    replicas = model.spec.pytorch_replica_specs["Worker"].replicas
    assert elastic.min_replicas <= replicas <= elastic.max_replicas

    container = worker(job)
    assert container["name"] == "pytorch"
    launcher = get_args_parser().parse_args(container["command"][1:])
    assert container["command"][0] == "torchrun" and launcher.module
    assert importlib.util.find_spec(f"{launcher.training_script}.__main__") is not None
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_dry_run_job_is_valid_and_carries_the_settings(capsys, monkeypatch, crd_schema):
    job = dry_run(capsys, *SETTINGS, "--min-replicas", "2", "--max-replicas", "3")
    check_job(job, crd_schema)
    assert job["metadata"] == {
        "name": "tiny", "labels": {"app.kubernetes.io/name": "llm-train"}, "namespace": "ml"
    }  # fmt: skip
    expected = load_settings(submit.overrides(SETTINGS[1::2]))
    assert trainer_settings_from(job, monkeypatch).model_dump() == expected.model_dump()
    assert expected.training.max_steps == 300 and expected.model.dim == 256
    names = {e["name"] for e in worker(job)["env"]}
    assert "LLM_TRAINING__BATCH_SIZE" not in names  # defaults stay out of the manifest


def test_a_list_setting_takes_its_items_comma_separated_or_as_json(capsys, monkeypatch):
    for value in ("q_proj,v_proj", '["q_proj", "v_proj"]', " q_proj , v_proj,"):
        job = dry_run(capsys, *SETTINGS, "--set", f"finetune.targets={value}")
        assert trainer_settings_from(job, monkeypatch).finetune.targets == ("q_proj", "v_proj")
    assert submit.main([*SUBMIT, *SETTINGS, "--set", "finetune.targets=[q_proj", "--dry-run"]) == 2
    assert "finetune.targets: not a JSON list" in capsys.readouterr().err


def test_settings_from_the_environment_and_yaml_reach_the_job(
    capsys, monkeypatch, tmp_path, crd_schema
):
    config = tmp_path / "run.yaml"
    config.write_text("training:\n  block_size: 64\noptimization:\n  schedule: linear\n")
    monkeypatch.setenv("LLM_CHECKPOINT__RUN_DIR", "s3://runs/from-env")
    job = dry_run(capsys, "--config", str(config), "--gpus-per-worker", "4")
    check_job(job, crd_schema)
    monkeypatch.delenv("LLM_CHECKPOINT__RUN_DIR")
    settings = trainer_settings_from(job, monkeypatch)
    assert settings.checkpoint.run_dir == "s3://runs/from-env"
    assert (settings.training.block_size, settings.optimization.schedule) == (64, "linear")
    assert worker(job)["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert job["spec"]["nprocPerNode"] == "4"


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_deploy_kubeflow_jobs_are_valid(overlay, monkeypatch, crd_schema):
    job = kustomize(KUBEFLOW / overlay)
    check_job(job, crd_schema)
    settings = trainer_settings_from(job, monkeypatch)
    assert settings.checkpoint.run_dir.startswith("s3://")
    names = [e["name"] for e in worker(job)["env"]]
    assert len(names) == len(set(names)), names
    # Every worker count the elastic policy allows divides the global batch (else the
    # resized job would exit at start), and the global batch stays the same.
    policy, t = job["spec"]["elasticPolicy"], settings.training
    per_worker = 8 if overlay.endswith("gpu") else int(job["spec"]["nprocPerNode"])
    for workers in range(policy["minReplicas"], policy["maxReplicas"] + 1):
        world = workers * per_worker
        assert t.sequences_per_step(world) == t.global_batch_size, world
    if overlay.endswith("gpu"):
        assert settings.distributed.backend == "nccl"
        assert worker(job)["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_schema_catches_a_broken_job(crd_schema):
    job = kustomize(KUBEFLOW / "base")
    job["spec"]["elasticPolicy"]["maxReplicas"] = "four"
    del worker(job)["image"]
    assert len(list(crd_schema.iter_errors(job))) >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "training.max_steps=0"], "max_steps"),
        (["--set", "checkpoint.run_dir=runs/local"], "s3://"),
        (["--set", "checkpoint.run_dir=s3://r/x", "--set", "nonsense"], "SECTION.FIELD"),
    ],
)
def test_bad_settings_exit_2(capsys, args, message):
    assert submit.main([*SUBMIT, *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


class FakeApiServer(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeApiServer.received.append((self.path, body))
        body["metadata"].setdefault("namespace", self.path.split("/")[5])
        out = json.dumps(body).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kube_api(monkeypatch, tmp_path) -> Iterator[list[tuple[str, dict]]]:
    """A `FakeApiServer` on 127.0.0.1 that the kubeconfig (namespace "team") points at;
    yields the (path, body) of each object created."""
    FakeApiServer.received.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
    }  # fmt: skip
    (tmp_path / "config").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.setattr(submit, "IN_CLUSTER_NAMESPACE", tmp_path / "absent")
    try:
        yield FakeApiServer.received
    finally:
        server.shutdown()


def test_submit_creates_the_job_through_the_kubeconfig(capsys, kube_api):
    code = submit.main(["--image", "img:1", *SETTINGS])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out) == {
        "event": "job_created", "name": "llm-train", "namespace": "team"
    }  # fmt: skip
    ((path, body),) = kube_api
    assert path == "/apis/kubeflow.org/v1/namespaces/team/pytorchjobs"
    assert body["kind"] == "PyTorchJob"


def test_llm_train_submit_dispatches_to_the_job_builder(capsys: pytest.CaptureFixture) -> None:
    from llm_trainer.cli import main as llm_train

    argv = [
        "submit",
        "--image",
        "reg/llm-train:1",
        "--set",
        "checkpoint.run_dir=s3://b/r",
        "--dry-run",
    ]
    assert llm_train(argv) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "PyTorchJob"
    env = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LLM_CHECKPOINT__RUN_DIR", "value": "s3://b/r"} in env


def test_workers_run_locked_down_and_hold_the_job_name() -> None:
    """Non-root, no privilege escalation, no service-account token; the job's name is the
    run lease's holder, so a restarted pod takes its lease at once (llm.training.lease)."""
    manifest = yaml.safe_load((KUBEFLOW / "base" / "pytorchjob.yaml").read_text())
    submitted = submit.build_job(
        submit.parse_args(SUBMIT), load_settings({"checkpoint": {"run_dir": "s3://r/x"}})
    )
    for job in (manifest, submitted):
        pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = worker(job)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        env = {e["name"]: e for e in container["env"]}
        ref = env["LLM_JOB_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert ref == "metadata.labels['training.kubeflow.org/job-name']"
