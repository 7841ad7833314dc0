#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every check and test.
# Safe to run again: every install step is skipped when already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
step() { printf '\n==> %s\n' "$*"; }
SECONDS=0

step "system packages"
need=()
for p in libxml2-utils musl-tools shellcheck git python3-venv packer systemd openssh-client; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}" >/dev/null
fi

step "rust toolchain parts"
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

step "python virtualenv (pinned flwr and pyone)"
venv="$root/target/flower-venv"
if ! cmp -s e2e/requirements.lock "$venv/.requirements.lock" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r e2e/requirements.lock
  cp e2e/requirements.lock "$venv/.requirements.lock"
fi
export FLOWER_VENV="$venv"
export FLWR_TELEMETRY_ENABLED=0

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "static flower-agent (x86_64-unknown-linux-musl)"
cargo build --locked --release --no-default-features --target x86_64-unknown-linux-musl --bin flower-agent
agent=target/x86_64-unknown-linux-musl/release/flower-agent
size=$(stat -c %s "$agent")
# Images ship the `dist` profile (thin LTO); the test command builds `release` to save time.
echo "flower-agent static binary (release profile): $((size / 1024)) KiB"
if readelf -d "$agent" | grep -q NEEDED; then echo "flower-agent links shared libraries" >&2; exit 1; fi
"$agent" --version

step "tests"
cargo nextest run --workspace --locked --no-fail-fast --profile ci

step "fuzzing (cargo-fuzz on nightly, every target ${FUZZ_SECONDS:-15}s)"
bash e2e/fuzz.sh
echo "test command finished in ${SECONDS}s"
