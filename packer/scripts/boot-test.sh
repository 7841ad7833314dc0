#!/usr/bin/env bash
# Boot test of an offline-built image: onesim on the host plays oned and OneGate, boots the
# SuperLink image as a QEMU guest (boot-vm.sh) with a CONTEXT CD, and the test waits until
# the VM reports READY=YES with FL_READY, FL_ENDPOINT and FL_CA_CERT, then checks that the
# Fleet API answers TLS (verified against FL_CA_CERT) on a forwarded port.
#
# The network is QEMU's user-mode NAT: the guest is 10.0.2.15/24, the host 10.0.2.2, so the
# VM template gives ETH0_* by hand (as NETWORK=YES would from a NIC) and onesim advertises
# OneGate at http://10.0.2.2:PORT (oned.conf's ONEGATE_ENDPOINT).
#
# Usage: boot-test.sh superlink   (env: OUT, ONESIM, BOOT_TIMEOUT seconds, BOOT_ACCEL)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
role="${1:-superlink}"
[ "$role" = superlink ] || { echo "the boot test boots the SuperLink (a SuperNode needs one)" >&2; exit 2; }
out="${OUT:-$repo/packer/build}"
image="$out/flower-$role.qcow2"
onesim="${ONESIM:-$repo/target/debug/onesim}"
timeout="${BOOT_TIMEOUT:-600}"
[ -f "$image" ] || { echo "no $image (make -C packer image ROLE=$role)" >&2; exit 1; }
[ -x "$onesim" ] || { echo "no onesim at $onesim (cargo build -p onesim)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/flower-boot-test.XXXXXX")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gate_port=$(free_port)
fleet_port=$(free_port)
password=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
onesim_pid=""
cleanup() {
  local rc=$?
  if [ -n "$onesim_pid" ]; then kill "$onesim_pid" 2>/dev/null || true; wait "$onesim_pid" 2>/dev/null || true; fi
  if [ "$rc" -ne 0 ]; then
    echo "boot test failed; guest console (last 60 lines):" >&2
    find "$work" -name console.log -exec tail -60 {} \; >&2 || true
    echo "(kept $work)" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

"$onesim" --bind 127.0.0.1 --xmlrpc-port 0 --oneflow-port 0 --onegate-port "$gate_port" \
  --control-port 0 --auth "oneadmin:$password" --runtime process --base-dir "$work/vms" \
  --vm-step 100ms --kill-grace 10s --onegate-endpoint "http://10.0.2.2:$gate_port" \
  --guest-cmd bash "$here/boot-vm.sh" '{vm_dir}' "$image" "$fleet_port" \
  >"$work/onesim.out" 2>"$work/onesim.log" &
onesim_pid=$!
for _ in $(seq 100); do grep -q '^onesim ready' "$work/onesim.out" 2>/dev/null && break; sleep 0.1; done
xmlrpc=$(sed -n 's/^onesim ready xmlrpc=\([^ ]*\) .*/\1/p' "$work/onesim.out")
[ -n "$xmlrpc" ] || { cat "$work/onesim.log" >&2; exit 1; }

ssh-keygen -q -t ed25519 -N '' -f "$work/id_ed25519"
SECONDS=0
# Instantiate, wait for READY and the SuperLink's attributes, decode the CA.
XMLRPC="$xmlrpc" AUTH="oneadmin:$password" PUBKEY="$(cat "$work/id_ed25519.pub")" \
  TIMEOUT="$timeout" CA_OUT="$work/ca.pem" python3 - <<'PY'
import base64, os, sys, time, xmlrpc.client
import xml.etree.ElementTree as ET
one = xmlrpc.client.ServerProxy(os.environ["XMLRPC"])
auth = os.environ["AUTH"]
template = f'''NAME = "flower-superlink-boot-test"
CPU = 2
MEMORY = 2048
CONTEXT = [
  TOKEN = "YES",
  REPORT_READY = "YES",
  SSH_PUBLIC_KEY = "{os.environ["PUBKEY"]}",
  SET_HOSTNAME = "flower-superlink",
  ETH0_MAC = "52:54:00:12:34:56",
  ETH0_IP = "10.0.2.15",
  ETH0_MASK = "255.255.255.0",
  ETH0_GATEWAY = "10.0.2.2",
  ETH0_DNS = "10.0.2.3",
  ONEAPP_FL_TLS_ENABLED = "YES",
  ONEAPP_FL_CLUSTER_NAME = "boot-test" ]
'''
ok, tid, *_ = one.one.template.allocate(auth, template)
assert ok, tid
ok, vmid, *_ = one.one.template.instantiate(auth, tid, "flower-superlink-0", False, "", False)
assert ok, vmid
start = time.monotonic()
want = ["READY", "FL_READY", "FL_ENDPOINT", "FL_CA_CERT"]
seen = {}
while time.monotonic() - start < float(os.environ["TIMEOUT"]):
    ok, body, *_ = one.one.vm.info(auth, vmid)
    assert ok, body
    ut = ET.fromstring(body).find("USER_TEMPLATE")
    attrs = {c.tag: (c.text or "") for c in ut} if ut is not None else {}
    for k in want:
        if k in attrs and k not in seen:
            seen[k] = time.monotonic() - start
            print(f"    {k} after {seen[k]:.0f}s", flush=True)
    if attrs.get("FL_ERROR"):
        sys.exit(f"the VM reported FL_ERROR: {attrs['FL_ERROR']}")
    if all(k in attrs for k in want):
        assert attrs["READY"] == "YES", attrs["READY"]
        assert attrs["FL_READY"] == "YES", attrs["FL_READY"]
        assert attrs["FL_ENDPOINT"] == "10.0.2.15:9092", attrs["FL_ENDPOINT"]
        pem = base64.b64decode(attrs["FL_CA_CERT"]).decode()
        assert "BEGIN CERTIFICATE" in pem
        open(os.environ["CA_OUT"], "w").write(pem)
        print(f"boot -> READY: {seen['READY']:.0f}s", flush=True)
        sys.exit(0)
    time.sleep(2)
sys.exit(f"no READY/FL_* within {os.environ['TIMEOUT']}s; seen: {sorted(seen)}")
PY

echo "==> Fleet API TLS on 127.0.0.1:$fleet_port (forwarded to 10.0.2.15:9092)"
tls=$(openssl s_client -connect "127.0.0.1:$fleet_port" -CAfile "$work/ca.pem" \
  -verify_return_error -alpn h2 </dev/null 2>&1) || { echo "$tls" >&2; exit 1; }
grep -q 'Verify return code: 0 (ok)' <<<"$tls" || { echo "$tls" >&2; exit 1; }
echo "boot test passed in ${SECONDS}s: READY, FL_READY, FL_ENDPOINT, FL_CA_CERT reached onesim; Fleet API TLS verified"
