#!/bin/sh
# Install Debian/Ubuntu packages that keyplane needs, only where missing.
# Usage: scripts/system-packages.sh COMMAND=PACKAGE [COMMAND=PACKAGE ...]
#   e.g. scripts/system-packages.sh softhsm2-util=softhsm2 pkcs11-tool=opensc
# A warm machine (every command present) pays nothing; otherwise apt-get update runs
# once, then apt-get install. Needs root or sudo; says what to run if neither.
set -eu
missing=""
for pair in "$@"; do
    cmd=${pair%%=*}
    pkg=${pair#*=}
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -e "$cmd" ]; then
        missing="$missing $pkg"
    fi
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "keyplane needs these Debian packages:$missing" >&2
    echo "install them as root: apt-get update && apt-get install -y$missing" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "keyplane needs:$missing (no apt-get here: install them with your package manager)" >&2
    exit 1
fi
echo "installing system packages:$missing"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
