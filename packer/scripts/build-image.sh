#!/usr/bin/env bash
# Offline image builder: packer/build/flower-<role>.qcow2 from Debian 12 packages (mmdebstrap)
# and the same recipe the Packer build runs (provision.sh, finalize.sh). Needs root, no
# KVM, no loop device and no mount: the filesystem is written with `mkfs.ext4 -d` and GRUB's
# BIOS stages are written into the disk's first sectors (boot.img, core.img).
#
# The result is cached by a hash of every input (.inputs beside the image): a second run
# with the same inputs only prints the cached image.
#
# Usage: build-image.sh ROLE   (env: OUT, AGENT, FLOWER_VERSION, RUNTIME, FLOWER_EXTRAS,
#                               DISK_SIZE, MIRROR)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
role="${1:?usage: build-image.sh superlink|supernode}"
case "$role" in superlink | supernode) ;; *) echo "role must be superlink or supernode" >&2; exit 2 ;; esac
out="${OUT:-$repo/packer/build}"
agent="${AGENT:-$repo/target/x86_64-unknown-linux-musl/release/flower-agent}"
version="${FLOWER_VERSION:-1.25.0}"
runtime="${RUNTIME:-process}"
extras="${FLOWER_EXTRAS:-}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
if [ -z "${DISK_SIZE:-}" ]; then
  if [ "$role" = superlink ]; then DISK_SIZE=10G; else DISK_SIZE=20G; fi
fi
image="$out/flower-$role.qcow2"
[ -x "$agent" ] || { echo "no static flower-agent at $agent (make -C packer agent)" >&2; exit 1; }
if readelf -d "$agent" | grep -q NEEDED; then echo "$agent is not static" >&2; exit 1; fi
for tool in mmdebstrap mkfs.ext4 sfdisk qemu-img grub-mkimage; do
  command -v "$tool" >/dev/null || { echo "missing $tool (see packer/README.md)" >&2; exit 1; }
done

inputs=$(
  {
    printf 'role=%s version=%s runtime=%s extras=%s disk=%s mirror=%s\n' \
      "$role" "$version" "$runtime" "$extras" "$DISK_SIZE" "$mirror"
    sha256sum "$agent" "$here/provision.sh" "$here/finalize.sh" "$here/build-image.sh" \
      "$repo/packer/files/ssh-hostkeys.service" "$repo/appliance/$role/appliance.sh" \
      "$repo/e2e/requirements.lock" | awk '{print $1}'
  } | sha256sum | awk '{print $1}'
)
if [ -f "$image" ] && [ "$(cat "$image.inputs" 2>/dev/null)" = "$inputs" ]; then
  echo "flower-$role.qcow2: cached ($inputs), $(du -m "$image" | cut -f1) MiB"
  exit 0
fi

