"""Child processes in sessions of their own: start, wait, stop, look inside.

A :class:`Proc` is one named child with its output in a log file. It runs in
a session (and so a process group) of its own, which buys two things: a
Ctrl-C at the terminal reaches the parent only, which then stops its children
in order; and a SIGKILL of the group takes everything under the child (a
celery worker's pool processes) without touching anyone else's.

:func:`stop` is the one way children end: SIGTERM (a celery worker's warm
shutdown), then, after a timeout, SIGKILL of each whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.errors import SchedulerError

#: Seconds :func:`stop` waits for a SIGTERM to work before the SIGKILL.
STOP_SECONDS = 15.0


class SupervisionError(SchedulerError):
    """A child process did not start or did not become ready."""


def tail(path: Path, lines: int = 150) -> str:
    """The last ``lines`` lines of ``path``; ``(no log)`` if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Proc:
    """One child process, named, its output (stdout and stderr) in ``log``."""

    name: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started)."""
        return None if self.proc is None else self.proc.poll()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        append: bool = False,
    ) -> None:
        """Start ``argv``, in a session of its own (see the module docstring).

        The log is truncated unless ``append``; the child keeps its own copy
        of the file descriptor, so nothing stays open here.
        """
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab" if append else "wb") as out:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # A session (and process group) of its own: a Ctrl-C at the
                # terminal reaches the parent only, which then stops its
                # children in order; a SIGKILL of the group takes the child's
                # own children (a worker's pool) and no one else's.
                start_new_session=True,
            )

    def logged(self, text: str) -> bool:
        """Whether the log holds ``text`` yet."""
        try:
            return text in self.log.read_text(errors="replace")
        except OSError:
            return False

    def tail(self, lines: int = 150) -> str:
        return tail(self.log, lines)

    def exit_report(self, when: str = "", lines: int = 150, indent: str = "") -> str:
        """``NAME exited with status N{when}; its log (PATH) ends:`` and the
        log's last ``lines``, each prefixed with ``indent``."""
        return (
            f"{self.name} exited with status {self.returncode}{when}; "
            f"its log ({self.log}) ends:\n{textwrap.indent(self.tail(lines), indent)}"
        )

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL of its whole process group, no shutdown work; then reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout)


def stop(procs: Iterable[Proc], timeout: float = STOP_SECONDS) -> None:
    """SIGTERM to each of ``procs``; after ``timeout`` seconds (for them all),
    SIGKILL of each one's process group. Returns once each is reaped."""
    started = [p for p in procs if p.proc is not None]
    for p in started:
        assert p.proc is not None
        if p.proc.poll() is None:
            # A paused process would not act on the SIGTERM until continued.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.proc.pid, signal.SIGCONT)
            p.proc.send_signal(signal.SIGTERM)  # a celery worker's warm shutdown
    deadline = time.monotonic() + timeout
    for p in started:
        assert p.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        # Also what a killed worker may have left behind: its pool children
        # share its group (terraform, in a session of its own, dies with its
        # parent: runq's executor sees to that).
        p.kill()


class Exited(SupervisionError):
    """A child process exited before it was ready."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        super().__init__(proc.exit_report())


class NotReady(SupervisionError):
    """Child processes still not ready at the deadline."""

    def __init__(self, names: Sequence[str], timeout: float) -> None:
        self.names = list(names)
        self.timeout = timeout
        super().__init__(f"{', '.join(self.names)} not ready after {timeout:g}s")


def wait_ready(
    procs: Sequence[Proc],
    up: Callable[[], Collection[str]],
    timeout: float,
    poll: float = 0.1,
) -> None:
    """Until the name of every one of ``procs`` is in ``up()``.

    Raises :class:`Exited` as soon as one of them has exited, and
    :class:`NotReady` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if p.exited():
                raise Exited(p)
        ready = up()
        missing = [p.name for p in procs if p.name not in ready]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise NotReady(missing, timeout)
        time.sleep(poll)


def inherit(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` on top."""
    return {**os.environ, **extra}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (someone else may
    take it before the caller binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- /proc


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (from /proc), or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return None


def children(pid: int) -> list[int]:
    """The live children of ``pid``, forked by any of its threads."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first, depth first).

    A process may fork while this walks; callers that must catch everything
    (a SIGSTOP of a whole tree) walk again until nothing new turns up.
    """
    found: list[int] = []
    for child in children(pid):
        found.append(child)
        found.extend(descendants(child))
    return found
