#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` from the llama.cpp sources that ship inside the
# llama-cpp-python sdist of the installed version, with the README's portable flags, so
# that bench/engine_bench.py compares Sluice with it on the same kernels. Idempotent: a
# built binary is reused. Prints the binary's path (the last line of stdout).
#
#   bench/build_llama_server.sh [DIR]     # DIR: where to build (default: bench/.work/llama-server)
#   LLAMA_SERVER=$(bench/build_llama_server.sh | tail -1) python bench/engine_bench.py
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# The interpreter whose llama-cpp-python to match: $PYTHON, the active venv, the repo's, python3.
python=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
[ -n "$python" ] || { [ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python; } || true
[ -n "$python" ] || python=python3
dir=${1:-$repo/bench/.work/llama-server}
version=$("$python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
src=$dir/llama_cpp_python-$version/vendor/llama.cpp
bin=$src/build/bin/llama-server

if [ ! -x "$bin" ]; then
  mkdir -p "$dir"
  sdist=$dir/llama_cpp_python-$version.tar.gz
  if [ ! -f "$sdist" ]; then
    "$python" -m pip download --no-binary :all: --no-deps --dest "$dir" \
      "llama-cpp-python==$version" >&2
  fi
  [ -d "$src" ] || tar -xzf "$sdist" -C "$dir"
  # The README's portable flags (any x86-64 CPU with AVX2), as the installed wheel was built.
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON >&2
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >&2
fi
echo "$bin"
