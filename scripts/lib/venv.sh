# shellcheck shell=bash
# Shared by scripts/serve and scripts/test (sourced, not run): the project's virtualenv in .venv,
# created when missing and (re)installed only when pyproject.toml changed since the last install.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

is_root_with_apt() {
  [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1
}

apt_install() {
  echo "installing $* with apt-get ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq "$@" >&2 || die "apt-get install $* failed"
}

# The interpreter to build .venv from: $PYTHON if set, else python3; Pilotboat needs 3.11 or newer.
base_python() {
  local python="${PYTHON:-python3}"
  command -v "$python" >/dev/null 2>&1 || die "$python not found: install Python 3.11 or newer (or set PYTHON=/path/to/python3)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Pilotboat needs Python 3.11 or newer; $python is $("$python" -c 'import platform; print(platform.python_version())')"
  printf '%s' "$python"
}

ensure_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    return
  fi
  local python
  python="$(base_python)"
  echo "creating $VENV ..." >&2
  if ! "$python" -m venv --clear "$VENV" >&2; then
    rm -rf "$VENV"
    # Debian and Ubuntu ship the venv module (ensurepip) in a separate package.
    if is_root_with_apt; then
      apt_install python3-venv
      "$python" -m venv --clear "$VENV" >&2 || { rm -rf "$VENV"; die "could not create $VENV"; }
    else
      die "'$python -m venv' failed: install the venv module (Debian/Ubuntu: sudo apt-get install python3-venv) and run this again"
    fi
  fi
}

# ensure_installed [test]: pip install -e . (or -e '.[test]') when pyproject.toml changed since the
# last install of that flavour. The stamp holds a hash of pyproject.toml and the repository path.
ensure_installed() {
  local extra="${1:-}" target="." stamp="$VENV/.pilotboat-installed" wanted
  if [ -n "$extra" ]; then
    target=".[$extra]"
    stamp="$VENV/.pilotboat-installed-$extra"
  fi
  wanted="$("$VENV/bin/python" - "$ROOT" <<'PY'
import hashlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
print(hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest(), root)
PY
)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    return
  fi
  echo "installing pilotboat$([ -n "$extra" ] && printf ' with [%s] extras' "$extra") into $VENV ..." >&2
  (cd "$ROOT" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target" >&2) \
    || die "pip install -e '$target' failed (see above)"
  printf '%s\n' "$wanted" >"$stamp"
  # The test flavour includes everything the plain install has.
  if [ -n "$extra" ]; then
    printf '%s\n' "$wanted" >"$VENV/.pilotboat-installed"
  fi
}
