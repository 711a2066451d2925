#!/usr/bin/env bash
# Real-host tests: the shipped module built exactly as users build it, loaded by Debian's
# luajit and lua5.1, and by LÖVE 11.4 headless. Needs: luajit lua5.1 love (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/../.."
suites=${LUNA_SUITES:-runtime_suite,ws_suite,rpc_suite,reentry_suite,net_suite,http_suite,http_app_suite,http_request_suite}
target=${CARGO_TARGET_DIR:-target}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build() { # features, output dir
  cargo build --quiet --release --no-default-features --features "$1"
  mkdir -p "$2"
  cp "$target/release/libluna.so" "$2/$3.so"
}

run_plain() { # interpreter, features
  for shipped in luna lunac; do
    rm -rf "$work/$1"
    build "$2" "$work/$1" "$shipped"
    echo "== $1 ($2), shipping only $shipped.so"
    "$1" tests/hosts/plain.lua "$work/$1" "$shipped" ${suites//,/ }
  done
}

run_plain luajit luajit,module
run_plain lua5.1 lua51,module

echo "== love 11.4 headless (luajit,module)"
game="$work/game"
build luajit,module "$game" luna
cp tests/hosts/love/*.lua tests/lua/*.lua "$game/"
rm -f "$work/marker"
mkdir -p "$work/xdg" && chmod 700 "$work/xdg"
XDG_RUNTIME_DIR="$work/xdg" LUNA_LOVE_MARKER="$work/marker" LUNA_SUITES="$suites" timeout 300 love "$game"
echo "real hosts: all passed"
