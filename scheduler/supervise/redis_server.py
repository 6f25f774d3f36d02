"""A private ``redis-server``: for the demo, the tests and the benchmark."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from scheduler.supervise.processes import Proc, SupervisionError, free_port, stop

#: Times :meth:`RedisServer.start` tries a fresh free port.
PORT_ATTEMPTS = 3


def find_redis_server() -> str:
    """The ``redis-server`` executable on PATH."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SupervisionError(
            "redis-server not found on PATH: install Redis (e.g. `apt-get install redis-server`)"
        )
    return exe


class RedisServer:
    """A private redis-server on 127.0.0.1, which its owner may stop, kill,
    restart or break; its log is ``workdir/redis.log``.

    No persistence (``--save "" --appendonly no``): a restart loses every
    queue, lock and unacknowledged message, as a crash of a cache-only Redis
    would.
    """

    def __init__(self, workdir: Path, exe: str | None = None) -> None:
        self.workdir = workdir
        self.exe = exe
        self.port = free_port()
        self.process: Proc | None = None
        #: Once it has answered on ``port``, clients know that port: a later
        #: start must come back on it.
        self._pinned = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers a PING."""
        exe = self.exe or find_redis_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The free port may be taken before redis binds it: then try another,
        # unless clients already know this one.
        for attempt in range(1 if self._pinned else PORT_ATTEMPTS):
            if attempt:
                self.port = free_port()
            argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(self.workdir)]
            self.process = Proc("redis", self.log)
            self.process.start(argv, append=True)
            if self._answers(timeout):
                self._pinned = True
                return
            self.stop()
        raise SupervisionError(f"private redis-server did not start; see {self.log}")

    def _answers(self, timeout: float) -> bool:
        from redis import Redis

        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.process.exited():
            client = Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
            try:
                if client.ping():
                    return True
            except Exception:
                time.sleep(0.05)
            finally:
                client.close()
        return False

    def kill(self) -> None:
        """SIGKILL: no shutdown work, nothing saved."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def restart(self) -> None:
        """Kill it and start an empty one on the same port."""
        self.kill()
        self.start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process is not None:
            stop([self.process], timeout)
            self.process = None
