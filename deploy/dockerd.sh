#!/usr/bin/env bash
# A private Docker engine for the compose test, kept on loopback:
#   deploy/dockerd.sh start   start it (if not running); prints the DOCKER_HOST to use
#   deploy/dockerd.sh stop    stop it by its pid
#   deploy/dockerd.sh status  exit 0 if it runs
#   deploy/dockerd.sh env     print the DOCKER_HOST line
#
# No iptables rules and no docker0 bridge: every test container uses host
# networking (docker-compose.test.yml), so nothing on the machine's network
# changes and all traffic stays on 127.0.0.1. The data root persists under
# RUNQ_DOCKER_ROOT (default /var/tmp/runq-docker) so built images are reused
# by the next run on this machine. Needs root.
set -euo pipefail

ROOT=${RUNQ_DOCKER_ROOT:-/var/tmp/runq-docker}
RUN=${RUNQ_DOCKER_RUN:-/run/runq-docker}
SOCK=$RUN/docker.sock
PIDFILE=$RUN/dockerd.pid
LOG=$ROOT/dockerd.log

# By its pid file, and only if that pid is still a dockerd (not a reused pid).
running() {
  [[ -f $PIDFILE ]] && [[ $(cat "/proc/$(cat "$PIDFILE")/comm" 2>/dev/null) == dockerd ]]
}

case ${1:-} in
  start)
    if ! running; then
      if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null; then
        echo "dockerd.sh: installing docker.io and docker-compose (Debian)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose >/dev/null
      fi
      mkdir -p "$ROOT/data" "$RUN/exec"
      # containerd is started by dockerd itself (under its exec root) when no
      # system containerd socket is given.
      dockerd \
        --data-root "$ROOT/data" \
        --exec-root "$RUN/exec" \
        --pidfile "$PIDFILE" \
        -H "unix://$SOCK" \
        --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --bridge=none \
        --userland-proxy=false \
        >>"$LOG" 2>&1 &
      for _ in $(seq 1 120); do
        if DOCKER_HOST=unix://$SOCK docker version >/dev/null 2>&1; then break; fi
        sleep 0.5
      done
      DOCKER_HOST=unix://$SOCK docker version >/dev/null || { tail -20 "$LOG" >&2; exit 1; }
    fi
    echo "DOCKER_HOST=unix://$SOCK"
    ;;
  stop)
    if running; then
      pid=$(cat "$PIDFILE")
      kill -TERM "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    fi
    ;;
  status)
    running
    ;;
  env)
    echo "DOCKER_HOST=unix://$SOCK"
    ;;
  *)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
