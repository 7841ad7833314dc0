#!/usr/bin/env bash
# Verifies every systemd unit the images carry with `systemd-analyze verify`, in a scratch
# root laid out like the image: the units `flower-agent install` writes and packer/files/.
# Any complaint (even a warning) fails.
#
# Env: AGENT (a flower-agent binary; default: the debug build), FILES (default packer/files).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
agent="${AGENT:-$repo/target/debug/flower-agent}"
files="${FILES:-$repo/packer/files}"
[ -x "$agent" ] || { echo "no flower-agent at $agent" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/etc/systemd/system"
ln -s usr/lib "$root/lib"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp /usr/bin/ssh-keygen "$root/usr/bin/" 2>/dev/null || install -m 0755 /bin/true "$root/usr/bin/ssh-keygen"
"$agent" --root "$root" --context /nonexistent --role superlink install >/dev/null 2>&1
for unit in "$files"/*.service; do
  cp "$unit" "$root/etc/systemd/system/flower-$(basename "$unit" | sed 's/^flower-//')"
done
units=("$root"/etc/systemd/system/*.service)
out=$(systemd-analyze verify --root="$root" "${units[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then echo "$out" >&2; exit 1; fi
echo "units verified: $(basename -a "${units[@]}" | tr '\n' ' ')"
