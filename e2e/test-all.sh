#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every check and test, builds
# both appliance images (packer/build, cached by their inputs) and boots the SuperLink's.
# Safe to run again: every install step is skipped when already satisfied.
#
# Scheduling on two cores: the base root filesystem of the images (mostly downloads and disk
# I/O) builds in the background from the start; the static agent builds beside the lints;
# the two roles' images follow the agent, beside the build of onesim, then QEMU boots the
# SuperLink's image beside the compile of the tests and is done before the real-Flower tests
# start, whose timing it would disturb. The fuzz build (~11 CPU-minutes: cargo-fuzz builds
# one codegen unit per crate; 16 units measured no cheaper) runs in the background at the
# lowest CPU priority beside the real-Flower tests, which run one at a time and seldom fill
# both cores (it costs them ~5%); started earlier it held the compile steps back ~1.8x.
# The fuzz targets run last, one per core at once; cargo-deny installs after the fuzz
# build, in the background too, and the dependency audit (e2e/deny.sh) follows the tests.
# Background logs: target/images.log, target/agent-build.log, target/fuzz-build.log,
# target/boot-test.log. Each step prints the seconds since the command started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
step() { printf '\n==> %s  [%d s]\n' "$*" "$SECONDS"; }
SECONDS=0
bg_pids=()
# Background steps run in their own sessions (setsid), so that their whole process trees
# (mmdebstrap, QEMU, onesim) end with the test command, whatever ends it.
trap 'for p in "${bg_pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done' EXIT
# bg_wait PID LOG WHAT: waits for a background step, shows its log; its failure fails the
# test command.
bg_wait() {
  local rc=0 p left=()
  wait "$1" || rc=$?
  for p in "${bg_pids[@]}"; do [ "$p" = "$1" ] || left+=("$p"); done
  bg_pids=("${left[@]}")
  cat "$2"
  if [ "$rc" -ne 0 ]; then
    echo "$3 FAILED (exit $rc); its log: $2" >&2
    exit 1
  fi
}

