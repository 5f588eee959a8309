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
# GGML_NATIVE compiles ggml's AMX kernels where the CPU has AMX, and at 80fb11a they crash on the
# first product (seen on a Sapphire Rapids VM, Q4_0 and Q4_K, 1 or 2 threads). There, this CPU's own
# features are named one by one instead, AMX left out: llama.cpp's best build that runs.
isa=(-DGGML_NATIVE=ON)
if grep -qw amx_int8 /proc/cpuinfo; then
  has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
  isa=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_AVX2=ON
    -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)"
    -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
    -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  echo "this CPU has AMX: building without it (${isa[*]})"
fi
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build build -j "$(nproc)" --target llama-bench llama-batched-bench llama-server llama-quantize
ls build/bin
