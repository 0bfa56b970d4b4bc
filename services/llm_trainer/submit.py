"""`llm-train submit`: run the trainer on Kubernetes as a Kubeflow job.

    llm-train submit --image REGISTRY/llm-train:TAG [--config run.yaml]
                     [--set training.max_steps=5000 ...] [--min-replicas 1 --max-replicas 4]
                     [--gpus-per-worker 8] [--namespace NS] [--api pytorchjob|trainjob] [--dry-run]

The trainer settings are resolved exactly as `llm-train` resolves them (`LLM_*` in this
shell, the YAML file, then `--set` overrides) and every value that differs from its
default becomes an `LLM_<SECTION>__<FIELD>` variable of the workers, so the pods need no
config file. `--api pytorchjob` (the default) builds an elastic PyTorchJob for the training
operator v1; `--api trainjob` a Kubeflow Trainer v2 TrainJob on the `torch-distributed`
ClusterTrainingRuntime (`--runtime`), with the same environment, S3 secret, image and node
count, on a fixed number of nodes (`--replicas`, default `--max-replicas`): that runtime is
not elastic. `--dry-run` prints the job as YAML; otherwise it is created with the
`kubernetes` client (in-cluster service account, else the current kubeconfig context).
Exit codes: 0 created or printed, 1 the API refused it, 2 bad arguments or settings.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from llm.settings import TrainerSettings, load_settings
from llm_common.cli import Verbatim, format_errors, parse_flags, resolve

# The API a job is created through, per --api: (group, version, plural).
APIS = {
    "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs"),
    "trainjob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
}
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


DESCRIPTION = """Run the trainer on Kubernetes as a Kubeflow job (a PyTorchJob or a TrainJob).

The trainer's settings are read as llm-train reads them (LLM_* here, --config, then --set)
and become the workers' LLM_* variables. Exit codes: 0 created or printed, 1 the API
refused it, 2 bad arguments or settings."""


class SubmitSettings(BaseSettings):
    """The flags of `llm-train submit` (and only flags: no environment)."""

    api: Literal["pytorchjob", "trainjob"] = Field(
        default="pytorchjob",
        description="pytorchjob: training operator v1, elastic; trainjob: Kubeflow Trainer v2",
    )
    runtime: str = Field(
        default="torch-distributed",
        description="--api trainjob: the ClusterTrainingRuntime the TrainJob runs on",
    )
    name: str = Field(default="llm-train", description="job name (a DNS label)")
    namespace: str | None = Field(
        default=None, description="default: in-cluster namespace or kubeconfig context's"
    )
    image: str = Field(description="the trainer image (Dockerfile.train)")
    config: str | None = Field(
        default=None, description="YAML file with trainer settings (as llm-train --config)"
    )
    set: Annotated[list[str], Verbatim] = Field(
        default_factory=list,
        description="trainer setting override SECTION.FIELD=VALUE, e.g. "
        "training.max_steps=5000; repeatable",
    )
    min_replicas: int | None = Field(
        default=None, description="fewest workers the elastic job runs on (default 1)"
    )
    max_replicas: int = Field(default=4, description="most workers it scales to")
    replicas: int | None = Field(
        default=None, description="workers to start with (default: max); a TrainJob's nodes"
    )
    max_restarts: int = Field(default=10, description="torchrun restarts of the group")
    gpus_per_worker: int = Field(default=0, ge=0, description="0: a CPU job")
    cpu: str = Field(default="4", description="CPU request per worker")
    memory: str = Field(default="16Gi", description="memory request and limit per worker")
    shm_size: str = Field(default="2Gi", description="/dev/shm size (DataLoader workers, NCCL)")
    s3_secret: str = Field(
        default="llm-s3", description="Secret with AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY"
    )
    s3_endpoint: str | None = Field(
        default=None, description="S3-compatible endpoint URL (MinIO, Ceph)"
    )
    dry_run: bool = Field(default=False, description="print the job's YAML and exit")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags only: the environment holds the trainer's settings, which become the job's.
        return (init_settings,)

    @model_validator(mode="after")
    def _replicas(self) -> SubmitSettings:
        if self.api == "trainjob" and self.min_replicas not in (
            None, self.replicas or self.max_replicas,
        ):  # fmt: skip
            raise ValueError(
                "--api trainjob runs a fixed number of nodes (the torch-distributed runtime is"
                " not elastic): give --replicas N (or --max-replicas N) without --min-replicas"
            )
        if self.min_replicas is None:
            self.min_replicas = 1
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= --min-replicas <= --max-replicas")
        if self.replicas is not None and not (
            self.min_replicas <= self.replicas <= self.max_replicas
        ):
            raise ValueError("--replicas must lie within [--min-replicas, --max-replicas]")
        return self


def parse_args(argv: Sequence[str]) -> SubmitSettings:
    """The submit flags (exit 2 on a bad one, 0 after --help)."""
    flags = parse_flags(SubmitSettings, argv, "llm-train submit", DESCRIPTION)
    return resolve(SubmitSettings, flags, "llm-train submit")


def overrides(pairs: list[str]) -> dict[str, Any]:
    """`["training.max_steps=5", ...]` -> `{"training": {"max_steps": "5"}}` (pydantic coerces).
    A list field's value is its items, comma-separated or as JSON, as `llm-train`'s own
    flags take it: `finetune.targets=q_proj,v_proj`."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, field = key.partition(".")
        if not (sep and dot and section and field):
            raise ValueError(f"--set {pair!r}: expected SECTION.FIELD=VALUE")
        field = field.replace("-", "_")
        items = _items(section, field, value)
        tree.setdefault(section, {})[field] = value if items is None else items
    return tree


