#!/usr/bin/env bash
# Gather what scripts/gpu_check.sh needs on a GPU machine without network, into .gpu/ (git-ignored):
#   .gpu/wheels/   what align needs beside torch: every requirement of it (gpu_check.py closure), less torch's and
#                  numpy/pandas/pyarrow/matplotlib, which a CUDA image carries (bitsandbytes trimmed to its CUDA
#                  12.8 and 13.0 builds: --cuda), for that machine's Python (--python-version, default 3.12)
#   .gpu/trl112/   TRL 1.12, the last TRL with PPOTrainer, for benchmarks/ppo.py's comparison
#   .gpu/model/    the embedded model's config, tokenizer and chat template (3.5 MB; not its 538 MB of weights:
#                  gpu_check.sh builds random weights of the same architecture there)
# Run here, where a package registry and the converted embedded model are reachable:
#   scripts/gpu_prep.sh                       # then carry .gpu with the working tree (~56 MiB)
#   scripts/gpu_prep.sh --python-version 3.11 --cuda 126,128     # the CUDA versions of that machine's torch
# Versions are the ones this checkout's .venv runs (pyproject.toml's tested pins), so both machines run the same code.
# Everything is gathered in .gpu/.prep first and replaces .gpu/'s folders only once all of it is there: a run that
# fails (no registry: on the GPU machine by mistake) leaves the .gpu that was carried as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=3.12
# The bitsandbytes builds to keep (libbitsandbytes_cuda<N>.so), for the CUDA of that machine's torch: the README's
# GPU install (cu128) and the lent H200's torch 2.11 cu130. bitsandbytes loads the build of torch's CUDA version
# (or an older one of the same major); without one it runs no 4-bit layer (gpu_check.py env says so).
cuda=128,130
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
new=$out/.prep  # built here; swapped in for .gpu's folders only at the end
rm -rf "$new"
trap 'rm -rf "$new"' EXIT
mkdir -p "$new/wheels" "$new/trl112" "$new/model"

# The versions this checkout runs: the same code on both machines. Every requirement of them too, less torch's and
# the large packages a CUDA image carries (gpu_check.py closure): transformers 5.25 would not import with an image's
# huggingface_hub 1.x, which it requires >= 2.4.
mapfile -t pins < <("$PY" scripts/gpu_check.py closure)
[ ${#pins[@]} -gt 10 ] || { echo "gpu_prep: gpu_check.py closure listed ${#pins[@]} packages" >&2; exit 1; }
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
download "$new/wheels" "${pins[@]}"
download "$new/trl112" trl==1.12.0

# bitsandbytes' wheel carries a library per CUDA/ROCm/XPU build (43 MB); keep the ones the machine may load.
bnb=$(ls "$new"/wheels/bitsandbytes-*.whl)
keep=(bitsandbytes/libbitsandbytes_cpu.so)
for c in ${cuda//,/ }; do keep+=("bitsandbytes/libbitsandbytes_cuda${c}.so"); done
patterns=()
for lib in $(unzip -Z1 "$bnb" | grep -E '^bitsandbytes/libbitsandbytes_.*\.so$'); do
  [[ " ${keep[*]} " == *" $lib "* ]] || patterns+=("$lib")
done
"$PY" scripts/gpu_check.py trim-wheel "$bnb" "${patterns[@]}"
members=$(unzip -Z1 "$bnb")  # read whole: `unzip | grep -q` fails under pipefail when grep stops reading first
for c in ${cuda//,/ }; do
  grep -qx "bitsandbytes/libbitsandbytes_cuda${c}.so" <<< "$members" \
    || { echo "gpu_prep: $bnb has no libbitsandbytes_cuda${c}.so (see --cuda)" >&2; exit 1; }
done

# The embedded model's files without its weights (converting it first if this machine has not yet).
model=$("$PY" -c "import sys; sys.path.insert(0, '.'); from align.embedded import embedded_model_dir; print(embedded_model_dir())")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -f "$model/$f" ] && cp "$model/$f" "$new/model/"
done
[ -f "$new/model/config.json" ] && [ -f "$new/model/tokenizer.json" ] \
  || { echo "gpu_prep: no config/tokenizer in $model" >&2; exit 1; }

size=$(du -sm "$new" | cut -f1)
{
  echo "made by scripts/gpu_prep.sh on $(date -u +%Y-%m-%dT%H:%MZ) for Python $py_version, CUDA $cuda"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  (cd "$new" && ls -1 wheels trl112 model)
  echo "total ${size} MiB"
} > "$new/PREP.txt"
cat "$new/PREP.txt"
# The device tool carries at most 64 MiB with the working tree; leave room for the tree itself (its tracked files,
# 3 MiB today) and 2 MiB to spare.
tree_bytes=$( (git ls-files -z 2>/dev/null || true) | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' \
             || true)  # a tracked file gone from the tree: counted as 0, not a silent exit
tree=$(( (${tree_bytes:-0} + 1048575) / 1048576 ))
budget=$(( 62 - tree ))
if [ "$size" -gt "$budget" ]; then
  echo "gpu_prep: this .gpu would be ${size} MiB, more than the ${budget} MiB left beside the working tree's" \
       "${tree} MiB (the device tool carries 64 MiB in all): .gpu left as it was" >&2
  exit 1
fi
for part in wheels trl112 model PREP.txt; do
  rm -rf "${out:?}/$part"
  mv "$new/$part" "$out/$part"
done
