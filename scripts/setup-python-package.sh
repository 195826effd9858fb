#!/usr/bin/env bash
# Builds the Python package (python/) and installs it into the project's virtualenv (.venv), which
# scripts/setup-libtorch.sh made. `make test` runs it (the package's tests need it); `make demo` does not.
# Idempotent: a second run is cargo's no-op check and a checksum comparison.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

die() { echo "gainguard setup: $*" >&2; exit 1; }

[ -x "$venv/bin/python" ] || die "$venv is missing: run scripts/setup-libtorch.sh (make setup) first"

# The Python package (python/): maturin (from PyPI, into .venv) builds its native extension against this torch;
# the wheel is installed into .venv. The build shares target/ with the workspace, so it reuses the workspace's
# dependencies and a second run is cargo's no-op check; the wheel is reinstalled only when it changed.
if ! "$venv/bin/python" -c 'import maturin' >/dev/null 2>&1; then
  echo "gainguard setup: installing maturin (builds the Python package) into .venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "maturin>=1.7,<2" || die "pip could not install maturin from PyPI"
fi
wheels="$root/target/wheels"
rm -f "$wheels"/gainguard-*.whl
( cd "$root" && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" PYO3_PYTHON="$venv/bin/python" \
    nice "$venv/bin/maturin" build --release --quiet -m python/Cargo.toml --target-dir "$root/target" --out "$wheels" \
    --compatibility linux --auditwheel skip --strip ) || die "building the Python package (python/) failed; see the errors above"
wheel="$(ls "$wheels"/gainguard-*.whl)"
stamp="$venv/.gainguard-wheel.sha256"
sum="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ] || ! "$venv/bin/python" -c 'import gainguard' >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --force-reinstall "$wheel" \
    || die "pip could not install $wheel into .venv"
  echo "$sum" > "$stamp"
  echo "gainguard setup: installed the Python package gainguard into .venv"
fi
