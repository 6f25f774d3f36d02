"""Kubernetes mode: each claimed phase runs as one ``batch/v1`` Job.

The scheduler (a runq worker, right after a claim commits) builds the phase's
bundle from the database and makes two objects, both named after the claim,
``runq-<task>-<phase>-<fence>``:

* a **Job** whose one container runs ``runq run-phase --bundle-dir
  /var/run/runq``. It reports like an agent, over the broker, signed with a
  key that speaks for this claim only;
* a **Secret** holding what the container needs and nobody else may read:
  the bundle (configuration, state, saved plan), the claim's run key, the
  pool's name and the broker URL. The Job mounts it read-only; nothing secret
  is in the Job's env or args, which anyone who may read Jobs can read.

Hazards and what guards them:

* **A duplicate hand-off** (the reconciler re-sends an unstarted claim, or
  two workers race): the names come from the claim, so the second create
  gets 409 AlreadyExists and starts nothing twice. A retry also completes a
  launch that failed half way (Job made, Secret not).
* **A re-run apply**: ``backoffLimit: 0`` and ``restartPolicy: Never``.
  Kubernetes never starts a failed phase again; runq decides (and never
  re-runs an apply).
* **A Secret that outlives its Job**: the Job is made first and the Secret
  names it as its owner, so deleting the Job (cancel, ``ttlSecondsAfterFinished``)
  deletes the Secret too. The pod waits for the Secret to appear before it
  starts, so the order costs nothing.
* **A Job that dies without reporting**: the reconciler reads each running
  claim's Job (:func:`job_outcome`) and ends the task with Kubernetes' reason
  (:mod:`scheduler.k8s_jobs`).

This module talks to Kubernetes only; what it needs from the database comes
in a :class:`Launch`, prepared by :mod:`scheduler.k8s_jobs`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from executors.base import Bundle, Handoff
from scheduler.settings import Settings
from scheduler.states import Phase

log = logging.getLogger(__name__)

#: Where the Job's container finds its Secret.
BUNDLE_DIR = "/var/run/runq"
COMMAND = ("runq", "run-phase", "--bundle-dir", BUNDLE_DIR)
CONTAINER = "runq"

#: The Secret's keys (files under ``BUNDLE_DIR``).
BUNDLE_FILE = "bundle.json"
RUN_KEY_FILE = "run_key"
POOL_FILE = "pool"
BROKER_FILE = "broker_url"

LABEL_WORKSPACE = "runq.dev/workspace"
LABEL_TASK = "runq.dev/task"
LABEL_PHASE = "runq.dev/phase"
LABEL_FENCE = "runq.dev/fence"

#: Kubernetes refuses a Secret whose data is larger than this.
SECRET_LIMIT = 1024 * 1024
#: Seconds the container gets after SIGTERM (a cancel deletes the Job) on
#: top of ``RUNQ_SHUTDOWN_GRACE``: to report the state terraform saved.
REPORT_GRACE = 30


class K8sError(Exception):
    """The Kubernetes API refused or failed a request runq needed."""


class BundleTooLarge(K8sError):
    """The phase's bundle does not fit in a Secret."""


@dataclass(frozen=True)
class JobSpec:
    """Where and how a workspace's Jobs run: the ``RUNQ_K8S_*`` settings,
    overridden key by key by the workspace's own (``runq workspace create
    --k8s``, see :data:`scheduler.workspaces.K8S_KEYS`)."""

    namespace: str
    image: str
    service_account: str = ""
    resources: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Settings, overrides: str | Mapping[str, Any] | None = None) -> JobSpec:
        """The spec from ``settings``, with ``overrides`` (a mapping or its
        stored JSON) taking precedence."""
        over: dict[str, Any] = dict(
            json.loads(overrides) if isinstance(overrides, str) else overrides or {}
        )
        return cls(
            namespace=str(over.get("namespace") or settings.k8s_namespace),
            image=str(over.get("image") or settings.k8s_image),
            service_account=str(over.get("service_account", settings.k8s_service_account)),
            resources=dict(over.get("resources", _json_object(settings.k8s_resources))),
            env={
                **_json_object(settings.k8s_env),
                **{str(k): str(v) for k, v in dict(over.get("env") or {}).items()},
            },
        )


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text or "{}")
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {text!r}")
    return value


def job_name(task_id: int, phase: Phase | str, fence: int) -> str:
    """``runq-<task>-<phase>-<fence>``: a DNS-1123 label (at most 50 characters
    for 63-bit ids), the same for every hand-off of one claim."""
    return f"runq-{task_id}-{phase}-{fence}"


def handle_of(namespace: str, name: str) -> str:
    return f"k8s:{namespace}/{name}"


