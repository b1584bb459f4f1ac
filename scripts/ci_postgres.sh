#!/usr/bin/env bash
# A throwaway PostgreSQL on loopback for the store tests (Debian's postgresql package).
#   scripts/ci_postgres.sh start    initdb + start on a free port; prints the URL only
#   scripts/ci_postgres.sh stop     stop it and remove its files
# As root (CI), the server runs as the `postgres` user, which initdb requires.
set -euo pipefail
state=/tmp/align-ci-postgres.state
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-}" in
  start)
    [ -f "$state" ] && "$0" stop >/dev/null 2>&1 || true
    dir=$(mktemp -d /tmp/align-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    user=$([ "$(id -u)" = 0 ] && echo postgres || id -un)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$bin/initdb" -D "$dir/data" -U "$user" --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$user" align_test
    echo "$dir" >"$state"
    echo "postgresql://$user@127.0.0.1:$port/align_test"
    ;;
  stop)
    [ -f "$state" ] || exit 0
    dir=$(cat "$state")
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir" "$state"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
