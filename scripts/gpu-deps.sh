#!/usr/bin/env bash
# Fills build-deps/ (a CMake prefix) with the header-only libraries the tokmix executable needs
# and a GPU image may lack: nlohmann_json and CLI11, copied from this (Debian) machine's packages.
# Run it here, then carry build-deps to the GPU machine with the work tree
# (scripts/gpu-check.sh and scripts/gpu-ddp.sh add it to CMAKE_PREFIX_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
for f in /usr/include/nlohmann/json.hpp /usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake \
         /usr/include/CLI/CLI.hpp /usr/share/cmake/CLI11/CLI11Config.cmake; do
  [ -e "$f" ] || { echo "missing $f (apt-get install nlohmann-json3-dev libcli11-dev)"; exit 1; }
done
mkdir -p build-deps/include build-deps/share/cmake
cp -r /usr/include/nlohmann /usr/include/CLI build-deps/include/
cp -r /usr/share/cmake/nlohmann_json /usr/share/cmake/CLI11 build-deps/share/cmake/
du -sh build-deps
