#!/usr/bin/env bash
# Every check, in order of cost. Assumes the tools .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --quiet --all-targets -- -D warnings
cargo clippy --quiet --no-default-features --lib --tests -- -D warnings

echo "== Rust tests + Lua suites in vendored LuaJIT"
cargo test --quiet

echo "== Lua suites and host in vendored Lua 5.4"
cargo test --quiet --no-default-features --features lua54,vendored --test lua_suites --test host

echo "== real hosts: Debian luajit, lua5.1, LÖVE 11.4 headless"
tests/hosts/run.sh
