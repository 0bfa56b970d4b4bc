"""The trainer as a Kubeflow Trainer v2 TrainJob: `llm-train submit --api trainjob` and
deploy/kubeflow/trainjob/.

Each job is checked against Kubeflow Trainer's TrainJob CRD (its schema, unknown fields
refused, and its CEL rules), must run on the torch-distributed runtime's `node` job and
container, and must carry what the PyTorchJob path carries: the same `LLM_*` settings, S3
secret, image, command, resources and node count. Creation goes through the real
`kubernetes` client against a small fake API server.
"""

from __future__ import annotations

import pytest
import yaml
from tests.crds import CRD, CRD_DIR
from tests.integration.test_pytorchjob import (
    KUBEFLOW,
    SETTINGS,
    SUBMIT,
    clean_env,  # noqa: F401 (an autouse fixture)
    kube_api,  # noqa: F401 (a fixture)
    kustomize,
)

from llm.settings import load_settings
from llm_trainer import submit


@pytest.fixture(scope="module")
def trainjob_crd() -> CRD:
    return CRD("trainer.kubeflow.org_trainjobs.yaml")


@pytest.fixture(scope="module")
def runtime() -> dict:
    """Kubeflow Trainer's torch-distributed ClusterTrainingRuntime (as it ships)."""
    path = CRD_DIR / "example-clustertrainingruntime-torch_distributed.yaml"
    return yaml.safe_load(path.read_text())


def dry_run(capsys, *args: str) -> dict:
    assert submit.main([*SUBMIT, *args, "--dry-run"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def node_patch(job: dict) -> tuple[dict, dict]:
    """The runtime patch's pod spec for the `node` job, and its `node` container."""
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def check_trainjob(job: dict, crd: CRD, runtime: dict) -> None:
    assert crd.errors(job) == []
    ref = job["spec"]["runtimeRef"]
    assert (ref["apiGroup"], ref["kind"], ref["name"]) == (
        "trainer.kubeflow.org",
        runtime["kind"],
        runtime["metadata"]["name"],
    )
    # Patches name a replicated job and container that the runtime has.
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    assert replicated["name"] in jobs
    runtime_containers = jobs[replicated["name"]]["template"]["spec"]["template"]["spec"]
    pod, container = node_patch(job)
    assert container["name"] in {c["name"] for c in runtime_containers["containers"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "llm_trainer"]
    env = {e["name"]: e for e in trainer["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"]
    # The JobSet of a TrainJob has its name, and labels its pods with it.
    ref = env["LLM_JOB_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert ref == "metadata.labels['jobset.sigs.k8s.io/jobset-name']"


def settings_from(env: list[dict], monkeypatch) -> object:
    for var in env:
        if var["name"].startswith("LLM_") and "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    return load_settings()


def test_trainjob_matches_the_pytorchjob(capsys, monkeypatch, trainjob_crd, runtime):
    args = [*SETTINGS, "--max-replicas", "3", "--gpus-per-worker", "8", "--s3-endpoint",
            "http://minio.storage:9000", "--s3-secret", "team-s3"]  # fmt: skip
    job = dry_run(capsys, *args, "--api", "trainjob")
    pytorchjob = dry_run(capsys, *args)  # the default API
    assert (job["kind"], pytorchjob["kind"]) == ("TrainJob", "PyTorchJob")
    check_trainjob(job, trainjob_crd, runtime)
    (worker,) = pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"][
        "containers"
    ]
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == worker["image"] == "registry.local/llm-train:test"
    assert trainer["command"] == worker["command"]
    assert trainer["resourcesPerNode"] == worker["resources"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["numProcPerNode"] == int(pytorchjob["spec"]["nprocPerNode"]) == 8
    assert trainer["numNodes"] == pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert trainer["numNodes"] == 3
    # The same variables, only the job-name label differs (each operator's own).
    strip = lambda env: [e for e in env if e["name"] != "LLM_JOB_ID"]  # noqa: E731
    assert strip(trainer["env"]) == strip(worker["env"])
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "team-s3"
    expected = load_settings(submit.overrides(SETTINGS[1::2]))
    assert settings_from(trainer["env"], monkeypatch).model_dump() == expected.model_dump()
    pod, _ = node_patch(job)
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert job["metadata"]["namespace"] == "ml"


def test_replicas_sets_the_nodes_and_a_cpu_job_runs_one_process(capsys, trainjob_crd, runtime):
    job = dry_run(capsys, *SETTINGS, "--api", "trainjob", "--replicas", "2")
    check_trainjob(job, trainjob_crd, runtime)
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 1)
    assert "nvidia.com/gpu" not in trainer["resourcesPerNode"]["limits"]
    pod, _ = node_patch(job)
    assert "tolerations" not in pod


def test_an_elastic_range_is_refused_for_a_trainjob(capsys):
    with pytest.raises(SystemExit) as e:
        submit.main([*SUBMIT, *SETTINGS, "--api", "trainjob", "--min-replicas", "1",
                     "--max-replicas", "4", "--dry-run"])  # fmt: skip
    assert e.value.code == 2
    assert "not elastic" in capsys.readouterr().err


def test_the_crd_catches_a_broken_trainjob(capsys, trainjob_crd):
    job = dry_run(capsys, *SETTINGS, "--api", "trainjob")
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["metadata"]["name"] = "llm_train"  # not a DNS label: a CEL rule of the CRD
    broken["spec"]["trainer"]["numProcPerNode"] = 0  # another CEL rule
    broken["spec"]["trainer"]["numNodes"] = "two"
    broken["spec"]["trainer"]["replicas"] = 2  # TrainJob has no such field
    del broken["spec"]["runtimeRef"]
    errors = "\n".join(trainjob_crd.errors(broken))
    for needle in ("RFC 1035", "numProcPerNode", "numNodes", "replicas", "runtimeRef"):
        assert needle in errors, errors


def test_deploy_kubeflow_trainjob_is_valid(monkeypatch, trainjob_crd, runtime):
    job = kustomize(KUBEFLOW / "trainjob")
    check_trainjob(job, trainjob_crd, runtime)
    trainer = job["spec"]["trainer"]
    names = [e["name"] for e in trainer["env"]]
    assert len(names) == len(set(names)), names
    settings = settings_from(trainer["env"], monkeypatch)
    assert settings.checkpoint.run_dir.startswith("s3://")
    # The same job as the PyTorchJob of deploy/kubeflow/base: settings, image, resources.
    base = kustomize(KUBEFLOW / "base")
    (worker,) = base["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    strip = lambda env: sorted((e for e in env if e["name"] != "LLM_JOB_ID"), key=str)  # noqa: E731
    assert strip(trainer["env"]) == strip(worker["env"])
    assert (trainer["image"], trainer["command"]) == (worker["image"], worker["command"])
    assert trainer["resourcesPerNode"] == worker["resources"]
    assert trainer["numNodes"] == base["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    # Resubmitted on another node count, the global batch stays the same.
    for nodes in range(1, 5):
        assert settings.training.sequences_per_step(nodes) == settings.training.global_batch_size


def test_submit_creates_the_trainjob_through_the_kubeconfig(capsys, kube_api):  # noqa: F811
    code = submit.main(["--image", "img:1", "--api", "trainjob", *SETTINGS])
    assert code == 0, capsys.readouterr().err
    ((path, body),) = kube_api
    assert path == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs"
    assert body["kind"] == "TrainJob" and body["spec"]["trainer"]["image"] == "img:1"
