#!/usr/bin/env bash
# Set pestle up on a fresh Debian machine and run something with it:
#   scripts/bootstrap.sh quickstart   # the quickstart campaign; prints its report's path last
#   scripts/bootstrap.sh test         # lint and the test suite (what CI runs)
#   scripts/bootstrap.sh setup        # only set up
# Installs the Debian packages GPAW builds and runs against, and chromium (the report test
# renders the HTML reports in it headless) (as root, or through sudo),
# creates .venv in the repository, installs CPU torch and pestle with every extra into it. A second call with
# nothing changed skips straight to the work.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
# The CPU build of torch; a plain "torch" from PyPI is a multi-GB CUDA build. For a GPU:
# PESTLE_TORCH_INDEX=https://download.pytorch.org/whl/cu126 (the build for your CUDA).
TORCH_SPEC="${PESTLE_TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${PESTLE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
APT_PACKAGES=(gpaw-data libxc-dev libblas-dev liblapack-dev libopenmpi-dev libscalapack-mpi-dev
              libfftw3-dev pkg-config chromium)

say() { printf '\033[1m[pestle setup]\033[0m %s\n' "$*" >&2; }

install_system_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

install_torch() {
    # A wheel pip already has at hand (a local wheel folder in pip's configuration) is used
    # when no index was asked for; otherwise the build comes from TORCH_INDEX (its "+cpu"
    # local version ranks above the CUDA build of the same version on the default index).
    if [ -z "${PESTLE_TORCH_INDEX:-}" ] \
        && "$VENV/bin/python" -m pip install -q --no-index --no-deps "$TORCH_SPEC" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" >&2  # its dependencies
        return 0
    fi
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX" >&2
}

install_python_packages() {
    local stamp="$VENV/.pestle-setup" want
    want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC $TORCH_INDEX"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    say "installing $TORCH_SPEC and pestle with every extra into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    install_torch
    "$VENV/bin/python" -m pip install -q -e ".[all,dev]" >&2
    echo "$want" > "$stamp"
}

setup() {
    install_system_packages
    install_python_packages
    if [ -z "${GPAW_SETUP_PATH:-}" ] && [ -d /usr/share/gpaw-setups ]; then
        export GPAW_SETUP_PATH=/usr/share/gpaw-setups
    fi
    export PATH="$VENV/bin:$PATH"
}

case "${1:-}" in
    setup)
        setup ;;
    quickstart)
        setup
        pestle run configs/quickstart.yaml "${@:2}" ;;
    test)
        setup
        ruff check pestle tests benchmarks
        ruff format --check pestle tests benchmarks
        python -m pytest "${@:2}" ;;
    *)
        echo "usage: scripts/bootstrap.sh setup|quickstart|test [args...]" >&2
        exit 2 ;;
esac
