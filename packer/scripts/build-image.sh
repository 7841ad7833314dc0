#!/usr/bin/env bash
# Offline image builder: packer/build/flower-<role>.qcow2 from Debian 12 packages (mmdebstrap)
# and the same recipe the Packer build runs (provision.sh, finalize.sh). Needs root, no
# KVM and no loop device: the filesystem is written with `mkfs.ext4 -d` and GRUB's BIOS
# stages are written into the disk's first sectors (boot.img, core.img).
#
# Two cached layers, each keyed by a SHA-256 of its inputs:
# - the base root filesystem (OUT/base/rootfs, key in OUT/base/.inputs): Debian, the
#   packages and the Flower virtualenv (provision.sh PHASE=base). It depends on no role, so
#   both roles share it and the second role costs only its own layer;
# - the image (OUT/flower-<role>.qcow2, key in .inputs beside it): a copy of the base plus
#   provision.sh PHASE=role (agent, appliance script, units) and finalize.sh, then the disk.
# A run whose image key matches only prints the cached image.
#
# Concurrent runs are safe: one lock per image (OUT/.flower-<role>.lock), held for the whole
# build, and one for the base (OUT/.base.lock), held while it is checked, built and copied
# (always taken in that order). A run that finds a lock taken says so, waits, and then
# normally finds the cache filled by the other run (tests/assets.rs,
# concurrent_image_builds_share_one_base_and_wait_for_each_other).
#
# Usage: build-image.sh ROLE   (env: OUT, AGENT, FLOWER_VERSION, RUNTIME, FLOWER_EXTRAS,
#                               DISK_SIZE, MIRROR, QCOW2_COMPRESSION=zstd|zlib)
#        build-image.sh base   only the base root filesystem (needs no agent), so that it
#                              can be built while the agent compiles (e2e/test-all.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
role="${1:?usage: build-image.sh superlink|supernode|base}"
case "$role" in superlink | supernode | base) ;; *) echo "role must be superlink, supernode or base" >&2; exit 2 ;; esac
out="${OUT:-$repo/packer/build}"
agent="${AGENT:-$repo/target/x86_64-unknown-linux-musl/release/flower-agent}"
version="${FLOWER_VERSION:-1.25.0}"
runtime="${RUNTIME:-process}"
extras="${FLOWER_EXTRAS:-}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
compression="${QCOW2_COMPRESSION:-zstd}"
case "$compression" in zstd | zlib) ;; *) echo "QCOW2_COMPRESSION=$compression: zstd or zlib" >&2; exit 2 ;; esac
if [ -z "${DISK_SIZE:-}" ]; then
  if [ "$role" = superlink ]; then DISK_SIZE=10G; else DISK_SIZE=20G; fi
fi
image="$out/flower-$role.qcow2"
grub_boot_img=/usr/lib/grub/i386-pc/boot.img
if [ "$role" != base ]; then
  [ -x "$agent" ] || { echo "no static flower-agent at $agent (make -C packer agent)" >&2; exit 1; }
  if readelf -d "$agent" | grep -q NEEDED; then echo "$agent is not static" >&2; exit 1; fi
fi
for tool in mmdebstrap unshare mkfs.ext4 sfdisk qemu-img grub-mkimage; do
  command -v "$tool" >/dev/null || { echo "missing $tool (see packer/README.md)" >&2; exit 1; }
done
[ -f "$grub_boot_img" ] || { echo "missing $grub_boot_img (grub-pc-bin)" >&2; exit 1; }

# take_lock FILE WHAT: an exclusive flock on FILE, held until the fd in $lock_fd is closed
# (or the process ends). Says so when another build holds it.
take_lock() {
  exec {lock_fd}>"$1"
  if ! flock -n "$lock_fd"; then
    echo "==> waiting for another build of $2 ($1)"
    flock "$lock_fd"
  fi
}

