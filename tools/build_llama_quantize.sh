#!/usr/bin/env bash
# Build the pinned llama-quantize (tools/quantize of the llama-cpp-python 0.3.36 sdist) against the installed
# libllama, for dry-run comparisons (tools/compare_llama_quantize.py). About a minute on 2 cores.
#   bash tools/build_llama_quantize.sh SDIST_LLAMA_CPP_DIR OUT_DIR [PYTHON]
# Only the three common/ sources it calls are compiled; --gc-sections drops the rest of common.cpp.
set -euo pipefail
V=$1; OUT=$2; PY=${3:-python}
LIB=$("$PY" -c 'import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / "lib")')
mkdir -p "$OUT"
sed -e 's/@LLAMA_BUILD_NUMBER@/0/' -e 's/@LLAMA_BUILD_COMMIT@/pinned/' -e 's/@BUILD_COMPILER@/g++/' \
    -e 's/@BUILD_TARGET@/host/' "$V/common/build-info.cpp.in" > "$OUT/build-info.cpp"
objs=()
for f in "$V/tools/quantize/main.cpp" "$V/tools/quantize/quantize.cpp" "$V/common/common.cpp" "$V/common/log.cpp" \
         "$V/common/imatrix-loader.cpp" "$V/common/json.cpp" "$OUT/build-info.cpp"; do
    o="$OUT/$(basename "$f" .cpp).o"
    g++ -std=c++17 -O1 -w -ffunction-sections -fdata-sections -I"$V/include" -I"$V/ggml/include" -I"$V/common" \
        -I"$V/src" -I"$V/vendor" -c "$f" -o "$o" &
    objs+=("$o")
done
wait
g++ "${objs[@]}" -o "$OUT/llama-quantize" -L"$LIB" -lllama -lggml -lggml-base -Wl,-rpath,"$LIB" -Wl,--gc-sections \
    -lpthread
echo "$OUT/llama-quantize"