step "system packages"
sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
installed() { dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'; }
apt_install() {
  local need=() p
  for p in "$@"; do installed "$p" || need+=("$p"); done
  [ ${#need[@]} -gt 0 ] || return 0
  [ -n "${apt_updated:-}" ] || { $sudo_ apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}" >/dev/null
}
# Image tools (packer/README.md) with the rest; `prometheus` gives promtool and the server
# for tests/monitoring.rs; nftables gives onesim's partition fault (the edge e2e); gpg,
# gpg-agent and openssh-client's ssh-keygen sign and verify the commits of the
# verified-revision tests. qemu-system-x86 in an apt run before
# qemu-utils: with the machine's preinstalled qemu-utils backport, the two together conflict.
apt_install libxml2-utils musl-tools shellcheck git python3-venv packer systemd openssh-client xz-utils \
  gpg gpg-agent mmdebstrap grub-pc-bin grub2-common e2fsprogs fdisk genisoimage openssl systemd-container \
  prometheus nftables qemu-system-x86
apt_install qemu-utils

step "appliance base root filesystem (background, target/images.log)"
mkdir -p target
: >target/images.log # both background image steps append to it
setsid -w bash packer/scripts/build-image.sh base </dev/null >>target/images.log 2>&1 &
base_pid=$!
bg_pids+=("$base_pid")

step "rust toolchain parts"
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

step "python virtualenv (pinned flwr and pyone)"
venv="$root/target/flower-venv"
# The agents run Flower as an unprivileged user (UID 49999, #17 item 5): the venv's
# interpreter must be one that user can run. The system's Python (the images' too) is;
# a pyenv Python under /root is not. A venv made from another interpreter is rebuilt (the
# venv's `home`: running it as that user is no test, as on this project's machines a pyenv
# venv under the 0700 /root still runs so, while the agent's reach check, which reads the
# path's mode bits, refuses it).
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
home=$(dirname "$(readlink -f "$python")")
if ! cmp -s e2e/requirements.lock "$venv/.requirements.lock" 2>/dev/null ||
  ! grep -qx "home = $home" "$venv/pyvenv.cfg" 2>/dev/null; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r e2e/requirements.lock
  cp e2e/requirements.lock "$venv/.requirements.lock"
fi
export FLOWER_VENV="$venv"
export FLWR_TELEMETRY_ENABLED=0

# The static agent (release, musl) builds beside the lints: two cargo runs on two cores fill
# each other's serial phases (one crate's codegen, linking). They lock different build
# directories (target/debug; target/release and target/x86_64-unknown-linux-musl).
step "static flower-agent (background, target/agent-build.log)"
agent=target/x86_64-unknown-linux-musl/release/flower-agent
setsid -w cargo build --locked --release --no-default-features --target x86_64-unknown-linux-musl \
  --bin flower-agent </dev/null >target/agent-build.log 2>&1 &
agent_pid=$!
bg_pids+=("$agent_pid")

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "static flower-agent"
bg_wait "$agent_pid" target/agent-build.log "the static flower-agent build"
size=$(stat -c %s "$agent")
# Images ship the `dist` profile (thin LTO); the test command builds `release` to save time.
echo "flower-agent static binary (release profile): $((size / 1024)) KiB"
if readelf -d "$agent" | grep -q NEEDED; then echo "flower-agent links shared libraries" >&2; exit 1; fi
"$agent" --version

# The same agent binary and output directory as `make -C packer image`, so the image e2e
# test's own `make` finds them cached (or waits for this build, which holds the lock).
step "appliance images (background, target/images.log)"
bg_wait "$base_pid" /dev/null "the base root filesystem build"
# shellcheck disable=SC2016
AGENT="$root/$agent" setsid -w bash -euc 'for role in superlink supernode; do
    bash packer/scripts/build-image.sh "$role"
    echo "image $role: done at $SECONDS s after the images started"
  done' </dev/null >>target/images.log 2>&1 &
images_pid=$!
bg_pids+=("$images_pid")

# QEMU (TCG) boots the SuperLink's image beside the compile of the tests, never beside the
# real-Flower tests, whose timing it would disturb: the tests wait for it. It needs onesim:
# built as the tests' build builds it (the whole workspace's features with dev-dependencies,
# so nothing is compiled twice; `cargo build -p onesim` would resolve other features),
# beside the images' build.
step "tests: build onesim (beside the images); then the boot test of the SuperLink image (background, target/boot-test.log)"
cargo test --no-run --locked --workspace --test image_runtime
step "appliance images"
bg_wait "$images_pid" target/images.log "the appliance image build"
setsid -w bash packer/scripts/boot-test.sh superlink </dev/null >target/boot-test.log 2>&1 &
boot_pid=$!
bg_pids+=("$boot_pid")

step "tests: build"
cargo nextest run --workspace --locked --profile ci --no-run

step "boot test"
bg_wait "$boot_pid" target/boot-test.log "the boot test"

step "fuzz build, then cargo-deny's install (background, nice 19, target/fuzz-build.log)"
setsid -w nice -n 19 bash -c 'bash e2e/fuzz.sh --build-only && bash e2e/deny.sh --install-only' \
  </dev/null >target/fuzz-build.log 2>&1 &
fuzz_build_pid=$!
bg_pids+=("$fuzz_build_pid")

step "tests"
cargo nextest run --workspace --locked --no-fail-fast --profile ci

step "fuzz build and cargo-deny's install"
bg_wait "$fuzz_build_pid" target/fuzz-build.log "the fuzz build or cargo-deny's install"
step "dependency audit (cargo-deny: advisories, licences, bans, sources)"
bash e2e/deny.sh
step "fuzzing (cargo-fuzz on nightly, every target ${FUZZ_SECONDS:-10}s, one per core at once)"
FUZZ_SECONDS=${FUZZ_SECONDS:-10} bash e2e/fuzz.sh
echo "test command finished in ${SECONDS}s"
