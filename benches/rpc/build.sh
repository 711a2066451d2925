#!/usr/bin/env bash
# Builds the C peers of benches/rpc_echo.sh into benches/rpc/bin (gcc -O2, like Debian's libenet).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p bin
cc -O2 -Wall -o bin/udp_pingpong udp_pingpong.c
cc -O2 -Wall -o bin/enet_echo enet_echo.c -lenet
