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
python -m pytest "$@"