_LABEL_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def label_value(text: str) -> str:
    """``text`` as a label value: at most 63 of ``[A-Za-z0-9_.-]``, starting
    and ending alphanumeric. A name that had to be cut keeps a short hash of
    the whole, so two long names stay apart."""
    value = _LABEL_BAD.sub("-", text)
    if len(value) > 63:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        value = f"{value[:54]}-{digest}"
    return value.strip("_.-")[:63]


def labels(handoff: Handoff) -> dict[str, str]:
    return {
        LABEL_WORKSPACE: label_value(handoff.workspace),
        LABEL_TASK: str(handoff.task_id),
        LABEL_PHASE: str(handoff.phase),
        LABEL_FENCE: str(handoff.fence),
    }


@dataclass(frozen=True)
class Launch:
    """Everything one Job needs, read from the scheduler's database."""

    bundle: Bundle
    spec: JobSpec
    pool: str
    #: The claim's run key (:func:`executors.signing.run_key`): signs its
    #: reports, and nothing else.
    run_key: bytes
    broker_url: str

    @property
    def name(self) -> str:
        h = self.bundle.handoff
        return job_name(h.task_id, h.phase, h.fence)

    def secret_data(self) -> dict[str, bytes]:
        return {
            BUNDLE_FILE: json.dumps(self.bundle.to_json(), separators=(",", ":")).encode(),
            RUN_KEY_FILE: self.run_key.hex().encode(),
            POOL_FILE: self.pool.encode(),
            BROKER_FILE: self.broker_url.encode(),
        }


def runner_env(settings: Settings) -> dict[str, str]:
    """The (non-secret) settings the Job's runner needs to behave as the
    scheduler expects: heartbeats within the lease, the same graces."""
    return {
        "RUNQ_HEARTBEAT_INTERVAL": f"{settings.heartbeat_interval:g}",
        "RUNQ_LEASE_TTL": f"{settings.lease_ttl:g}",
        "RUNQ_KILL_GRACE": f"{settings.kill_grace:g}",
        "RUNQ_SHUTDOWN_GRACE": f"{settings.shutdown_grace:g}",
        "RUNQ_REPORT_TIMEOUT": f"{settings.report_timeout:g}",
        "RUNQ_MAX_ARTIFACT_BYTES": str(settings.max_artifact_bytes),
    }


def job_manifest(settings: Settings, launch: Launch) -> dict[str, Any]:
    handoff, spec = launch.bundle.handoff, launch.spec
    meta = labels(handoff)
    # The Job's own backstop: past the phase's timeout, the kill grace and one
    # lease, runq's reconciler gives up on it too.
    deadline = (handoff.timeout or settings.plan_timeout) + settings.kill_grace
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": math.ceil(settings.shutdown_grace) + REPORT_GRACE,
        "volumes": [
            {"name": "bundle", "secret": {"secretName": launch.name, "defaultMode": 0o444}}
        ],
        "containers": [
            {
                "name": CONTAINER,
                "image": spec.image,
                "command": list(COMMAND),
                "env": [
                    {"name": k, "value": v} for k, v in {**runner_env(settings), **spec.env}.items()
                ],
                "resources": dict(spec.resources),
                "volumeMounts": [{"name": "bundle", "mountPath": BUNDLE_DIR, "readOnly": True}],
            }
        ],
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    else:
        # terraform needs no Kubernetes API: do not hand it a token.
        pod["automountServiceAccountToken"] = False
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": launch.name, "namespace": spec.namespace, "labels": meta},
        "spec": {
            # Never again: a failed phase is runq's to judge, and an apply
            # that ran once must not run twice.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": settings.k8s_job_ttl,
            "activeDeadlineSeconds": math.ceil(deadline + settings.lease_ttl),
            "template": {"metadata": {"labels": meta}, "spec": pod},
        },
    }


def secret_manifest(launch: Launch, owner_uid: str) -> dict[str, Any]:
    h = launch.bundle.handoff
    meta: dict[str, Any] = {
        "name": launch.name,
        "namespace": launch.spec.namespace,
        "labels": labels(h),
    }
    if owner_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": launch.name,
                "uid": owner_uid,
                "blockOwnerDeletion": False,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {k: base64.b64encode(v).decode("ascii") for k, v in launch.secret_data().items()},
    }


# ----------------------------------------------------------------- the API


