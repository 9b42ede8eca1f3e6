# Sourced by .ci/demo and .ci/test: finds or fetches ComfyUI, creates or reuses the virtual
# environment, installs what FLENwheel needs into it. Idempotent; a stamp skips pip when
# nothing changed. Variables: COMFYUI_PATH, FLEN_VENV, FLEN_WITH_TESTS=1 (test extras + chromium).
set -euo pipefail

FLEN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFYUI_RELEASE="v0.3.64"
COMFYUI_REPO="https://github.com/comfyanonymous/ComfyUI.git"
export COMFYUI_PATH="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
FLEN_VENV="${FLEN_VENV:-$HOME/.cache/flenwheel/venv}"

say() { printf '[flenwheel] %s\n' "$*" >&2; }

if [ ! -f "$COMFYUI_PATH/main.py" ]; then
  say "no ComfyUI at $COMFYUI_PATH; cloning $COMFYUI_RELEASE"
  mkdir -p "$(dirname "$COMFYUI_PATH")"
  if ! git clone --quiet --depth 1 --branch "$COMFYUI_RELEASE" "$COMFYUI_REPO" "$COMFYUI_PATH"; then
    say "could not clone ComfyUI $COMFYUI_RELEASE (offline?). Put a ComfyUI $COMFYUI_RELEASE checkout at"
    say "$COMFYUI_PATH or point COMFYUI_PATH at one, then run this again."
    exit 3
  fi
fi

if [ ! -x "$FLEN_VENV/bin/python" ]; then
  say "creating virtual environment $FLEN_VENV"
  mkdir -p "$(dirname "$FLEN_VENV")"
  python3 -m venv "$FLEN_VENV"
fi
PY="$FLEN_VENV/bin/python"
export PATH="$FLEN_VENV/bin:$PATH"

want_tests="${FLEN_WITH_TESTS:-0}"
# Two stamps: the runtime set (what the demo needs) and the test extras on top. Switching between
# .ci/demo and .ci/test must never reinstall the runtime set, so whether the extras are wanted is not
# part of the runtime stamp; the extras' stamp covers the runtime stamp and requirements-dev.txt.
stamp_src="$(cat "$FLEN_ROOT/requirements.txt" "$COMFYUI_PATH/requirements.txt" "$FLEN_ROOT/.ci/env.sh")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
stamp_file="$FLEN_VENV/.flenwheel-stamp"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
  say "installing Python packages into $FLEN_VENV (first run: several minutes)"
  rm -f "$FLEN_VENV/.flenwheel-test-stamp"  # the extras go on top of this set: check them again after it
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
  # ComfyUI's own list, less the torch family pinned above (torchaudio is optional for ComfyUI).
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$COMFYUI_PATH/requirements.txt" \
    > "$FLEN_VENV/comfyui-requirements.txt"
  "$PY" -m pip install -q -r "$FLEN_VENV/comfyui-requirements.txt" requests
  "$PY" -m pip install -q -r "$FLEN_ROOT/requirements.txt"
  # insightface pulls the CPU `onnxruntime`, which shares its module with onnxruntime-gpu:
  # keep only the GPU build (it runs on the CPU too) so CUDA is used where there is one.
  "$PY" -m pip uninstall -q -y onnxruntime onnxruntime-gpu
  "$PY" -m pip install -q --no-deps "$(grep -E '^onnxruntime-gpu' "$FLEN_ROOT/requirements.txt")"
  echo "$stamp" > "$stamp_file"
fi
if [ "$want_tests" = 1 ]; then
  test_stamp="$(printf '%s\n%s' "$stamp" "$(cat "$FLEN_ROOT/requirements-dev.txt")" | sha256sum | cut -c1-16)"
  test_stamp_file="$FLEN_VENV/.flenwheel-test-stamp"
  if [ "$(cat "$test_stamp_file" 2>/dev/null)" != "$test_stamp" ]; then
    say "installing the test extras (requirements-dev.txt) into $FLEN_VENV"
    "$PY" -m pip install -q -r "$FLEN_ROOT/requirements-dev.txt"
    echo "$test_stamp" > "$test_stamp_file"
  fi
fi

if [ "$want_tests" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  say "installing Debian's chromium for the browser tests"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
export FLEN_PY="$PY"
