"""How fast runq's common commands start (issue 8).

Makes a throwaway SQLite database under a temporary directory, with one
workspace, a plan waiting in its queue and two plan+apply tasks, then runs
each command once per round, round after round, so that a change in the
machine's load hits every command alike. Two baselines run in the same
rounds: ``python -c pass`` and ``python -c "import sqlalchemy"``. Prints the
median wall and CPU (user + system) time of each, and with ``--importtime``
the packages each command spends its imports in (``python -X importtime``).

    .venv/bin/python -m bench.cli_startup  # from the checkout [--rounds 21] [--importtime]
        [--redis redis://127.0.0.1:6379/14]

The commands run with bytecode caches, as an installed runq has them (a
``PYTHONDONTWRITEBYTECODE`` in the environment would make every run compile
runq's own modules again). ``runq submit`` publishes a claim to the Redis
database given (a private one: a worker on it would take the claims); runq's
queues and their kombu bindings there are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis

from scheduler.messages import ALL_QUEUES

PYTHON = sys.executable
RUNQ = str(Path(sys.executable).parent / "runq")


def commands(plan: int, queued: int) -> dict[str, list[str]]:
    return {
        "python -c pass": [PYTHON, "-c", "pass"],
        "python -c 'import sqlalchemy'": [PYTHON, "-c", "import sqlalchemy"],
        "runq --help": [RUNQ, "--help"],
        "runq show (plan in a queue)": [RUNQ, "show", str(plan)],
        "runq show (queued plan+apply)": [RUNQ, "show", str(queued)],
        "runq list": [RUNQ, "list"],
        "runq submit --type plan": [RUNQ, "submit", "net", "--type", "plan"],
    }


def child_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``argv`` (CPU from the children's
    accumulated times, which include only finished children)."""
    before = child_cpu()
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return wall, child_cpu() - before


def importtime(argv: list[str], env: dict[str, str], top: int = 8) -> str:
    """The top-level packages ``argv``'s imports spend most time in (self
    time summed per package, as ``python -X importtime`` reports it)."""
    if argv[0] == RUNQ:  # the console script's own entry point, under -X importtime
        argv = [PYTHON, "-c", "import sys; from scheduler.cli import main; main()", *argv[1:]]
    proc = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    spent: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            package = m[2].split(".")[0]
            spent[package] = spent.get(package, 0) + int(m[1])
    total = sum(spent.values())
    ranked = sorted(spent.items(), key=lambda kv: -kv[1])[:top]
    return f"imports {total / 1000:.0f} ms: " + ", ".join(
        f"{name} {us / 1000:.0f}" for name, us in ranked
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout of runq (e.g. a git worktree of an older commit): "
        "its commands run in the same rounds, for a before/after on one machine",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="runq-cli-startup-") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        (root / "src" / "main.tf").write_text("")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RUNQ_") and k != "PYTHONDONTWRITEBYTECODE"
        }
        env.update(
            RUNQ_DATABASE_URL=f"sqlite:///{root / 'runq.db'}",
            RUNQ_REDIS_URL=args.redis,
            RUNQ_DATA_DIR=str(root / "data"),
            PYTHONPYCACHEPREFIX=str(root / "pycache"),
        )
        setup = [
            ["db", "upgrade"],
            ["workspace", "create", "net", "--dir", str(root / "src")],
            ["submit", "net", "--type", "plan"],  # task 1: waits in runq.plans
            ["submit", "net", "--type", "plan_and_apply"],
            ["submit", "net", "--type", "plan_and_apply"],  # task 3: second in line
        ]
        for argv in setup:
            timed([RUNQ, *argv], env)
        cmds = commands(plan=1, queued=3)
        runs: dict[str, tuple[list[str], dict[str, str]]] = {n: (a, env) for n, a in cmds.items()}
        if args.against is not None:
            # PYTHONPATH comes before the venv's editable install of this
            # checkout, so the same console script runs the other code.
            other = {**env, "PYTHONPATH": str(args.against.resolve())}
            for name, argv in cmds.items():
                if argv[0] == RUNQ:
                    runs[f"{name} [{args.against.name}]"] = (argv, other)
        wall: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        try:
            for n in range(args.rounds + 1):
                for name, (argv, run_env) in runs.items():
                    w, c = timed(argv, run_env)
                    if n:  # round 0 fills the bytecode caches
                        wall[name].append(w)
                        cpu[name].append(c)
            load = os.getloadavg()[0]
            print(f"median of {args.rounds} rounds, {os.cpu_count()} CPUs, load {load:.1f}")
            for name, (argv, run_env) in runs.items():
                line = (
                    f"  {name:<44} wall {statistics.median(wall[name]) * 1000:5.0f} ms"
                    f"   cpu {statistics.median(cpu[name]) * 1000:5.0f} ms"
                )
                if args.importtime and argv[0] == RUNQ:
                    line += f"\n      {importtime(argv, run_env)}"
                print(line)
        finally:
            client = Redis.from_url(args.redis)
            # The queues, and the bindings kombu keeps beside them.
            client.delete(
                *ALL_QUEUES,
                *(f"_kombu.binding.{q}" for q in ALL_QUEUES),
                *(f"_kombu.binding_permanent.{q}" for q in ALL_QUEUES),
            )
            client.close()


if __name__ == "__main__":
    main()
