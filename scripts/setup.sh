#!/usr/bin/env bash
# Create .venv (python3.11) and build + install mace into it:
#   1. pip install -r requirements.txt                 (torch, ROS 2 Kilted wheels, ...)
#   2. cmake build of msg/ srv/ + mace_ros + mace_core  (into .venv, build dir build/)
#   3. cmake --install again when only Python/launch/config/models files changed
# Each step is skipped when the hash of its inputs matches the stamp it left in .venv/.mace-setup,
# so a re-run with nothing changed takes about a second. Safe to run concurrently (flock).
#
# Environment: PYTHON (default python3.11), MACE_BUILD_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
BUILD="$ROOT/build"
STAMPS="$VENV/.mace-setup"
JOBS="${MACE_BUILD_JOBS:-2}"
START=$SECONDS

say() { printf '[setup %3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
stamp_ok() { [[ -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "$2" ]]; }
stamp_write() { mkdir -p "$STAMPS"; printf '%s\n' "$2" > "$STAMPS/$1"; }

command -v cmake > /dev/null || die "cmake not found (Debian: apt-get install cmake g++)"
command -v c++ > /dev/null || die "no C++ compiler found (Debian: apt-get install g++)"
command -v flock > /dev/null || die "flock not found (Debian: apt-get install util-linux)"

# One setup at a time per checkout (engineers and `make test` runs share .venv and build/).
mkdir -p "$BUILD"
exec 9> "$BUILD/.setup.lock"
if ! flock -n 9; then
  say "another setup.sh is running in $ROOT; waiting for it"
  flock 9
fi

# --- 1. venv and Python packages ---------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" > /dev/null || die "$PYTHON not found; install Python 3.11 (pyenv) or set PYTHON"
  say "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die ".venv is not Python 3.11: remove .venv and run again"

req_key="$(cat requirements.txt <("$VENV/bin/python" -VV) | sha256sum | cut -d' ' -f1)"
if stamp_ok requirements "$req_key"; then
  say "python packages up to date"
else
  say "installing python packages from requirements.txt (torch, ROS 2 Kilted wheels, ...)"
  pip_args=(--disable-pip-version-check --no-input)
  if [[ -n "${CI:-}" || ! -t 1 ]]; then
    pip_args+=(--progress-bar off)
  fi
  "$VENV/bin/python" -m pip install "${pip_args[@]}" -r requirements.txt
  "$VENV/bin/python" -m pip check || say "WARNING: pip check reports inconsistencies (above)"
  stamp_write requirements "$req_key"
  rm -f "$STAMPS/build"  # new wheels: rebuild against them
fi

# --- 2. CMake build of the interfaces and packages ---------------------------------------------
# shellcheck source=scripts/env.sh
. "$ROOT/scripts/env.sh"  # VIRTUAL_ENV, AMENT_PREFIX_PATH, CMAKE_PREFIX_PATH for the build

interface_files=()
while IFS= read -r f; do interface_files+=("$f"); done \
  < <(find msg srv -maxdepth 1 -type f \( -name '*.msg' -o -name '*.srv' \) 2> /dev/null | LC_ALL=C sort)
cmake_args=(
  -DCMAKE_INSTALL_PREFIX="$VENV"
  -DCMAKE_INSTALL_MESSAGE=NEVER
  -DBUILD_TESTING=OFF
  -DPython3_EXECUTABLE="$VENV/bin/python"
)
build_key="$(
  {
    printf '%s\n' "$req_key" "${cmake_args[@]}"
    sha256sum CMakeLists.txt package.xml "${interface_files[@]}"
  } | sha256sum | cut -d' ' -f1
)"

# Files that `cmake --install` copies as they are: the key changes when one is added, removed or
# modified (path, size, mtime), which is cheap to compute even with large weights in models/.
source_dirs=()
for d in mace_ros mace_core launch config models; do
  [[ -d "$d" ]] && source_dirs+=("$d")
done
source_key="$(
  find "${source_dirs[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -printf '%p %s %T@\n' \
    | LC_ALL=C sort | sha256sum | cut -d' ' -f1
)"

# Install build/, then delete what the previous install put into .venv and this one did not
# (a removed module or message must not linger in site-packages).
install_into_venv() {
  if ! cmake --install "$BUILD" > "$BUILD/install.log" 2>&1; then
    cat "$BUILD/install.log" >&2
    die "cmake --install failed (log above, also in build/install.log)"
  fi
  if [[ -f "$STAMPS/install_manifest.txt" ]]; then
    LC_ALL=C comm -23 <(LC_ALL=C sort -u "$STAMPS/install_manifest.txt") \
      <(LC_ALL=C sort -u "$BUILD/install_manifest.txt") \
      | while IFS= read -r stale; do
          say "removing stale $stale"
          rm -f -- "$stale"
        done
  fi
  mkdir -p "$STAMPS"
  cp "$BUILD/install_manifest.txt" "$STAMPS/install_manifest.txt"
  say "installed $(wc -l < "$BUILD/install_manifest.txt") files into .venv"
}

if stamp_ok build "$build_key" && [[ -f "$BUILD/CMakeCache.txt" ]]; then
  say "interfaces up to date"
  if stamp_ok sources "$source_key"; then
    say "installed python packages, launch, config and models up to date"
  else
    say "python/launch/config/models changed: reinstalling into .venv"
    install_into_venv
    stamp_write sources "$source_key"
  fi
else
  say "building msg/ srv/ and the mace_ros, mace_core packages (build/, -j$JOBS)"
  rm -f "$STAMPS/build" "$STAMPS/sources"
  find "$BUILD" -mindepth 1 -maxdepth 1 ! -name .setup.lock -exec rm -rf {} +
  cmake -S "$ROOT" -B "$BUILD" "${cmake_args[@]}"
  cmake --build "$BUILD" -j "$JOBS"
  install_into_venv
  stamp_write build "$build_key"
  stamp_write sources "$source_key"
fi

say "done in $((SECONDS - START)) s; executables: $(cd "$VENV/bin" && echo mace-*)"
