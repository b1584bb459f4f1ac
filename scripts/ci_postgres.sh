#!/usr/bin/env bash
# A throwaway PostgreSQL on loopback for the store tests (Debian's postgresql package).
#   scripts/ci_postgres.sh start        initdb + start on a free port; prints the URL only
#   scripts/ci_postgres.sh stop [URL]   stop that one (default: $ALIGN_TEST_PG_URL, else the only
#                                       one running) and remove its files
# As root (CI), the server runs as the `postgres` user, which initdb requires; as anyone else, as
# that user. Several may run at once (one per test run): each is recorded in a file under
# /tmp/align-ci-postgres-<uid>/ named by its port, and `start` never stops another run's server.
set -euo pipefail
state=/tmp/align-ci-postgres-$(id -u)
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "$0: no PostgreSQL under /usr/lib/postgresql (apt-get install postgresql)" >&2; exit 2; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
user=$([ "$(id -u)" = 0 ] && echo postgres || id -un)

stop_port() {
  local dir
  dir=$(cat "$state/$1")
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir" "$state/$1"
}

case "${1:-}" in
  start)
    mkdir -p "$state"
    dir=$(mktemp -d /tmp/align-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_pg "$bin/initdb" -D "$dir/data" -U "$user" --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; exit 1; }
    for _try in 1 2 3; do  # a free port can be taken between the check and the bind: try another
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
      if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
           -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null; then
        echo "$dir" >"$state/$port"
        as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$user" align_test
        echo "postgresql://$user@127.0.0.1:$port/align_test"
        exit 0
      fi
    done
    cat "$dir/server.log" >&2
    rm -rf "$dir"
    exit 1
    ;;
  stop)
    [ -d "$state" ] || exit 0
    url=${2:-${ALIGN_TEST_PG_URL:-}}
    if [ -n "$url" ]; then
      port=$(echo "$url" | sed -nE 's#.*@[^:/]+:([0-9]+)/.*#\1#p')
      [ -n "$port" ] && [ -f "$state/$port" ] && stop_port "$port"
      exit 0
    fi
    running=$(ls "$state")
    [ -z "$running" ] && exit 0
    if [ "$(echo "$running" | wc -l)" -gt 1 ]; then
      echo "$0: several are running (ports: $(echo $running)); say which: $0 stop URL" >&2
      exit 1
    fi
    stop_port "$running"
    ;;
  *)
    echo "usage: $0 start | stop [URL]" >&2
    exit 2
    ;;
esac
