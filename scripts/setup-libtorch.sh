#!/usr/bin/env bash
# Installs libtorch from the PyPI `torch` wheel into a project-local virtualenv (.venv) and writes
# .cargo/config.toml so that plain `cargo build|test|run` find it (LIBTORCH + an rpath), with nothing exported.
# Idempotent: a second run only checks and takes seconds.
set -euo pipefail
TORCH_VERSION="2.11.0"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"

die() { echo "gainguard setup: $*" >&2; exit 1; }

command -v "$py" >/dev/null 2>&1 || die "\`$py\` not found. Install Python 3.9+ (Debian: apt-get install python3 python3-venv python3-pip)."
"$py" -c 'import venv' 2>/dev/null || die "the Python \`venv\` module is missing. Install it (Debian: apt-get install python3-venv)."

if [ ! -x "$venv/bin/python" ]; then
  echo "gainguard setup: creating virtualenv $venv"
  "$py" -m venv "$venv" || die "\`$py -m venv\` failed. Install venv and ensurepip (Debian: apt-get install python3-venv python3-pip)."
fi
"$venv/bin/python" -m pip --version >/dev/null 2>&1 || die "pip is missing in $venv. Install it (Debian: apt-get install python3-pip python3-venv), then delete .venv and rerun."

have="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have" != "$TORCH_VERSION" ]; then
  echo "gainguard setup: installing torch==$TORCH_VERSION from PyPI into .venv (about 4.7 GB, 1-2 minutes)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION" numpy \
    || die "pip could not install torch==$TORCH_VERSION from PyPI"
fi

# The peers the tests compare against: microsoft/mup (its MuAdamW and set_base_shapes; --no-deps because its
# plotting dependencies are not needed to import it, pyyaml is) and pytest for the Python package's tests.
if ! "$venv/bin/python" -c 'import mup, yaml, pytest' >/dev/null 2>&1; then
  echo "gainguard setup: installing the test peers (mup 1.0.0, pyyaml, pytest) into .venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q pyyaml pytest \
    && "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps "mup==1.0.0" \
    || die "pip could not install the test peers (mup==1.0.0, pyyaml, pytest) from PyPI"
fi
# gainguard.coord_check draws its figure with matplotlib (its test checks the PNG).
if ! "$venv/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
  echo "gainguard setup: installing matplotlib (gainguard.coord_check's figure) into .venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q matplotlib || die "pip could not install matplotlib from PyPI"
fi
# Hugging Face transformers (and accelerate, which its Trainer needs) for gainguard.hf's Trainer test, pinned
# as python/pyproject.toml's `hf` extra.
if ! "$venv/bin/python" -c 'import transformers, accelerate; assert transformers.__version__ == "5.23.0" and accelerate.__version__ == "1.15.0"' >/dev/null 2>&1; then
  echo "gainguard setup: installing transformers 5.23.0 and accelerate 1.15.0 (gainguard[hf]'s test) into .venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "transformers==5.23.0" "accelerate==1.15.0" \
    || die "pip could not install transformers==5.23.0 and accelerate==1.15.0 from PyPI"
fi

torch_dir="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
[ -f "$torch_dir/lib/libtorch_cpu.so" ] || die "libtorch_cpu.so not found under $torch_dir/lib"
ln -sfn "$torch_dir" "$root/.libtorch"

mkdir -p "$root/.cargo"
cfg="$root/.cargo/config.toml"
new="$(cat <<CFG
# Written by scripts/setup-libtorch.sh; do not edit (it is regenerated, and ignored by git).
[env]
LIBTORCH = "$torch_dir"

[target.x86_64-unknown-linux-gnu]
# rpath: binaries, tests and examples find libtorch without LD_LIBRARY_PATH.
rustflags = ["-C", "link-arg=-Wl,-rpath,$torch_dir/lib"]

[target.aarch64-unknown-linux-gnu]
rustflags = ["-C", "link-arg=-Wl,-rpath,$torch_dir/lib"]
CFG
)"
if [ ! -f "$cfg" ] || [ "$(cat "$cfg")" != "$new" ]; then
  printf '%s\n' "$new" > "$cfg"
  echo "gainguard setup: wrote $cfg"
fi
echo "gainguard setup: libtorch $TORCH_VERSION ready at $torch_dir"
