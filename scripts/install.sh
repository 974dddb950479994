#!/bin/sh
# Install what vswitch needs on a fresh Debian/Ubuntu machine: the system tools
# the lab, tests and benchmarks drive (from apt) and the project itself (pip).
set -eu
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    iproute2 iputils-ping iperf3 tcpdump util-linux procps iptables conntrack >/dev/null
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# pyenv installs console scripts behind shims that only appear after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
echo "vswitch installed: $(command -v vswitch)"
