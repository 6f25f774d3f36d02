"""Terraform process supervision, shared by every execution mode.

A :class:`Supervisor` runs one phase's terraform commands and, while each
runs, every tick:

* heartbeats (fenced) at ``heartbeat_interval`` and obeys the reply: go on,
  interrupt (cancel, timeout) or kill (force cancel, or the fence is stale:
  the phase was taken from this executor, which must not touch it again);
* enforces the phase timeout locally too, so a database outage cannot let an
  apply run forever;
* watches the state file during an apply and reports each new serial
  (:class:`~executors.base.StateWritten`), so the state survives this process;
* turns the worker's SIGTERM (``docker stop``) into an interrupt with a
  grace period shorter than Docker's, so terraform saves its state.

Hazards and what guards them:

* **Orphaned terraform.** If the worker process dies (SIGKILL, OOM),
  terraform must not run on unsupervised, applying changes no one records:
  each command is started with a parent-death signal (``PR_SET_PDEATHSIG``,
  SIGKILL), in its own process group so signals reach its provider plugins.
  Terraform up to 1.0 re-executes itself as a child (panicwrap) and the
  child does the work; a parent-death signal reaches only the parent, so
  ``TF_FORK=0`` keeps terraform in the one process the signal is set on.
* **A half-written state file.** Terraform rewrites its local state in
  place; a read mid-write is not valid JSON and is simply retried next tick.
* **An interrupt is not a stop.** SIGINT asks terraform to finish the
  resource in flight and save state; if it has not exited after the grace
  period, it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from executors.base import (
    Directive,
    Handoff,
    Heartbeat,
    LogWritten,
    Reply,
    Reporter,
    StateWritten,
    StopReason,
)

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
#: How often a running command is looked at (exit, state file, signals).
TICK = 0.2
#: The largest piece of output sent in one report.
LOG_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: float
    kill_grace: float
    shutdown_grace: float


class Stopped(Exception):
    """runq stopped the phase before terraform finished it."""

    def __init__(self, reason: StopReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str


class Supervisor:
    """Runs and watches the terraform commands of one phase."""

    def __init__(
        self,
        handoff: Handoff,
        reporter: Reporter,
        timing: Timing,
        *,
        workdir: Path,
        log_path: Path,
        env: dict[str, str],
        state_file: Path | None = None,
    ) -> None:
        self.handoff = handoff
        self.reporter = reporter
        self.timing = timing
        self.workdir = workdir
        self.log_path = log_path
        # Without TF_FORK=0, the apply itself runs in panicwrap's child,
        # which outlives a SIGKILLed worker and applies on, unrecorded.
        self.env = {**env, "TF_FORK": "0"}
        #: Watched during an apply; None for plans (they write no state).
        self.state_file = state_file
        self.started = time.monotonic()
        self._last_beat = self.started
        self._stop: StopReason | None = None
        self._stop_detail = ""
        self._kill_at: float | None = None
        self._shutdown = threading.Event()
        self._state_seen: tuple[int, int] | None = None
        self._state_serial: int | None = None
        #: Bytes of the log already sent to the scheduler.
        self._log_sent = 0

    # -- the worker's SIGTERM -------------------------------------------------

    @contextlib.contextmanager
    def shutdown_as_interrupt(self) -> Iterator[None]:
        """While the phase runs, SIGTERM to this process interrupts terraform
        instead of killing the process (and with it, terraform)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_term(_signum: int, _frame: FrameType | None) -> None:
            self._shutdown.set()

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    @property
    def stale(self) -> bool:
        """The scheduler gave the phase to someone else: report nothing more."""
        return self._stop is StopReason.STALE

    # -- commands -------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`Stopped` if the phase was stopped: run nothing more."""
        if self._stop is not None:
            raise Stopped(self._stop, self._stop_detail)

    def run(self, argv: Sequence[str], *, capture: bool = False) -> Completed:
        """Run one command to its end, supervised; its output goes to the log
        (stdout is returned instead with ``capture``)."""
        self.check()
        with (
            self.log_path.open("a", encoding="utf-8") as logf,
            tempfile.TemporaryFile("w+", encoding="utf-8") as out,
        ):
            logf.write(f"$ {' '.join(argv)}\n")
            logf.flush()
            proc = subprocess.Popen(
                list(argv),
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out if capture else logf,
                stderr=logf if capture else subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509 - prctl only
            )
            try:
                returncode = self._watch(proc)
            finally:
                if proc.poll() is None:  # an exception in a tick: never leave it behind
                    self._signal(proc, signal.SIGKILL)
                    proc.wait()
            logf.write(f"[exit {returncode}]\n")
            out.seek(0)
            stdout = out.read() if capture else ""
        self.watch_state()
        self.ship_log()
        self.check()
        return Completed(returncode, stdout)

    def _watch(self, proc: subprocess.Popen[bytes]) -> int:
        while True:
            try:
                return proc.wait(timeout=TICK)
            except subprocess.TimeoutExpired:
                pass
            self._tick(proc)

    def _tick(self, proc: subprocess.Popen[bytes]) -> None:
        if self.stale:
            return  # killed already; no report of this executor is wanted now
        now = time.monotonic()
        if self._shutdown.is_set() and self._stop is None:
            self._interrupt(
                proc, StopReason.SHUTDOWN, "the worker is shutting down", self.timing.shutdown_grace
            )
        timeout = self.handoff.timeout
        if timeout is not None and now - self.started > timeout and self._stop is None:
            self._interrupt(
                proc,
                StopReason.TIMEOUT,
                f"{self.handoff.phase} timed out after {timeout:g}s",
                self.timing.kill_grace,
            )
        if now - self._last_beat >= self.timing.heartbeat_interval:
            self._last_beat = now
            self.ship_log()
            self._obey(proc, self._beat())
        self.watch_state()
        if self.stale:
            # A state write refused as stale: someone else owns the phase.
            # Stop terraform now, not at the next heartbeat's reply.
            log.warning(
                "task %s: killing terraform: %s",
                self.handoff.task_id,
                self._stop_detail,
                extra={"action": "terraform_killed", "task_id": self.handoff.task_id},
            )
            self._signal(proc, signal.SIGKILL)
            self._kill_at = None
            return
        if self._kill_at is not None and now >= self._kill_at:
            log.warning(
                "task %s: terraform did not stop %.0fs after the interrupt; killing it",
                self.handoff.task_id,
                now - (self._kill_at - self.timing.kill_grace),
                extra={"action": "terraform_killed", "task_id": self.handoff.task_id},
            )
            self._signal(proc, signal.SIGKILL)
            self._kill_at = None

    def _beat(self) -> Reply | None:
        h = self.handoff
        try:
            return self.reporter.report(Heartbeat(h.task_id, h.fence, h.phase))
        except Exception as exc:
            # The database (or broker) is down for a moment: terraform goes
            # on; if this lasts past the lease, the next heartbeat that gets
            # through is refused and stops it.
            log.warning(
                "task %s: heartbeat failed (%s: %s)",
                h.task_id,
                type(exc).__name__,
                exc,
                extra={"action": "heartbeat_failed", "task_id": h.task_id},
            )
            return None

    def _obey(self, proc: subprocess.Popen[bytes], reply: Reply | None) -> None:
        if reply is None or reply.directive is Directive.CONTINUE:
            return
        stop = reply.stop or StopReason.CANCEL
        if reply.directive is Directive.KILL:
            if self._stop is None or stop is StopReason.STALE:
                self._stop, self._stop_detail = stop, reply.reason
            log.warning(
                "task %s: killing terraform: %s",
                self.handoff.task_id,
                reply.reason,
                extra={"action": "terraform_killed", "task_id": self.handoff.task_id},
            )
            self._signal(proc, signal.SIGKILL)
            self._kill_at = None
        elif self._stop is None:
            self._interrupt(proc, stop, reply.reason, self.timing.kill_grace)

    def _interrupt(
        self, proc: subprocess.Popen[bytes], reason: StopReason, detail: str, grace: float
    ) -> None:
        self._stop, self._stop_detail = reason, detail
        self._kill_at = time.monotonic() + grace
        log.info(
            "task %s: interrupting terraform (%s); killing it in %.0fs if it does not stop",
            self.handoff.task_id,
            detail,
            grace,
            extra={"action": "terraform_interrupted", "task_id": self.handoff.task_id},
        )
        self._signal(proc, signal.SIGINT)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    # -- output -----------------------------------------------------------------

    def ship_log(self) -> None:
        """Send the scheduler the output written since the last call, so it
        can be read (and followed) from any host. Best effort: a failure is
        retried at the next call, from the same offset."""
        if self.stale:
            return
        try:
            size = self.log_path.stat().st_size
        except FileNotFoundError:
            return
        h = self.handoff
        while self._log_sent < size:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_sent)
                data = fh.read(min(LOG_CHUNK, size - self._log_sent))
            if not data:
                return
            try:
                reply = self.reporter.report(
                    LogWritten(h.task_id, h.fence, h.phase, self._log_sent, data)
                )
            except Exception as exc:
                log.warning(
                    "task %s: sending output failed (%s: %s); retrying later",
                    h.task_id,
                    type(exc).__name__,
                    exc,
                    extra={"action": "log_send_failed", "task_id": h.task_id},
                )
                return
            if not reply.accepted:
                if reply.directive is Directive.KILL:
                    self._stop, self._stop_detail = StopReason.STALE, reply.reason
                return
            self._log_sent += len(data)

    # -- state ----------------------------------------------------------------

    def watch_state(self) -> None:
        """Report the state file if terraform wrote a new serial since the
        last look."""
        path = self.state_file
        if path is None or self._stop is StopReason.STALE:
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._state_seen:
            return
        content = path.read_bytes()
        try:
            doc = json.loads(content)
            serial, lineage = int(doc["serial"]), str(doc["lineage"])
        except (ValueError, KeyError, TypeError):
            return  # caught mid-write: look again next tick
        self._state_seen = seen
        if serial == self._state_serial:
            return
        h = self.handoff
        reply = self.reporter.report(StateWritten(h.task_id, h.fence, serial, lineage, content))
        if reply.accepted:
            self._state_serial = serial
        elif reply.directive is Directive.KILL:
            self._stop, self._stop_detail = StopReason.STALE, reply.reason

    def seed_state(self, content: bytes | None) -> None:
        """Put the workspace's stored state where terraform will read it."""
        path = self.state_file or self.workdir / "runq.tfstate"
        if content is None:
            path.unlink(missing_ok=True)
            return
        path.write_bytes(content)
        # The serial already stored must not be reported back as new.
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self._state_serial = int(json.loads(content)["serial"])
        st = path.stat()
        self._state_seen = (st.st_mtime_ns, st.st_size)