def _items(section: str, field: str, value: str) -> list[Any] | None:
    """The items of a list field's value; None for any other field (or an unknown one,
    which the settings then name)."""
    part = TrainerSettings.model_fields.get(section)
    info = getattr(part.annotation, "model_fields", {}).get(field) if part else None
    if info is None or get_origin(info.annotation) not in (list, tuple, set, frozenset):
        return None
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {section}.{field}: not a JSON list: {e}") from None
    return [item.strip() for item in value.split(",") if item.strip()]


def env_value(value: Any) -> str:
    # pydantic-settings reads strings as-is and everything else (numbers, bools, lists) as JSON.
    return value if isinstance(value, str) else json.dumps(value)


def trainer_env(settings: TrainerSettings) -> list[dict[str, str]]:
    """`LLM_<SECTION>__<FIELD>` for every value that differs from a fresh section's default."""
    env = []
    for section in type(settings).model_fields:
        current: BaseModel = getattr(settings, section)
        defaults = type(current)().model_dump(mode="json")
        for field, value in current.model_dump(mode="json").items():
            if value != defaults[field] and value is not None:
                name = f"LLM_{section.upper()}__{field.upper()}"
                env.append({"name": name, "value": env_value(value)})
    return env


# The image's user (Dockerfile.train), no privilege escalation, the runtime's seccomp profile.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# The label that names a worker pod's job: the training operator's, and JobSet's (a TrainJob
# runs as the JobSet of the same name).
_JOB_NAME_LABEL = "metadata.labels['training.kubeflow.org/job-name']"
_JOBSET_NAME_LABEL = "metadata.labels['jobset.sigs.k8s.io/jobset-name']"
# torchrun takes nnodes, rendezvous and nproc from the PET_* variables both operators set.
COMMAND = ["torchrun", "-m", "llm_trainer"]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def worker_env(
    args: SubmitSettings, settings: TrainerSettings, job_name_label: str
) -> list[dict[str, Any]]:
    """The settings as `LLM_*`, the S3 credentials from the Secret, the run lease's holder."""
    secret = lambda key: {"secretKeyRef": {"name": args.s3_secret, "key": key}}  # noqa: E731
    env = [
        *trainer_env(settings),
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": secret("AWS_ACCESS_KEY_ID")},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": secret("AWS_SECRET_ACCESS_KEY")},
        # The run lease's holder: a restarted pod of the same job takes its lease at once.
        {"name": "LLM_JOB_ID", "valueFrom": {"fieldRef": {"fieldPath": job_name_label}}},
    ]
    if args.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": args.s3_endpoint})
    return env


def worker_resources(args: SubmitSettings) -> dict[str, Any]:
    limits: dict[str, Any] = {"memory": args.memory}
    if args.gpus_per_worker:
        limits["nvidia.com/gpu"] = args.gpus_per_worker
    return {"requests": {"cpu": args.cpu, "memory": args.memory}, "limits": limits}


def shm_volume(args: SubmitSettings) -> dict[str, Any]:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": args.shm_size}}


def worker_container(args: SubmitSettings, settings: TrainerSettings) -> dict[str, Any]:
    return {
        "name": "pytorch",  # the training operator finds the trainer by this name
        "image": args.image,
        "command": COMMAND,
        "env": worker_env(args, settings, _JOB_NAME_LABEL),
        "resources": worker_resources(args),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": CONTAINER_SECURITY,
    }


def job_metadata(args: SubmitSettings) -> dict[str, Any]:
    """The metadata of either kind of job: its name, label and (given) namespace."""
    metadata: dict[str, Any] = {
        "name": args.name,
        "labels": {"app.kubernetes.io/name": "llm-train"},
    }
    if args.namespace:
        metadata["namespace"] = args.namespace
    return metadata


