#!/usr/bin/env bash
# Gather what scripts/gpu_check.sh needs on a GPU machine without network, into .gpu/ (git-ignored):
#   .gpu/wheels/   the packages align needs that a bare CUDA+torch image lacks (bitsandbytes trimmed to its
#                  CUDA 13.0 build), for that machine's Python (--python-version, default 3.12)
#   .gpu/trl112/   TRL 1.12, the last TRL with PPOTrainer, for benchmarks/ppo.py's comparison
#   .gpu/model/    the embedded model's config, tokenizer and chat template (3.5 MB; not its 538 MB of weights:
#                  gpu_check.sh builds random weights of the same architecture there)
# Run here, where a package registry and the converted embedded model are reachable:
#   scripts/gpu_prep.sh                       # then carry .gpu with the working tree (~30 MiB)
#   scripts/gpu_prep.sh --python-version 3.11 --cuda 128
# Versions are the ones this checkout's .venv runs (pyproject.toml's tested pins), so both machines run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=3.12
cuda=130        # the bitsandbytes build to keep: libbitsandbytes_cuda<cuda>.so (torch 2.11 cu130 on the lent H200)
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) py_version=$2; shift 2 ;;
    --cuda) cuda=$2; shift 2 ;;
    *) echo "gpu_prep: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
out=.gpu
rm -rf "$out/wheels" "$out/trl112" "$out/model"
mkdir -p "$out/wheels" "$out/trl112" "$out/model"

# The versions this checkout runs: the same code on both machines.
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pins=()
for name in trl transformers peft datasets bitsandbytes dill multiprocess sqlalchemy vaderSentiment; do
  pins+=("$name==$(version "$name")")
done
pins+=("liger-kernel==${LIGER_VERSION:-0.8.5}")   # not in the CPU venv: the gpu extra's, pinned here
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
    "${platforms[@]}" -d "$@"
}
echo "gpu_prep: downloading ${pins[*]} for Python $py_version"
download "$out/wheels" "${pins[@]}"
download "$out/trl112" trl==1.12.0

# bitsandbytes' wheel carries a library per CUDA/ROCm/XPU build (43 MB); keep the one the machine loads.
bnb=$(ls "$out"/wheels/bitsandbytes-*.whl)
patterns=()
for lib in $(unzip -Z1 "$bnb" | grep -E '^bitsandbytes/libbitsandbytes_.*\.so$'); do
  [ "$lib" = "bitsandbytes/libbitsandbytes_cuda${cuda}.so" ] || [ "$lib" = "bitsandbytes/libbitsandbytes_cpu.so" ] \
    || patterns+=("$lib")
done
"$PY" scripts/gpu_check.py trim-wheel "$bnb" "${patterns[@]}"
unzip -Z1 "$bnb" | grep -q "libbitsandbytes_cuda${cuda}.so" \
  || { echo "gpu_prep: $bnb has no libbitsandbytes_cuda${cuda}.so (see --cuda)" >&2; exit 1; }

# The embedded model's files without its weights (converting it first if this machine has not yet).
model=$("$PY" -c "import sys; sys.path.insert(0, '.'); from alignment.embedded import embedded_model_dir; print(embedded_model_dir())")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -f "$model/$f" ] && cp "$model/$f" "$out/model/"
done
[ -f "$out/model/config.json" ] && [ -f "$out/model/tokenizer.json" ] \
  || { echo "gpu_prep: no config/tokenizer in $model" >&2; exit 1; }

size=$(du -sm "$out" | cut -f1)
{
  echo "made by scripts/gpu_prep.sh on $(date -u +%Y-%m-%dT%H:%MZ) for Python $py_version, CUDA $cuda"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  (cd "$out" && ls -1 wheels trl112 model)
  echo "total ${size} MiB"
} > "$out/PREP.txt"
cat "$out/PREP.txt"
# The device tool carries at most 64 MiB with the working tree; leave room for the tree itself.
if [ "$size" -gt 48 ]; then
  echo "gpu_prep: .gpu is ${size} MiB, more than the 48 MiB budgeted for it" >&2
  exit 1
fi
