#!/usr/bin/env bash
# onesim's guest command in the boot test: turns the VM's context (context.sh, token.txt,
# written by onesim like oned) into a CONTEXT CD the way OpenNebula's tm drivers do
# (mkisofs -V CONTEXT -J -R), then boots the image on a throwaway overlay under QEMU with
# user-mode networking. onesim stops it by signalling the process group.
#
# Usage: boot-vm.sh VM_DIR IMAGE FLEET_HOST_PORT
set -euo pipefail
vm_dir="$1"
image="$2"
fleet_port="$3"
genisoimage -quiet -V CONTEXT -J -R -o "$vm_dir/context.iso" \
  "$vm_dir/context/context.sh" "$vm_dir/context/token.txt"
qemu-img create -q -f qcow2 -F qcow2 -b "$image" "$vm_dir/overlay.qcow2"
# Nested KVM hangs in early boot on these machines: TCG unless BOOT_ACCEL=kvm. TCG with
# one host thread per virtual CPU (thread=multi), so the guest's two CPUs use both cores.
accel="${BOOT_ACCEL:-tcg}"
cpu=max
if [ "$accel" = kvm ]; then cpu=host; else accel=tcg,thread=multi; fi
exec qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -smp 2 -m 2048 \
  -display none -serial "file:$vm_dir/console.log" -monitor none \
  -drive "file=$vm_dir/overlay.qcow2,if=virtio,format=qcow2" \
  -drive "file=$vm_dir/context.iso,media=cdrom,readonly=on" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$fleet_port-10.0.2.15:9092" \
  -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
