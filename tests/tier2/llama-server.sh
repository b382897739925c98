#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp tree that the
# llama-cpp-python source package on PyPI vendors, and make a tiny
# random-weight llama GGUF for it. Both are cached outside the clone, keyed
# by the package version, so a second run on the same machine skips them.
# Prints two lines: the llama-server binary, then the model file.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${ANTEROOM_TIER2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/anteroom-tier2}/llama-cpp-python-$VERSION"
BIN="$CACHE/llama-server"
MODEL="$CACHE/tiny-llama.gguf"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$CACHE"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cmake || ! need c++ || ! need python3; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends cmake g++ make python3 python3-venv >&2
fi

SRC="$CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -x "$BIN" ] || [ ! -f "$MODEL" ]; then
    if [ ! -d "$SRC" ]; then
        rm -rf "$CACHE/src" && mkdir -p "$CACHE/src"
        # The sdist alone; its build dependencies come as wheels.
        python3 -m pip download --quiet --disable-pip-version-check --no-deps \
            --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$CACHE/src" >&2
        tar xzf "$CACHE/src/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE/src"
    fi
fi

if [ ! -x "$BIN" ]; then
    echo "building llama-server $VERSION (a few minutes on 2 cores)..." >&2
    # CPU only, static, no web UI download, no TLS; GGML_NATIVE off so the
    # binary runs on any x86-64 machine CI may get.
    cmake -S "$SRC" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF >&2
    cmake --build "$CACHE/build" --target llama-server -j "$(nproc)" >&2
    cp "$CACHE/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
fi

if [ ! -f "$MODEL" ]; then
    # The gguf package of the same tree writes the model; numpy comes with it.
    python3 -m venv "$CACHE/venv" >&2
    "$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check "$SRC/gguf-py" >&2
    "$CACHE/venv/bin/python" "$HERE/tiny_gguf.py" \
        "$SRC/models/ggml-vocab-llama-spm.gguf" "$MODEL.tmp" >&2
    mv "$MODEL.tmp" "$MODEL"
fi

echo "$BIN"
echo "$MODEL"
