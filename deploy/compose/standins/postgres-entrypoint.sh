#!/bin/sh
# The part of the official postgres image's docker-entrypoint.sh that compose.yaml relies on,
# for CI's stand-in (postgres.Containerfile): on an empty $PGDATA, initdb with
# POSTGRES_USER as the superuser and POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE), password
# (scram-sha-256) authentication on TCP, POSTGRES_DB created; then each *.sql and *.sh of
# /docker-entrypoint-initdb.d in order, on a server that listens on no TCP port (so a TCP
# health check passes only after them); then postgres itself, on every address.
set -eu
if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
[ $# -eq 0 ] || shift
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
fi
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres-entrypoint: POSTGRES_PASSWORD is not set" >&2
    exit 1
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$user" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -w -s -o "-c listen_addresses=''" start
    if [ "$db" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -q --username "$user" --dbname postgres \
            -c "CREATE DATABASE \"$db\""
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
        *.sql)
            echo "postgres-entrypoint: running $f"
            psql -v ON_ERROR_STOP=1 -q --username "$user" --dbname "$db" -f "$f"
            ;;
        *.sh)
            echo "postgres-entrypoint: running $f"
            # shellcheck disable=SC1090  # the init scripts, as the official image sources them
            . "$f"
            ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w -s stop
    echo "postgres-entrypoint: initialised; starting"
fi
exec postgres -c listen_addresses='*' "$@"
