#!/usr/bin/env bash
# CI device stage (run by .ci/run after the CPU tests): tests/test_devices.py on real ggml devices without a GPU:
# ggml's Vulkan backend on Mesa's software driver lavapipe, and ggml's RPC backend with servers on localhost.
# Every test must run: a skip fails the stage. The Vulkan+RPC build of the pinned llama-cpp-python is kept as a
# wheel outside the clone (keyed by version and CMake flags), so only the first run on a machine builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
LCP=0.3.36
FLAGS="-DGGML_VULKAN=on -DGGML_RPC=on"
PKGS="mesa-vulkan-drivers libvulkan-dev glslc spirv-headers"  # lavapipe, the loader, the shader compiler, headers
VENV=.venv-devices
t0=$(date +%s)

missing=""
for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "device stage: missing Debian packages:$missing (apt-get install them as root)" >&2
        exit 1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/diffgemma-ci
mkdir -p "$CACHE"

# unpack_deb SUITE PACKAGE DEST: a package of another suite of this system's Debian mirror, unpacked into DEST
# (a private apt state: nothing is installed, the system's sources are left alone).
unpack_deb() {
    [ -d "$3" ] && return 0
    local mirror apt_dir opts
    mirror=$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /\/debian$/ {print $2; exit}' /etc/apt/sources.list)
    apt_dir=$(mktemp -d)
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    echo "deb $mirror $1 main" > "$apt_dir/sources.list"
    opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    (cd "$apt_dir" && apt-get "${opts[@]}" download -qq "$2")
    rm -rf "$3.tmp" && dpkg-deb -x "$apt_dir"/*.deb "$3.tmp" && mv "$3.tmp" "$3"
    rm -rf "$apt_dir"
}

# The pinned ggml-vulkan needs Vulkan headers that declare VK_EXT_layer_settings; Debian 12's (1.3.239) do not.
# Then the headers alone come from Debian 13's libvulkan-dev; the loader stays the system's.
if ! grep -qs "struct LayerSettingEXT" /usr/include/vulkan/vulkan_structs.hpp; then
    unpack_deb trixie libvulkan-dev "$CACHE/vulkan-headers"
    HEADERS="-DVulkan_INCLUDE_DIR=$CACHE/vulkan-headers/usr/include"
fi
# Debian 12's lavapipe (Mesa 22.3) crashes in ggml's flash-attention shader; Debian 12's backports have Mesa 25,
# whose lavapipe runs everything: use it from an unpacked copy (the system's Mesa is left alone).
LVP=/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so
if dpkg --compare-versions "$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)" lt 24; then
    unpack_deb bookworm-backports mesa-vulkan-drivers "$CACHE/mesa-vulkan"
    LVP=$CACHE/mesa-vulkan/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so
fi
HEADERS=${HEADERS:-}
WHEELS=$CACHE/wheels/lcp-$LCP-$(echo "$FLAGS ${HEADERS:+debian13-headers}" | sha256sum | cut -c1-12)

wheel=$(ls "$WHEELS"/llama_cpp_python-$LCP-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "device stage: building llama-cpp-python $LCP with $FLAGS (cached in $WHEELS afterwards)"
    mkdir -p "$WHEELS.tmp"
    # --no-cache-dir: pip's own wheel cache is keyed by the sdist, not by CMAKE_ARGS (it would hand back a CPU build)
    CMAKE_ARGS="$FLAGS $HEADERS" python3 -m pip wheel -q --no-cache-dir --no-deps "llama-cpp-python==$LCP" -w "$WHEELS.tmp"
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    wheel=$(ls "$WHEELS"/llama_cpp_python-$LCP-*.whl | head -1)
fi
t1=$(date +%s)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --no-cache-dir "$wheel"
"$VENV/bin/pip" install -q . pillow pytest
t2=$(date +%s)

# lavapipe only (a real GPU's driver would otherwise be device 0), and ggml's Vulkan backend skips CPU-type
# Vulkan devices unless they are named in GGML_VK_VISIBLE_DEVICES. Lavapipe compiles ggml's shaders with LLVM on
# first use, minutes for some: its shader cache is kept beside the wheel.
printf '{"file_format_version": "1.0.0", "ICD": {"api_version": "1.3.0", "library_path": "%s"}}\n' "$LVP" \
    > "$CACHE/lvp_icd.json"
export VK_ICD_FILENAMES=$CACHE/lvp_icd.json GGML_VK_VISIBLE_DEVICES=0 MESA_SHADER_CACHE_DIR=$CACHE/mesa-shaders
"$VENV/bin/python" -m diffgemma info --devices
"$VENV/bin/python" -c "import diffgemma as dg, sys; n = dg.backends(); sys.exit(0 if 'Vulkan0' in n else
    f'device stage: lavapipe is not Vulkan0 (devices: {n})')"
log=$(mktemp)
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs tests/test_devices.py tests/test_placement.py 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
t3=$(date +%s)
echo "device stage: wheel $((t1 - t0)) s, venv $((t2 - t1)) s, tests $((t3 - t2)) s"
if [ "$rc" != 0 ]; then exit "$rc"; fi
if grep -Eq "^SKIPPED|[0-9]+ skipped" "$log"; then
    echo "device stage: tests were skipped; on this stage every device test must run" >&2
    exit 1
fi