def build_job(args: SubmitSettings, settings: TrainerSettings) -> dict[str, Any]:
    metadata = job_metadata(args)
    pod_spec: dict[str, Any] = {
        # The trainer talks to object storage, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "containers": [worker_container(args, settings)],
        "volumes": [shm_volume(args)],
    }
    if args.gpus_per_worker:
        pod_spec["tolerations"] = [GPU_TOLERATION]
    return {
        "apiVersion": "/".join(APIS["pytorchjob"][:2]),
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "minReplicas": args.min_replicas,
                "maxReplicas": args.max_replicas,
                "maxRestarts": args.max_restarts,
            },
            "nprocPerNode": str(args.gpus_per_worker or 1),
            # Keep finished pods for their logs; restarts are torchrun's (maxRestarts).
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": args.replicas or args.max_replicas,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": pod_spec},
                }
            },
        },
    }


# The runtime's replicated job and container that run torchrun (Kubeflow Trainer's
# torch-distributed ClusterTrainingRuntime); patches name them.
TRAINER_NODE = "node"
PATCH_MANAGER = "llm-train-submit"


def build_trainjob(args: SubmitSettings, settings: TrainerSettings) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob: the same container as `build_job`'s on a fixed number
    of nodes; what TrainJob's `trainer` cannot say (pod security, /dev/shm, GPU
    tolerations) goes in a runtime patch of the runtime's `node` job."""
    metadata = job_metadata(args)
    pod_patch: dict[str, Any] = {
        "securityContext": POD_SECURITY,
        "volumes": [shm_volume(args)],
        "containers": [
            {
                "name": TRAINER_NODE,
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                "securityContext": CONTAINER_SECURITY,
            }
        ],
    }
    if args.gpus_per_worker:
        pod_patch["tolerations"] = [GPU_TOLERATION]
    job_patch = {"name": TRAINER_NODE, "template": {"spec": {"template": {"spec": pod_patch}}}}
    return {
        "apiVersion": "/".join(APIS["trainjob"][:2]),
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {
                "apiGroup": APIS["trainjob"][0],
                "kind": "ClusterTrainingRuntime",
                "name": args.runtime,
            },
            "trainer": {
                "image": args.image,
                "command": COMMAND,
                "numNodes": args.replicas or args.max_replicas,
                "numProcPerNode": args.gpus_per_worker or 1,
                "env": worker_env(args, settings, _JOBSET_NAME_LABEL),
                "resourcesPerNode": worker_resources(args),
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job_patch]}}},
                }
            ],
        },
    }


def current_namespace() -> str:
    from kubernetes import config

    if IN_CLUSTER_NAMESPACE.is_file():
        return IN_CLUSTER_NAMESPACE.read_text().strip()
    _, context = config.list_kube_config_contexts(os.environ.get("KUBECONFIG"))
    return context["context"].get("namespace", "default")


def create(job: dict[str, Any], namespace: str | None, api: str = "pytorchjob") -> dict[str, Any]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # KUBECONFIG is read now: the client's own default was fixed when it was imported.
        config.load_kube_config(os.environ.get("KUBECONFIG"))
    namespace = namespace or current_namespace()
    group, version, plural = APIS[api]
    return client.CustomObjectsApi().create_namespaced_custom_object(
        group, version, namespace, plural, job
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(overrides(args.set), args.config)
    except ValidationError as e:
        print(f"llm-train submit: {format_errors(TrainerSettings, e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"llm-train submit: error: {e}", file=sys.stderr)
        return 2
    if not settings.checkpoint.run_dir.startswith("s3://"):
        # Workers on different nodes resume from the same checkpoints: local disks won't do.
        print(
            "llm-train submit: error: checkpoint.run_dir must be an s3:// URI for a cluster "
            f"job (got {settings.checkpoint.run_dir!r}); set LLM_CHECKPOINT__RUN_DIR or "
            "--set checkpoint.run_dir=s3://...",
            file=sys.stderr,
        )
        return 2
    job = build_trainjob(args, settings) if args.api == "trainjob" else build_job(args, settings)
    if args.dry_run:
        print(yaml.safe_dump(job, sort_keys=False), end="")
        return 0
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    try:
        created = create(job, args.namespace, args.api)
    except ConfigException as e:
        print(f"llm-train submit: no cluster configuration: {e}", file=sys.stderr)
        return 1
    except ApiException as e:
        print(f"llm-train submit: the API refused the job: {e.status} {e.reason}", file=sys.stderr)
        return 1
    meta = created["metadata"]
    print(
        json.dumps({"event": "job_created", "name": meta["name"], "namespace": meta["namespace"]})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
