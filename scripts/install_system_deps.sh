#!/usr/bin/env bash
# Install the system packages the speech benchmarks need (idempotent, non-interactive).
#   espeak-ng : speech synthesizer used by benchmarks/speech_data.py
# Run as root (or with sudo available).  Safe to run repeatedly.
set -euo pipefail

if command -v espeak-ng >/dev/null 2>&1; then
    echo "espeak-ng already installed: $(command -v espeak-ng)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: need root (or sudo) to install espeak-ng with apt-get" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends espeak-ng

command -v espeak-ng >/dev/null 2>&1 || { echo "error: espeak-ng still not on PATH" >&2; exit 1; }
echo "installed: $(espeak-ng --version)"