class JobApi:
    """The few calls runq makes, over the official client (sync).

    Built from an ``ApiClient``: tests point one at an in-memory API server.
    """

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def create_job(self, body: dict[str, Any]) -> tuple[str, bool]:
        """``(uid, created)``; an existing Job of that name is not an error."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            # The client takes plain manifests as well as its models.
            job = self.batch.create_namespaced_job(ns, cast(Any, body))
            created = True
        except Exception as exc:
            if _status(exc) != 409:
                raise
            job = self.batch.read_namespaced_job(name, ns)
            created = False
        return str(getattr(job.metadata, "uid", None) or ""), created

    def create_secret(self, body: dict[str, Any]) -> bool:
        """True if made now; False if it existed."""
        try:
            self.core.create_namespaced_secret(body["metadata"]["namespace"], cast(Any, body))
        except Exception as exc:
            if _status(exc) != 409:
                raise
            return False
        return True

    def read_job(self, namespace: str, name: str) -> Any | None:
        """The Job (a ``V1Job``), or None if there is none of that name."""
        try:
            return self.batch.read_namespaced_job(name, namespace)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete the Job and, in the background, its pods (and Secret).
        False if it was gone already."""
        from kubernetes import client

        try:
            self.batch.delete_namespaced_job(
                name, namespace, body=client.V1DeleteOptions(propagation_policy="Background")
            )
        except Exception as exc:
            if _status(exc) != 404:
                raise
            return False
        return True

    def delete_secret(self, namespace: str, name: str) -> bool:
        try:
            self.core.delete_namespaced_secret(name, namespace)
        except Exception as exc:
            if _status(exc) != 404:
                raise
            return False
        return True


def _status(exc: Exception) -> int | None:
    """The HTTP status of a Kubernetes API error (None for anything else)."""
    from kubernetes.client.exceptions import ApiException

    return exc.status if isinstance(exc, ApiException) else None


def api_client_for(settings: Settings) -> Any:
    """An ``ApiClient`` from ``RUNQ_K8S_KUBECONFIG``, else the in-cluster
    service account, else ``~/.kube/config``."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if settings.k8s_kubeconfig:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=settings.k8s_kubeconfig, client_configuration=cfg
        )
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    return client.ApiClient(cfg)


_apis: dict[str, JobApi] = {}
_apis_lock = threading.Lock()


def job_api(settings: Settings) -> JobApi:
    """This process's API, built on first use (reading the kubeconfig once)."""
    key = settings.k8s_kubeconfig
    with _apis_lock:
        api = _apis.get(key)
        if api is None:
            api = _apis[key] = JobApi(api_client_for(settings))
        return api


# ----------------------------------------------------------------- launching


class K8sLauncher:
    """Hands a claimed phase to Kubernetes: its Job, then its Secret."""

    def __init__(
        self, settings: Settings, api: JobApi, prepare: Callable[[Handoff], Launch]
    ) -> None:
        self.settings = settings
        self.api = api
        self.prepare = prepare

    def launch(self, handoff: Handoff) -> str:
        launch = self.prepare(handoff)
        size = sum(len(v) for v in launch.secret_data().values())
        if size > SECRET_LIMIT:
            raise BundleTooLarge(
                f"the {handoff.phase} bundle of task {handoff.task_id} is {size} bytes; "
                f"a Kubernetes Secret holds at most {SECRET_LIMIT}"
            )
        ns = launch.spec.namespace
        uid, created = self.api.create_job(job_manifest(self.settings, launch))
        # After the Job, so the Job can own it. On a repeat hand-off this
        # finishes a launch that failed between the two.
        self.api.create_secret(secret_manifest(launch, uid))
        log.info(
            "task %s: Job %s/%s %s",
            handoff.task_id,
            ns,
            launch.name,
            "created" if created else "exists already (a repeated hand-off starts nothing)",
            extra={"action": "k8s_job_created" if created else "k8s_job_exists"},
        )
        return handle_of(ns, launch.name)


# ----------------------------------------------------------------- watching


@dataclass(frozen=True)
class Outcome:
    """A Job that will not report (again): why, in Kubernetes' words."""

    #: failed | complete | missing
    kind: str
    reason: str
    #: When Kubernetes saw it end (None if it is missing).
    at: datetime | None = None


def job_outcome(job: Any | None) -> Outcome | None:
    """What became of a Job (a ``V1Job``, None if it does not exist); None
    while it may still run and report."""
    if job is None:
        return Outcome("missing", "deleted")
    status = getattr(job, "status", None)
    for cond in getattr(status, "conditions", None) or []:
        if str(cond.status) != "True":
            continue
        kind = {"Failed": "failed", "Complete": "complete"}.get(str(cond.type))
        if kind is None:
            continue
        reason = str(cond.reason or cond.type)
        if cond.message:
            reason += f": {cond.message}"
        return Outcome(kind, reason, cond.last_transition_time)
    return None
