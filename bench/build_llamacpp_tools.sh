#!/usr/bin/env bash
# Builds llama.cpp's own llama-quantize and llama-imatrix (and, with TOOLS_SERVER=1, llama-server,
# the serve bench's anchor) from the llama-cpp-python sdist (the exact llama.cpp our runtime
# uses) into a cache folder outside the repository, once. Prints the folder holding the binaries.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
CACHE=${POCKETLM_BENCH_CACHE:-$HOME/.cache/pocketlm-bench}
DEST=$CACHE/llama.cpp-$VERSION
targets="llama-imatrix llama-quantize"
[ "${TOOLS_SERVER:-0}" = 1 ] && targets+=" llama-server"
have=1
for t in $targets; do [ -x "$DEST/bin/$t" ] || have=0; done
if [ $have = 1 ]; then
  echo "$DEST/bin"; exit 0
fi
mkdir -p "$CACHE/src"
cd "$CACHE/src"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  python3 -m pip download --no-deps --no-binary :all: -q -d . "llama-cpp-python==$VERSION" >&2
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
SRC=$CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp
flags="-DGGML_NATIVE=ON"
if grep -qE "\bamx(_tile|_int8|_bf16)?\b" /proc/cpuinfo 2>/dev/null; then
  flags="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
server=OFF
[ "${TOOLS_SERVER:-0}" = 1 ] && server=ON
cmake -S "$SRC" -B "$CACHE/build-$VERSION" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=$server \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF $flags >&2
cmake --build "$CACHE/build-$VERSION" -j "$(nproc)" --target $targets >&2
mkdir -p "$DEST/bin"
for t in $targets; do cp "$CACHE/build-$VERSION/bin/$t" "$DEST/bin/"; done
echo "$DEST/bin"
