#!/bin/sh
# First start: initdb (UTF8: an SQL_ASCII cluster breaks `runq db upgrade`),
# with POSTGRES_USER as the superuser and POSTGRES_DB created, on a
# temporary server that listens on the Unix socket only. A health check
# against 127.0.0.1 therefore cannot pass before the real server is up.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
  echo "postgres-entrypoint: POSTGRES_PASSWORD is required" >&2
  exit 1
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -E UTF8 --locale=C.UTF-8 -U "$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  {
    echo "host all all 0.0.0.0/0 scram-sha-256"
    echo "host all all ::/0 scram-sha-256"
  } >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -p $PGPORT" start >/dev/null
  if [ "$POSTGRES_DB" != postgres ]; then
    createdb -p "$PGPORT" -U "$POSTGRES_USER" "$POSTGRES_DB"
  fi
  pg_ctl -D "$PGDATA" -w -m fast stop >/dev/null
fi

if [ "${1:-}" = postgres ]; then
  shift
  exec postgres -D "$PGDATA" -p "$PGPORT" -c listen_addresses="${POSTGRES_LISTEN:-*}" "$@"
fi
exec "$@"