# The downloaded wheels against packer/wheels.sha256: every file listed, matching, and no
# other file. Only the default set is pinned (the Flower version of e2e/requirements.lock,
# no extras); another version or extras is built unpinned, with a warning.
verify_wheels() {
  local dir=$1 pins="$repo/packer/wheels.sha256"
  if [ "$version" != "$(sed -n 's/^flwr==//p' "$repo/e2e/requirements.lock")" ] || [ -n "$extras" ]; then
    echo "WARNING: Flower $version with extras '$extras' is not the pinned set: its wheels are not checked against $pins"
    return 0
  fi
  (cd "$dir" && sha256sum --check --strict --quiet <(grep -v '^#' "$pins")) || {
    echo "the downloaded wheels do not match $pins (above)" >&2
    return 1
  }
  local extra
  extra=$(comm -13 <(grep -v '^#' "$pins" | awk '{print $2}' | sort) <(find "$dir" -maxdepth 1 -type f -printf '%f\n' | sort))
  [ -z "$extra" ] || { echo "wheels not pinned in $pins: $extra" >&2; return 1; }
  echo "wheels: $(grep -vc '^#' "$pins") files match $pins"
}

# The base root filesystem, built into OUT/base.new and renamed when complete.
build_base() {
  local stage="$work/base-stage" new="$out/base.new"
  rm -rf "$new"
  mkdir -p "$stage" "$new"
  cp "$repo/e2e/requirements.lock" "$here/provision.sh" "$stage/"
  # Flower's wheels are fetched by the host's pip (its index and CA settings) for the
  # image's Python (Debian 12: CPython 3.11, glibc 2.36), cached per lock file, version and
  # extras; provision.sh installs from them with no index.
  grep -v '^flwr==' "$repo/e2e/requirements.lock" >"$work/constraints.txt"
  local extra_reqs
  read -r -a extra_reqs <<<"$extras"
  local wheels
  wheels="$out/wheels-$(cat "$work/constraints.txt" - <<<"$version $extras" | sha256sum | cut -c1-16)"
  if [ ! -d "$wheels" ]; then
    echo "==> Flower $version wheels (PyPI)"
    rm -rf "$wheels.tmp"
    # pip does not widen an explicit --platform to older glibc tags: list them all.
    local platforms=() v
    for v in 5 12 17 24 27 28 31 34 35 36; do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
    python3 -m pip download -q --disable-pip-version-check --only-binary=:all: \
      "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
      -d "$wheels.tmp" -c "$work/constraints.txt" "flwr==$version" numpy "${extra_reqs[@]}"
    mv "$wheels.tmp" "$wheels"
  fi
  # Checked on every use, cached or fresh: a cache is only as good as its last check.
  verify_wheels "$wheels"
  cp -r "$wheels" "$stage/wheels"

  echo "==> base root filesystem: Debian 12 + packages + Flower venv (provision.sh PHASE=base)"
  # mmdebstrap expands "$1" (the root) in its hooks.
  # shellcheck disable=SC2016
  # Quiet base: systemd, udev, a kernel, networkd for the context's network. The recipe adds
  # the rest. mmdebstrap removes apt's lists and caches at the end.
  # force-unsafe-io: dpkg skips its fsync per unpacked file (the root is only ever read back
  # by this script), which is most of the wall time on a busy disk.
  mmdebstrap --mode=root --variant=minbase --format=directory --dpkgopt=force-unsafe-io \
    --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='Acquire::Check-Date "false"' \
    --include=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,e2fsprogs,util-linux,mount,procps,less,netbase \
    --customize-hook="copy-in $stage /tmp" \
    --customize-hook="chroot \"\$1\" env PHASE=base FLOWER_STAGE=/tmp/base-stage FLOWER_VERSION=$version RUNTIME=$runtime FLOWER_EXTRAS=\"$extras\" bash /tmp/base-stage/provision.sh" \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
    --customize-hook='rm -rf "$1/tmp/base-stage"' \
    bookworm "$new/rootfs" "$mirror" >"$work/mmdebstrap.log" 2>&1 || {
    tail -40 "$work/mmdebstrap.log" >&2
    rm -rf "$new"
    exit 1
  }
  # mmdebstrap unmounts what it mounted in the root, but a busy mount point (anything
  # holding a directory open in the root's /proc, say) makes its umount fail with only a
  # warning. Detach what is left (cp -a and mkfs.ext4 -d would copy /proc into the images).
  local m
  mounts_in() { awk -v r="$1/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r; }
  for m in $(mounts_in "$new"); do
    echo "    detaching $m, left mounted by mmdebstrap"
    umount -l "$m" || true
  done
  if [ -n "$(mounts_in "$new")" ]; then
    echo "mounts left in $new (unmount them, then retry): $(mounts_in "$new")" >&2
    exit 1
  fi
  echo "$base_inputs" >"$new/.inputs"
  rm -rf "$out/base"
  mv "$new" "$out/base"
  echo "    base: $(du -sm "$out/base/rootfs" | cut -f1) MiB, built in ${SECONDS}s"
}

hash_of() { sha256sum | awk '{print $1}'; }
# The base's key covers build_base's own text (not the whole of this script), so that an edit
# to the role or disk steps leaves the base cached.
base_inputs=$(
  {
    printf 'version=%s runtime=%s extras=%s mirror=%s\n' "$version" "$runtime" "$extras" "$mirror"
    declare -f build_base
    declare -f verify_wheels
    sha256sum "$here/provision.sh" "$repo/e2e/requirements.lock" "$repo/packer/wheels.sha256" | awk '{print $1}'
  } | hash_of
)
base_cached() { [ "$(cat "$out/base/.inputs" 2>/dev/null)" = "$base_inputs" ] && [ -d "$out/base/rootfs" ]; }
inputs=$(
  [ "$role" = base ] && exit 0
  {
    printf 'base=%s role=%s disk=%s compression=%s\n' "$base_inputs" "$role" "$DISK_SIZE" "$compression"
    sha256sum "$agent" "$here/build-image.sh" "$here/finalize.sh" \
      "$repo/packer/files/ssh-hostkeys.service" "$repo/appliance/$role/appliance.sh" |
      awk '{print $1}'
  } | hash_of
)
cached() { [ -f "$image" ] && [ "$(cat "$image.inputs" 2>/dev/null)" = "$inputs" ]; }
say_cached() { echo "flower-$role.qcow2: cached ($inputs), $(du -m "$image" | cut -f1) MiB"; }
if [ "$role" = base ]; then
  base_cached && { echo "base root filesystem: cached ($base_inputs)"; exit 0; }
elif cached; then
  say_cached
  exit 0
fi

mkdir -p "$out"
SECONDS=0
work=$(mktemp -d "$out/.work-$role.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The role's root and its ext4 filesystem, in a private mount namespace (unshare) so that
# every mount ends with it, whatever happens: an overlay over the read-only base (the base is
# never copied nor changed), and /proc, /sys and /dev for the recipe's chroot, unmounted
# before mkfs.ext4 -d reads the root.
# Usage: role_fs BASE WORK RAW UUID ROLE VAR=value... (the recipe's environment)
role_fs() {
  local base=$1 work=$2 raw=$3 uuid=$4 role=$5
  shift 5
  local r="$work/rootfs" script
  mkdir -p "$work/upper" "$work/overlay-work" "$r"
  mount -t overlay overlay -o "lowerdir=$base,upperdir=$work/upper,workdir=$work/overlay-work" "$r"
  cp -r "$work/stage" "$r/tmp/flower-provision"
  mount -t proc proc "$r/proc"
  mount -t sysfs sysfs "$r/sys"
  mount --rbind /dev "$r/dev"
  for script in provision.sh finalize.sh; do
    chroot "$r" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      HOME=/root LC_ALL=C.UTF-8 "$@" bash "/tmp/flower-provision/$script"
  done
  umount -l "$r/dev"
  umount "$r/sys" "$r/proc"
  rm -rf "$r/tmp/flower-provision"
  echo "    $(du -sm "$r" | cut -f1) MiB in the root filesystem"

  local kernel initrd
  kernel=$(find "$r/boot" -maxdepth 1 -name "vmlinuz-*" -printf "%f\n" | sort -V | tail -1)
  initrd="initrd.img-${kernel#vmlinuz-}"
  [ -f "$r/boot/$initrd" ] || { echo "no $initrd in the image" >&2; return 1; }
  printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" >"$r/etc/fstab"
  echo localhost >"$r/etc/hostname"
  mkdir -p "$r/boot/grub"
  cat >"$r/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry "Flower $role" {
  linux /boot/$kernel root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8
  initrd /boot/$initrd
}
CFG
  # ext4 without the features GRUB 2.06 cannot read.
  mkfs.ext4 -q -F -U "$uuid" -L flower-root -O ^metadata_csum_seed,^orphan_file \
    -E offset=$((2048 * 512)) -d "$r" "$raw" \
    "$(($(stat -c %s "$raw") / 1024 - 1024))"
}

if [ "$role" != base ]; then
  take_lock "$out/.flower-$role.lock" "flower-$role.qcow2"
  if cached; then say_cached; exit 0; fi
fi
# The base: a shared lock while it is used (by this run's overlay), an exclusive one to
# build it. flock converts a lock by releasing it first, so the base is checked again after.
exec {base_fd}>"$out/.base.lock"
base_lock() {
  if ! flock -n "$1" "$base_fd"; then
    echo "==> waiting for another build of the base root filesystem ($out/.base.lock)"
    flock "$1" "$base_fd"
  fi
}
while :; do
  base_lock -s
  if base_cached; then echo "==> base root filesystem: cached ($base_inputs)"; break; fi
  flock -u "$base_fd"
  base_lock -x
  base_cached || build_base
  [ "$role" = base ] && exit 0
  flock -s "$base_fd"
  base_cached && break
done
[ "$role" = base ] && exit 0
base_done=$SECONDS

echo "==> $role: agent, appliance, units (provision.sh PHASE=role), finalize.sh; ext4"
stage="$work/stage"
mkdir -p "$stage"
cp "$agent" "$stage/flower-agent"
cp "$repo/appliance/$role/appliance.sh" "$stage/appliance.sh"
cp "$repo/e2e/requirements.lock" "$repo/packer/files/ssh-hostkeys.service" \
  "$here/provision.sh" "$here/finalize.sh" "$stage/"
raw="$work/disk.raw"
truncate -s "$DISK_SIZE" "$raw"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$raw"
uuid=$(cat /proc/sys/kernel/random/uuid)
unshare --mount --propagation private -- bash -euc "$(declare -f role_fs)"'; role_fs "$@"' _ \
  "$out/base/rootfs" "$work" "$raw" "$uuid" "$role" \
  PHASE=role FLOWER_STAGE=/tmp/flower-provision ROLE="$role" \
  FLOWER_VERSION="$version" RUNTIME="$runtime" FLOWER_EXTRAS="$extras" \
  >"$work/role.log" 2>&1 || {
  tail -40 "$work/role.log" >&2
  exit 1
}
grep '^    ' "$work/role.log" || true
echo "    ${role} root and filesystem in $((SECONDS - base_done))s"

echo "==> disk: MBR, GRUB (BIOS), serial console"
grub-mkimage -O i386-pc -o "$work/core.img" -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2 normal linux serial terminal echo test
core_sectors=$((($(stat -c %s "$work/core.img") + 511) / 512))
[ "$core_sectors" -lt 2047 ] || { echo "core.img does not fit before the partition" >&2; exit 1; }
# boot.img's code (not the partition table) in sector 0; core.img from sector 1 on, where
# boot.img and core.img's own block list expect it.
dd if="$grub_boot_img" of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none
disk_done=$SECONDS

echo "==> qcow2 ($compression-compressed)"
# zstd: about 7 times faster than zlib here (5 s against 41 s for a SuperLink) and a little
# smaller; readable by QEMU >= 5.1. -W: compress clusters in parallel, written out of order.
qemu-img convert -c -W -o compression_type="$compression" -O qcow2 "$raw" "$work/image.qcow2"
mv "$work/image.qcow2" "$image"
echo "$inputs" >"$image.inputs"
echo "    qcow2 in $((SECONDS - disk_done))s"
echo "flower-$role.qcow2: $(du -m "$image" | cut -f1) MiB (virtual $DISK_SIZE), built in ${SECONDS}s (base ${base_done}s)"
