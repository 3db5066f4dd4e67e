#!/usr/bin/env bash
# Installs the system libraries moe-dmft needs (OpenBLAS; fontconfig ships with the machine image).
# Idempotent; safe to run twice.
set -euo pipefail
need=()
dpkg -s libopenblas-dev >/dev/null 2>&1 || need+=(libopenblas-dev)
dpkg -s libfontconfig1-dev >/dev/null 2>&1 || need+=(libfontconfig1-dev)
dpkg -s pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
