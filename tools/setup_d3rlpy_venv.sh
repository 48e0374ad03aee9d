#!/usr/bin/env bash
# Create the separate virtualenv used only by benchmarks to run d3rlpy 2.8.1.
#
# d3rlpy pins an older gymnasium than dtlab, so it cannot live in the project
# venv. This venv holds: CPU torch (2.13.0, from the local wheel directory that
# pip is configured to use), d3rlpy==2.8.1, gymnasium[mujoco] at the version
# d3rlpy accepts (for HalfCheetah-v5 evaluation) and h5py (to read Minari hdf5
# datasets directly; minari itself is not installed).
#
# Usage:
#   bash tools/setup_d3rlpy_venv.sh [VENV_DIR]     # default: <repo>/.venv-d3rlpy
#   <VENV_DIR>/bin/python tools/d3rlpy_baseline.py --help
#
# Idempotent: if VENV_DIR already passes the smoke check, nothing is done.
# Environment: PYTHON (interpreter used to create the venv, default python3.11
# or python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/.venv-d3rlpy}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"

TORCH_VERSION="2.13.0"
D3RLPY_VERSION="2.8.1"

smoke_check() {
    # Imports everything the baseline needs and steps HalfCheetah-v5 once.
    # Runs in /tmp so MuJoCo's MUJOCO_LOG.TXT (compiler warnings) stays out of the repo.
    (cd "${TMPDIR:-/tmp}" && "$VENV_DIR/bin/python" -) <<'EOF'
import d3rlpy, gymnasium, h5py, torch
assert d3rlpy.__version__ == "2.8.1", d3rlpy.__version__
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
env = gymnasium.make("HalfCheetah-v5")
obs, _ = env.reset(seed=0)
env.step(env.action_space.sample())
env.close()
print(f"d3rlpy {d3rlpy.__version__}, torch {torch.__version__}, "
      f"gymnasium {gymnasium.__version__}, h5py {h5py.__version__}: OK")
EOF
}

if [[ -x "$VENV_DIR/bin/python" ]] && smoke_check >/dev/null 2>&1; then
    echo "d3rlpy venv at $VENV_DIR already works:"
    smoke_check
    exit 0
fi

echo "Creating d3rlpy venv at $VENV_DIR (python: $PYTHON)"
"$PYTHON" -m venv "$VENV_DIR"
PIP=("$VENV_DIR/bin/python" -m pip install --disable-pip-version-check)

# 1. CPU torch first, pinned, so nothing later pulls a CUDA build.
"${PIP[@]}" "torch==$TORCH_VERSION"

# 2. d3rlpy and the evaluation dependencies. torch is re-pinned so the resolver
#    keeps the installed CPU wheel; gymnasium's version is left to d3rlpy's pin.
"${PIP[@]}" "torch==$TORCH_VERSION" "d3rlpy==$D3RLPY_VERSION" "gymnasium[mujoco]" h5py

echo "Checking the venv"
smoke_check
