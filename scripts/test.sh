#!/usr/bin/env bash
# Run the test suite: starts a throwaway PostgreSQL on loopback when Debian's postgresql is
# installed (so the store is tested on it as well as on SQLite), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
if [ -z "${ALIGN_TEST_PG_URL:-}" ] && [ -x scripts/ci_postgres.sh ] && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  ALIGN_TEST_PG_URL=$(scripts/ci_postgres.sh start) && export ALIGN_TEST_PG_URL
  trap 'scripts/ci_postgres.sh stop >/dev/null 2>&1 || true' EXIT
fi
# Two workers (pytest-xdist), each test module on one of them so its fixtures are built once: on 2 cores the
# suite took 6 min 15 s against 10 min 11 s in one process (the browser, PostgreSQL and subprocess tests wait
# more than they compute). ALIGN_TEST_WORKERS=0 (or -n 0 among the arguments) runs it in one process.
python -m pytest -n "${ALIGN_TEST_WORKERS:-2}" --dist loadscope "$@"
