#!/usr/bin/env bash
# Builds llama.cpp's own tools natively (the peer the benchmarks compare against) from the
# source node-llama-cpp@3.21.1 ships (llama/gitRelease.bundle), into .bench/llama.cpp/
# (ignored by git). Needs cmake and a C++ compiler (Debian: cmake g++); no network but npm's.
#   scripts/build-llama-cpp.sh            # then .bench/llama.cpp/build/bin/llama-bench etc.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/.bench/llama.cpp"
version="3.21.1"
mkdir -p "$out"
cd "$out"
if [ ! -d src ]; then
  npm pack "node-llama-cpp@$version" --silent >/dev/null
  tar xzf "node-llama-cpp-$version.tgz" package/llama/gitRelease.bundle
  git -c advice.detachedHead=false clone --quiet package/llama/gitRelease.bundle src
  rm -rf package "node-llama-cpp-$version.tgz"
fi
echo "llama.cpp $(git -C src rev-parse --short HEAD) from node-llama-cpp@$version"
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build build -j "$(nproc)" --target llama-bench llama-batched-bench llama-server llama-quantize
ls build/bin
