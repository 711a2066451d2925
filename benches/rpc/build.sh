#!/usr/bin/env bash
# Builds the C peers of benches/rpc_echo.sh (and the UDP floor of benches/udp_echo.sh) into
# benches/rpc/bin (gcc -O2, like Debian's libenet): build.sh [PEER...], PEER udp_pingpong or
# enet_echo (needs Debian libenet-dev); both when none is named.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p bin
peers=("$@")
[ $# -gt 0 ] || peers=(udp_pingpong enet_echo)
for peer in "${peers[@]}"; do
  case $peer in
    udp_pingpong) cc -O2 -Wall -o bin/udp_pingpong udp_pingpong.c ;;
    enet_echo) cc -O2 -Wall -o bin/enet_echo enet_echo.c -lenet ;;
    *) echo "unknown peer '$peer' (udp_pingpong, enet_echo)" >&2 && exit 2 ;;
  esac
done
