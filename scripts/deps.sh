#!/usr/bin/env bash
# Installs the Debian packages chaingrad needs, only those missing. `deps.sh test` adds what the
# test suite needs (PyTorch for the interop tests, clang for the fuzzers, Chromium for the report).
set -euo pipefail
pkgs=(build-essential cmake libopenblas-dev libdnnl-dev zlib1g-dev libdeflate-dev libcli11-dev nlohmann-json3-dev libgtest-dev
      libbenchmark-dev dataset-fashion-mnist graphviz libstb-dev openmpi-bin libopenmpi-dev)
if [[ "${1:-}" == "test" ]]; then
  pkgs+=(python3-torch python3-numpy chromium clang libclang-rt-14-dev)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
