"""An in-memory Kubernetes API server, and a test playing its Job controller.

No Kubernetes cluster runs on this machine. :class:`Emulator` serves kmock's
``KubernetesEmulator`` over real HTTP on 127.0.0.1, on an event loop in a
thread of its own, so runq's sync client (the official ``kubernetes``
package) talks to it from the test's thread exactly as it would to an API
server. The emulator stores what it is sent and serves it back; it ignores
label selectors, leaves ``uid`` and ``resourceVersion`` empty, and runs no
controllers. So :func:`run_job` plays the Job controller and the kubelet:

1. read the Job runq created, and the Secret it mounts;
2. write the Secret's data into a directory (the volume mount);
3. run the container's command as a local process, with the mount path in
   its args pointing at that directory and the container's env on top of
   the test's;
4. while it runs, watch the Job: if it is deleted (a cancel), SIGTERM the
   process and SIGKILL it after the pod's termination grace, as the kubelet
   would;
5. patch the Job's status: ``Complete``, or ``Failed`` with
   ``BackoffLimitExceeded`` (``backoffLimit`` is 0), as the real controller
   would (not for a deleted Job).

What that leaves out (images, scheduling, real mounts, users and file
modes, RBAC, garbage collection by owner, TTL, deadlines) the README lists.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
from kubernetes import client

from executors.k8s import BUNDLE_DIR, CONTAINER, JobApi


@dataclass
class Emulator:
    url: str
    handler: kmock.KubernetesEmulator
    loop: asyncio.AbstractEventLoop

    def api(self) -> JobApi:
        """A fresh client (and connection pool) for this server."""
        cfg = client.Configuration()
        cfg.host = self.url
        return JobApi(client.ApiClient(cfg))

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file for this server, as ``RUNQ_K8S_KUBECONFIG`` names."""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: emu, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: runq, user: {token: test}}]\n"
            "contexts: [{name: emu, context: {cluster: emu, user: runq}}]\n"
            "current-context: emu\n"
        )
        return path

    def requests(self, method: str) -> list[tuple[str, Any]]:
        """``(path, body)`` of the requests served so far with ``method``.

        Read on the server's own loop: the handler is not thread-safe.
        """

        async def read() -> list[tuple[str, Any]]:
            return [
                (r.url.path, r.data)
                for r in list(self.handler)
                if str(r.method).upper().endswith(method.upper())
            ]

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(10)


@contextmanager
def emulator() -> Iterator[Emulator]:
    """A ``KubernetesEmulator`` on a random port, for the ``with`` block."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    got: dict[str, Any] = {}

    async def serve() -> None:
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            got["stop"] = asyncio.Event()
            got["emulator"] = Emulator(str(server.url).rstrip("/"), handler, loop)
            ready.set()
            await got["stop"].wait()

    def main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # surfaced to the test below
            got["error"] = exc
            ready.set()

    thread = threading.Thread(target=main, name="k8s-emulator", daemon=True)
    thread.start()
    if not ready.wait(30) or "error" in got:
        raise RuntimeError(f"the Kubernetes emulator did not start: {got.get('error')!r}")
    try:
        yield got["emulator"]
    finally:
        loop.call_soon_threadsafe(got["stop"].set)
        thread.join(10)
        loop.close()


# ---------------------------------------------------------------- the controller


def job_dict(api: JobApi, namespace: str, name: str) -> dict[str, Any]:
    """The Job as its JSON (the manifest runq sent, plus any status)."""
    job = api.read_job(namespace, name)
    assert job is not None, f"no Job {namespace}/{name}"
    return dict(api.api_client.sanitize_for_serialization(job))


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["name"] == CONTAINER
    return dict(container)


def mount_secret(api: JobApi, job: dict[str, Any], into: Path) -> Path:
    """Write the Secret the Job mounts at ``BUNDLE_DIR`` into ``into``."""
    pod = job["spec"]["template"]["spec"]
    (mount,) = container_of(job)["volumeMounts"]
    assert mount["mountPath"] == BUNDLE_DIR and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = api.core.read_namespaced_secret(
        volume["secret"]["secretName"], job["metadata"]["namespace"]
    )
    into.mkdir(parents=True, exist_ok=True)
    for key, value in (secret.data or {}).items():
        (into / key).write_bytes(base64.b64decode(value))
    return into


def set_condition(
    api: JobApi, namespace: str, name: str, kind: str, reason: str, message: str = ""
) -> None:
    """Patch the Job's status as the Job controller would: ``kind`` is
    ``Complete`` or ``Failed``."""
    counts = {"succeeded": 1} if kind == "Complete" else {"failed": 1}
    api.batch.patch_namespaced_job_status(
        name,
        namespace,
        {
            "status": {
                **counts,
                "conditions": [
                    {"type": kind, "status": "True", "reason": reason, "message": message}
                ],
            }
        },
    )


@dataclass(frozen=True)
class JobRun:
    job: dict[str, Any]
    bundle_dir: Path
    returncode: int
    output: str
    #: The Job was deleted while its container ran (it got SIGTERM).
    deleted: bool = False


def run_job(
    api: JobApi,
    namespace: str,
    name: str,
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    timeout: float = 120,
) -> JobRun:
    """Run Job ``namespace/name`` like its controller (see the module doc).

    ``command`` replaces the container's (before ``runq run-phase`` exists);
    either way ``BUNDLE_DIR`` in it is the local mount. ``env`` is the host's
    part of the environment (PATH, the broker a test runs); the container's
    own env is laid over it.
    """
    job = job_dict(api, namespace, name)
    container = container_of(job)
    mount = mount_secret(api, job, workdir / "bundle")
    argv = [
        str(mount) if arg == BUNDLE_DIR else arg
        for arg in (command or [*container["command"], *container.get("args", [])])
    ]
    full_env = {**(env if env is not None else os.environ)}
    full_env.update({e["name"]: e["value"] for e in container.get("env", [])})
    full_env["RUNQ_DATA_DIR"] = str(workdir / "data")
    grace = float(job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))
    log = workdir / "output.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, env=full_env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, text=True
        )
        deleted = _supervise(api, namespace, name, proc, grace, timeout)
    if deleted:
        pass  # nothing left to update, as for the real controller
    elif proc.returncode == 0:
        set_condition(api, namespace, name, "Complete", "Completed")
    else:
        set_condition(
            api,
            namespace,
            name,
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        )
    return JobRun(job, mount, proc.returncode, log.read_text(), deleted)


def _supervise(
    api: JobApi,
    namespace: str,
    name: str,
    proc: subprocess.Popen[str],
    grace: float,
    timeout: float,
) -> bool:
    """Wait for the container; as the kubelet does when its Job is deleted
    (background propagation), SIGTERM it, then SIGKILL after its grace.
    Whether the Job was deleted."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"Job {name}'s container ran over {timeout}s")
        if api.read_job(namespace, name) is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return True
        time.sleep(0.2)
    return api.read_job(namespace, name) is None
