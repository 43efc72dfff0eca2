#!/usr/bin/env bash
# Installs what tokmix needs on Debian (bookworm), quietly and only what is missing.
set -euo pipefail
pkgs=(build-essential cmake ninja-build ccache pkg-config git
      libtorch-dev libgloo-dev libopenblas0-openmp
      libgtest-dev libgmock-dev libbenchmark-dev
      libcli11-dev nlohmann-json3-dev libsentencepiece-dev
      gnuplot-nox bible-kjv python3-torch python3-pytest)
missing=()
for p in "${pkgs[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"install ok installed"* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
