#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and print its path on the last line.
#
# The venv lives outside the clone, in $HAMU_CACHE_DIR (default ~/.cache/hamu-ray), keyed by a hash
# of the dependency files, so CI and fresh clones reuse it and a changed spec rebuilds it.
# Install order matters (docs/design.md §9): torch first, pinned (CPU build when there is no GPU, otherwise
# a dependency's unpinned torch pulls a multi-GB CUDA build); then everything else in one resolve with
# torch pinned again; then DeepSpeed without build isolation, its CPU comm op pre-built.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${HAMU_CACHE_DIR:-$HOME/.cache/hamu-ray}
python=${HAMU_PYTHON:-python3.11}
torch_version=2.13.0

spec_files=("$repo/requirements/base.txt" "$repo/scripts/setup_env.sh")
[ -f "$repo/requirements/lock.txt" ] && spec_files+=("$repo/requirements/lock.txt")
key=$(cat "${spec_files[@]}" | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
log() { echo "[setup] $*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/.lock-$key"
flock 9   # two clones setting up at once share one build

if [ -f "$venv/.complete" ]; then
  log "reusing $venv"
else
  start=$(date +%s)
  rm -rf "$venv"   # a half-built venv from an interrupted run is never reused
  log "building $venv (a few minutes, once per dependency spec)"
  "$python" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"

  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec="torch==$torch_version"
  else
    torch_spec="torch==$torch_version+cpu"
  fi
  log "installing $torch_spec"
  if ! "${pip[@]}" "$torch_spec"; then
    log "$torch_spec not on the configured indexes; trying the PyTorch CPU index"
    "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "$torch_spec"
  fi
  torch_installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')

  constraints=()
  [ -f "$repo/requirements/lock.txt" ] && constraints=(-c "$repo/requirements/lock.txt")
  log "installing requirements/base.txt (torch stays $torch_installed)"
  "${pip[@]}" -r <(grep -v '^deepspeed' "$repo/requirements/base.txt") "${constraints[@]}" \
    "torch==$torch_installed"

  log "installing deepspeed (CPU comm op pre-built, ~90 s)"
  ds_spec=$(grep '^deepspeed' "$repo/requirements/base.txt")
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_ACCELERATOR=cpu "${pip[@]}" --no-cache-dir \
    --no-build-isolation "$ds_spec" "${constraints[@]}" "torch==$torch_installed"

  touch "$venv/.complete"
  log "built in $(( $(date +%s) - start )) s"
fi

# The project itself: editable, no deps, so every clone that shares the venv tests its own code.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -e "$repo" >&2
echo "$venv"
