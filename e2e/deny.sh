#!/usr/bin/env bash
# The dependency audit: cargo-deny checks the workspace's and the fuzz crate's dependency
# graphs against deny.toml — RustSec advisories (vulnerabilities, unsound, yanked,
# unmaintained direct dependencies), licences, banned crates, sources. Any finding fails.
#
#   e2e/deny.sh                          install cargo-deny (pinned) if missing, then check
#   e2e/deny.sh --install-only           the install alone (the test command runs it in the
#                                        background beside its tests)
#   e2e/deny.sh --refresh-snapshot CLONE replace the advisory snapshot with CLONE's HEAD
#                                        (CLONE: a clone of github.com/RustSec/advisory-db)
#
# The advisory database: the live one when github.com answers; otherwise (this project's
# CI machines reach only the package registries) the checked-in snapshot
# supply-chain/advisory-db.tar.xz, verified against supply-chain/advisory-db.lock. The
# output says which, and the snapshot's age: refresh it when it passes 90 days.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.20.2

have_deny() { cargo deny --version 2>/dev/null | grep -qx "cargo-deny $version"; }
have_deny || cargo install --locked --quiet "cargo-deny@$version"
[ "${1:-}" != --install-only ] || exit 0

# shellcheck source=/dev/null
. supply-chain/advisory-db.lock

if [ "${1:-}" = --refresh-snapshot ]; then
  clone=${2:?usage: e2e/deny.sh --refresh-snapshot CLONE}
  commit=$(git -C "$clone" rev-parse HEAD)
  date=$(git -C "$clone" log -1 --format=%cI HEAD)
  git -C "$clone" archive --prefix=advisory-db/ "$commit" | xz -9e >supply-chain/advisory-db.tar.xz
  sum=$(sha256sum supply-chain/advisory-db.tar.xz | cut -d' ' -f1)
  sed -i -e "s/^SNAPSHOT_COMMIT=.*/SNAPSHOT_COMMIT=$commit/" \
    -e "s/^SNAPSHOT_DATE=.*/SNAPSHOT_DATE=$date/" -e "s/^SNAPSHOT_SHA256=.*/SNAPSHOT_SHA256=$sum/" supply-chain/advisory-db.lock
  echo "advisory snapshot: $commit of $date"
  exit 0
fi

# cargo-deny keeps the database of db-urls[0] in this directory under deny.toml's db-path.
db=target/advisory-dbs/advisory-db-3157b0e258782691
mkdir -p target/advisory-dbs
# An unpacked snapshot is not a clone: never let cargo-deny try to update it.
[ ! -f "$db/.flower-snapshot" ] || rm -rf "$db"
if timeout 60 cargo deny --log-level error fetch db >target/advisory-fetch.log 2>&1; then
  source="the live RustSec database ($(git -C "$db" log -1 --format='%h of %cs'))"
else
  echo "the live RustSec database is unreachable ($(grep -m1 -o 'fatal: .*' target/advisory-fetch.log || echo 'see target/advisory-fetch.log')); using the snapshot"
  echo "$SNAPSHOT_SHA256  supply-chain/advisory-db.tar.xz" | sha256sum --check --quiet
  rm -rf "$db" && mkdir -p "$db"
  tar -xJf supply-chain/advisory-db.tar.xz -C "$db" --strip-components=1
  # cargo-deny reads the database's date from its HEAD commit: commit it with the
  # snapshot's own date, so the age it reports is the data's.
  git -C "$db" init -q
  git -C "$db" add -A
  GIT_AUTHOR_DATE=$SNAPSHOT_DATE GIT_COMMITTER_DATE=$SNAPSHOT_DATE git -C "$db" -c user.name=snapshot \
    -c user.email=snapshot@localhost commit -q -m "RustSec advisory-db $SNAPSHOT_COMMIT"
  touch "$db/.flower-snapshot"
  age=$((($(date +%s) - $(date -d "$SNAPSHOT_DATE" +%s)) / 86400))
  source="the checked-in snapshot of RustSec/advisory-db ${SNAPSHOT_COMMIT:0:12} (${SNAPSHOT_DATE%%T*}, $age days old)"
  [ "$age" -le 90 ] || echo "WARNING: the advisory snapshot is $age days old: refresh it (e2e/deny.sh --refresh-snapshot)"
fi

for manifest in Cargo.toml fuzz/Cargo.toml; do
  # cargo-deny reads the whole graph, every platform's dependencies included, but runs
  # offline: fetch what no build here needed (criterion -> half -> crunchy is spirv-only).
  cargo fetch --locked --quiet --manifest-path "$manifest"
  cargo deny --offline --manifest-path "$manifest" --config deny.toml check \
    --hide-inclusion-graph --show-stats || {
    echo "cargo-deny: $manifest FAILED (above)" >&2
    exit 1
  }
done
echo "cargo-deny: advisories, bans, licences and sources ok against $source"