SECONDS=0
mkdir -p "$out"
work=$(mktemp -d "$out/.work-$role.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage="$work/stage"
mkdir -p "$stage"
cp "$agent" "$stage/flower-agent"
cp "$repo/appliance/$role/appliance.sh" "$stage/appliance.sh"
cp "$repo/e2e/requirements.lock" "$stage/requirements.lock"
cp "$repo/packer/files/ssh-hostkeys.service" "$here/provision.sh" "$here/finalize.sh" "$stage/"
# Flower's wheels are fetched by the host's pip (its index and CA settings) for the image's
# Python (Debian 12: CPython 3.11, glibc 2.36), cached per lock file, version and extras;
# provision.sh installs from them with no index.
grep -v '^flwr==' "$repo/e2e/requirements.lock" >"$work/constraints.txt"
read -r -a extra_reqs <<<"$extras"
wheels="$out/wheels-$(cat "$work/constraints.txt" - <<<"$version $extras" | sha256sum | cut -c1-16)"
if [ ! -d "$wheels" ]; then
  echo "==> Flower $version wheels (PyPI)"
  rm -rf "$wheels.tmp"
  # pip does not widen an explicit --platform to older glibc tags: list them all.
  platforms=()
  for v in 5 12 17 24 27 28 31 34 35 36; do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
  python3 -m pip download -q --disable-pip-version-check --only-binary=:all: \
    "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
    -d "$wheels.tmp" -c "$work/constraints.txt" "flwr==$version" numpy "${extra_reqs[@]}"
  mv "$wheels.tmp" "$wheels"
fi
cp -r "$wheels" "$stage/wheels"

echo "==> Debian 12 root filesystem + recipe ($role)"
rootfs="$work/rootfs"
# mmdebstrap expands "$1" (the root) in its hooks.
# shellcheck disable=SC2016
# Quiet base: systemd, udev, a kernel, networkd for the context's network. The recipe adds
# the rest. Package lists and caches go with finalize.sh.
mmdebstrap --mode=root --variant=minbase --format=directory \
  --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='Acquire::Check-Date "false"' \
  --include=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,e2fsprogs,util-linux,mount,procps,less,netbase \
  --customize-hook="copy-in $stage /tmp" \
  --customize-hook='mv "$1/tmp/stage" "$1/tmp/flower-provision"' \
  --customize-hook="chroot \"\$1\" env FLOWER_STAGE=/tmp/flower-provision ROLE=$role FLOWER_VERSION=$version RUNTIME=$runtime FLOWER_EXTRAS=\"$extras\" bash /tmp/flower-provision/provision.sh" \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
  --customize-hook='chroot "$1" bash /tmp/flower-provision/finalize.sh' \
  bookworm "$rootfs" "$mirror" >"$work/mmdebstrap.log" 2>&1 || {
  tail -40 "$work/mmdebstrap.log" >&2
  exit 1
}
echo "    $(du -sm "$rootfs" | cut -f1) MiB in the root filesystem (${SECONDS}s)"

echo "==> disk: MBR, ext4 root, GRUB (BIOS), serial console"
uuid=$(cat /proc/sys/kernel/random/uuid)
kernel=$(find "$rootfs/boot" -maxdepth 1 -name "vmlinuz-*" -printf "%f\n" | sort -V | tail -1)
initrd="initrd.img-${kernel#vmlinuz-}"
[ -f "$rootfs/boot/$initrd" ] || { echo "no $initrd in the image" >&2; exit 1; }
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" >"$rootfs/etc/fstab"
echo localhost >"$rootfs/etc/hostname"
mkdir -p "$rootfs/boot/grub"
cat >"$rootfs/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry "Flower $role" {
  linux /boot/$kernel root=UUID=$uuid ro console=tty0 console=ttyS0,115200n8
  initrd /boot/$initrd
}
CFG
raw="$work/disk.raw"
truncate -s "$DISK_SIZE" "$raw"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$raw"
# ext4 without the features GRUB 2.06 cannot read.
mkfs.ext4 -q -F -U "$uuid" -L flower-root -O ^metadata_csum_seed,^orphan_file \
  -E offset=$((2048 * 512)) -d "$rootfs" "$raw" \
  "$(($(stat -c %s "$raw") / 1024 - 1024))"
grub-mkimage -O i386-pc -o "$work/core.img" -p '(hd0,msdos1)/boot/grub' \
  biosdisk part_msdos ext2 normal linux serial terminal echo test
core_sectors=$((($(stat -c %s "$work/core.img") + 511) / 512))
[ "$core_sectors" -lt 2047 ] || { echo "core.img does not fit before the partition" >&2; exit 1; }
# boot.img's code (not the partition table) in sector 0; core.img from sector 1 on, where
# boot.img and core.img's own block list expect it.
dd if=/usr/lib/grub/i386-pc/boot.img of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none

echo "==> qcow2"
qemu-img convert -c -O qcow2 "$raw" "$work/image.qcow2"
mv "$work/image.qcow2" "$image"
echo "$inputs" >"$image.inputs"
echo "flower-$role.qcow2: $(du -m "$image" | cut -f1) MiB (virtual $DISK_SIZE), built in ${SECONDS}s"
