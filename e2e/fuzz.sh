#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every reader of untrusted input; the
# targets are listed in fuzz/Cargo.toml, their harnesses in src/fuzzing.rs.
#
#   e2e/fuzz.sh                   every target for FUZZ_SECONDS (default 15) each, FUZZ_JOBS
#                                 (default: the cores) at once, as the test command runs it
#   e2e/fuzz.sh TARGET [SECONDS]  one target, longer (default 600 s)
#   e2e/fuzz.sh --build-only      the build alone (the test command runs it in the background
#                                 at the lowest CPU priority beside its tests, then runs the
#                                 targets, when the build is a no-op)
#
# Installs what it needs (the nightly toolchain, cargo-fuzz). Inputs that find new coverage
# go to target/fuzz/corpus/TARGET (never into the checked-in seeds), crashes to
# target/fuzz/artifacts/TARGET/; any crash fails the script. Keep a crash as a regression:
# copy it to fuzz/regressions/TARGET/ (tests/fuzz_regressions.rs then runs it on stable).
#
# Cost (measured here, 2 cores shared with three other builds): the build is ~11 CPU-minutes
# (cargo-fuzz forces one codegen unit per crate), cargo-fuzz installs in ~1 CPU-minute, the
# runs take 7 x FUZZ_SECONDS / FUZZ_JOBS. Choices:
# - one `cargo fuzz build` for all targets, then the binaries run directly (no per-target
#   cargo invocation);
# - `-s none`: no AddressSanitizer. The crate forbids unsafe code, so ASan could only find
#   memory errors in dependencies' unsafe code, at about twice the execution cost;
#   panics, timeouts and memory blow-ups are caught and saved without it. A stack
#   overflow kills the process before libFuzzer can save the input (nothing else sets up
#   an alternate signal stack): the run fails, and `FUZZ_SANITIZER=address` captures it;
# - cargo-fuzz's default profile: optimised, with debug assertions and overflow checks, so
#   an arithmetic overflow that would wrap silently in release is a crash here;
# - `-max_total_time` per target; `-max_len` caps inputs (64 KiB, far above real specs,
#   contexts, plans and OneFlow/OneGate bodies; 1 MiB for oned answers, which are large);
#   `-timeout=3` (inputs take milliseconds; a 64 KiB spec needing seconds is a quadratic
#   blow-up) and `-rss_limit_mb`/`-malloc_limit_mb` make a time or memory blow-up a
#   finding rather than a hang; one fuzzing process per target on one core (libFuzzer's
#   default; `-jobs=1` would fork a worker logging to ./fuzz-0.log instead), the targets
#   in parallel up to FUZZ_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

build_only=""
[ "${1:-}" = --build-only ] && { build_only=1; shift; }
only=${1:-}
if [ -n "$only" ]; then seconds=${2:-600}; else seconds=${FUZZ_SECONDS:-15}; fi

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2

started=$SECONDS
cargo +nightly fuzz build -s "${FUZZ_SANITIZER:-none}" --target-dir target/fuzz
echo "fuzz build: $((SECONDS - started)) s"
[ -z "$build_only" ] || exit 0

bin="$root/target/fuzz/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
targets=${only:-$(cargo +nightly fuzz list)}

# The controller parses on tokio and blocking-pool threads, which have 2 MiB stacks;
# libFuzzer runs inputs on the main thread, whose stack this limits to the same.
ulimit -s 2048
# One target: its summary line, or its log's tail and the reason on stderr and exit 1.
fuzz_one() {
  local t=$1 work artifacts seeds log max_len rc=0 runs
  work="$root/target/fuzz/corpus/$t"
  artifacts="$root/target/fuzz/artifacts/$t"
  mkdir -p "$work" "$artifacts"
  seeds=("fuzz/corpus/$t")
  [ -d "fuzz/regressions/$t" ] && seeds+=("fuzz/regressions/$t")
  log="$root/target/fuzz/$t.log"
  case $t in
    xmlrpc_response | vm_pool) max_len=1048576 ;; # oned answers are legitimately large
    *) max_len=65536 ;;
  esac
  "$bin/$t" -max_total_time="$seconds" -max_len="$max_len" -timeout=3 \
    -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" \
    "$work" "${seeds[@]}" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$log" >&2
    if [ "$rc" -gt 128 ]; then
      # Without a sanitizer nothing catches a stack overflow: the process dies by signal
      # before libFuzzer can save the input. AddressSanitizer reports and saves it.
      echo "fuzz $t: DIED BY SIGNAL $((rc - 128)) (a stack overflow?) without saving the input;" >&2
      echo "capture it with: FUZZ_SANITIZER=address e2e/fuzz.sh $t 600" >&2
    else
      echo "fuzz $t: FOUND A CRASH, TIMEOUT OR OOM (input in $artifacts/, log $log)." >&2
      echo "Keep it as a regression: copy it to fuzz/regressions/$t/, then fix it." >&2
    fi
    return 1
  fi
  runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 \2/p' "$log" | tail -n 1)
  echo "fuzz $t: ${runs% *} runs in ${runs#* } s (target/fuzz/corpus/$t: $(find "$work" -type f | wc -l) inputs)"
}
for t in $targets; do
  [ -x "$bin/$t" ] || { echo "fuzz: no target $t (see fuzz/Cargo.toml)" >&2; exit 1; }
done
# A libFuzzer process fuzzes on one core: FUZZ_JOBS targets (default: one per core) run at
# once, each for its whole time, so the wall time is the targets' total divided by the jobs.
jobs=${FUZZ_JOBS:-$(nproc)}
failed=0 running=0
for t in $targets; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  fuzz_one "$t" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
[ "$failed" -eq 0 ] || { echo "fuzz: a target failed (above)" >&2; exit 1; }
echo "fuzz: finished in $((SECONDS - started)) s"
