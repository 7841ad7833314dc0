"""pyone (the official OpenNebula Python client) against onesim over XML-RPC.

Usage: test_pyone.py <xmlrpc-url> <user:password>

pyone parses every XML answer with its generateDS bindings built from OpenNebula's XSDs;
this script drives the calls a controller makes and checks the parsed values. Exits non-zero
on the first failure.
"""
import os
import struct
import sys
import tempfile
import time

import pyone

url, session = sys.argv[1], sys.argv[2]
one = pyone.OneServer(url, session=session)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok -", what)


def wait_state(vm_id, state, lcm, timeout=20):
    t0 = time.time()
    while time.time() - t0 < timeout:
        vm = one.vm.info(vm_id)
        if vm.STATE == state and vm.LCM_STATE == lcm:
            return vm
        time.sleep(0.05)
    raise AssertionError("VM %d never reached %d/%d" % (vm_id, state, lcm))


check(one.system.version().startswith("7."), "system.version")
me = one.user.info(-1)
check(me.ID == 0 and me.NAME == session.split(":")[0], "user.info(-1) parses as USER")
check(len(one.userpool.info().USER) == 1, "userpool.info")

net_id = one.vn.allocate('NAME="priv"\nVN_MAD="bridge"\nBRIDGE="br0"\nAR=[TYPE="IP4",IP="10.0.0.1",SIZE="50"]', -1)
net = one.vn.info(net_id)
check(net.ID == net_id and net.NAME == "priv" and net.VN_MAD == "bridge", "vn.allocate + vn.info")
check(len(one.vnpool.info(-2, -1, -1).VNET) == 1, "vnpool.info")

tmpl_id = one.template.allocate(
    'NAME="small"\nCPU="1"\nVCPU="1"\nMEMORY="128"\n'
    'NIC=[NETWORK_ID="%d"]\nCONTEXT=[NETWORK="YES",TOKEN="YES",ONEAPP_A="1"]\nLABEL="x"' % net_id
)
tmpl = one.template.info(tmpl_id)
check(tmpl.ID == tmpl_id and tmpl.NAME == "small", "template.allocate + template.info")
check(str(tmpl.TEMPLATE["MEMORY"]) == "128", "template TEMPLATE parsed as a dict")
check(len(one.templatepool.info(-2, -1, -1).VMTEMPLATE) == 1, "templatepool.info")

ids = [one.template.instantiate(tmpl_id, "vm-%d" % i, False, "", False) for i in range(5)]
check(ids == list(range(ids[0], ids[0] + 5)), "template.instantiate returns consecutive ids")
for i in ids:
    wait_state(i, 3, 3)
vm = one.vm.info(ids[0])
check(vm.NAME == "vm-0" and vm.STATE == 3 and vm.LCM_STATE == 3, "vm.info full body")
check(vm.TEMPLATE["CONTEXT"]["ETH0_IP"] == vm.TEMPLATE["NIC"]["IP"], "CONTEXT ETH0_IP equals the NIC IP")
check(vm.TEMPLATE["CONTEXT"]["VMID"] == str(ids[0]), "CONTEXT VMID")
check("ONEGATE_ENDPOINT" in vm.TEMPLATE["CONTEXT"], "CONTEXT ONEGATE_ENDPOINT")
check(vm.USER_TEMPLATE["LABEL"] == "x", "custom attributes land in USER_TEMPLATE")
check(vm.HISTORY_RECORDS.HISTORY[0].HOSTNAME is not None, "HISTORY parsed")

one.vm.update(ids[0], 'READY="YES"\nAPP="1"', 1)
vm = one.vm.info(ids[0])
check(vm.USER_TEMPLATE["READY"] == "YES" and vm.USER_TEMPLATE["APP"] == "1", "vm.update merge")
one.vm.update(ids[0], 'ONLY="1"', 0)
check(list(one.vm.info(ids[0]).USER_TEMPLATE.keys()) == ["ONLY"], "vm.update replace")

pool = one.vmpool.info(-2, -1, -1, -1)
check([v.ID for v in pool.VM] == ids, "vmpool.info short bodies")
check(pool.VM[0].TEMPLATE["MEMORY"] == "128", "short body TEMPLATE")
ext = one.vmpool.infoextended(-2, -1, -1, -1)
check(ext.VM[0].USER_TEMPLATE["ONLY"] == "1", "vmpool.infoextended full bodies")
page = one.vmpool.infoextended(-2, 2, -2, -1)
check([v.ID for v in page.VM] == ids[2:4], "pagination: offset 2, page size 2")
rng = one.vmpool.info(-2, ids[1], ids[3], -1)
check([v.ID for v in rng.VM] == ids[1:4], "ID range")
check(len(one.vmpool.info(-3, -1, -1, -1).VM) == 5, "filter -3 (mine)")

one.vm.action("poweroff", ids[1])
wait_state(ids[1], 8, 0)
check(len(one.vmpool.info(-2, -1, -1, 8).VM) == 1, "state filter POWEROFF")
one.vm.action("resume", ids[1])
wait_state(ids[1], 3, 3)
one.vm.action("terminate-hard", ids[4])
wait_state(ids[4], 6, 0)
check([v.ID for v in one.vmpool.info(-2, -1, -1, -1).VM] == ids[:4], "-1 hides DONE")
check([v.ID for v in one.vmpool.info(-2, -1, -1, -2).VM] == ids, "-2 includes DONE")
one.vm.updateconf(ids[2], 'CONTEXT=[ONEAPP_A="2"]', 1)
check(one.vm.info(ids[2]).TEMPLATE["CONTEXT"]["ONEAPP_A"] == "2", "vm.updateconf merge")
one.vm.recover(ids[3], 3)
check(one.vm.info(ids[3]).STATE == 6, "vm.recover delete")
check(len(one.documentpool.info(-2, -1, -1, 100).DOCUMENT) == 0, "documentpool.info")

try:
    one.vm.info(99999)
    raise AssertionError("missing VM accepted")
except pyone.OneNoExistsException as e:
    check("Error getting virtual machine [99999]" in str(e), "missing id -> OneNoExistsException")
try:
    one.vm.action("fly", ids[0])
    raise AssertionError("bad action accepted")
except pyone.OneActionException:
    check(True, "unknown action -> OneActionException")
try:
    one.vmpool.info(-2, -1, -1, 99)
    raise AssertionError("bad state filter accepted")
except pyone.OneApiException:
    check(True, "bad state filter -> OneApiException")
bad = pyone.OneServer(url, session=session.split(":")[0] + ":wrong")
try:
    bad.vm.info(ids[0])
    raise AssertionError("bad auth accepted")
except pyone.OneAuthenticationException:
    check(True, "bad auth -> OneAuthenticationException")
# Acceptance of #15: as an administrator would, register an image from a local file
# (`oneimage create --path`), then boot a VM from a template with DISK=[IMAGE=...] and
# NIC=[NETWORK=...] on a 10.10.0.10/100 address range.
tmp = tempfile.mkdtemp()
path = os.path.join(tmp, "appliance.qcow2")
with open(path, "wb") as f:
    # A qcow2 header (magic, version 3) with a 10 MiB virtual size at bytes 24..32.
    f.write(b"QFI\xfb" + struct.pack(">I", 3) + b"\0" * 16 + struct.pack(">Q", 10 << 20) + b"\0" * 72)
img_id = one.image.allocate('NAME="appliance"\nPATH="%s"\nDEV_PREFIX="vd"' % path, 1)
check(isinstance(img_id, int) and img_id >= 0, "image.allocate with a PATH returns an id")
t0 = time.time()
while one.image.info(img_id).STATE != 1 and time.time() - t0 < 20:
    time.sleep(0.05)
img = one.image.info(img_id)
check(img.STATE == 1 and img.NAME == "appliance" and img.PATH == path, "image READY once copied")
check(img.SIZE == 10 and img.FORMAT == "qcow2" and img.SOURCE and img.SOURCE != path,
      "image SIZE (MiB), FORMAT and SOURCE (the datastore's copy)")
check([i.ID for i in one.imagepool.info(-2, -1, -1).IMAGE] == [img_id], "imagepool.info")
acc_net = one.vn.allocate('NAME="acc"\nVN_MAD="bridge"\nBRIDGE="br0"\nAR=[TYPE="IP4",IP="10.10.0.10",SIZE="100"]', -1)
acc_t = one.template.allocate('NAME="appliance-vm"\nMEMORY="128"\nDISK=[IMAGE="appliance"]\nNIC=[NETWORK="acc"]')
acc_vm = one.template.instantiate(acc_t, "acc-vm", False, "", False)
vm = one.vm.info(acc_vm)
ip = vm.TEMPLATE["NIC"]["IP"]
a, b, c, d = (int(x) for x in ip.split("."))
check((a, b, c) == (10, 10, 0) and 10 <= d < 110, "the NIC IP %s is inside 10.10.0.10/100" % ip)
check(vm.TEMPLATE["NIC"]["MAC"] == "02:00:%02x:%02x:%02x:%02x" % (a, b, c, d), "the NIC MAC is 02:00 + the IPv4 bytes")
disk = vm.TEMPLATE["DISK"]
check(disk["IMAGE"] == "appliance" and disk["IMAGE_ID"] == str(img_id), "the DISK names the image")
check(disk["SOURCE"] == img.SOURCE and disk["TARGET"] == "vda" and disk["DATASTORE"] == "default",
      "the DISK's SOURCE, TARGET and DATASTORE")
img = one.image.info(img_id)
check(img.STATE == 2 and img.RUNNING_VMS == 1, "the image is USED by one VM")
vn = one.vn.info(acc_net)
check(vn.USED_LEASES == 1, "vn.info counts the lease")
try:
    one.image.delete(img_id, False)
    raise AssertionError("deleting a used image accepted")
except pyone.OneActionException as e:
    check("Cannot delete image. There are 1 VMs using it." in str(e), "image.delete refused while used")
wait_state(acc_vm, 3, 3)
one.vm.action("terminate-hard", acc_vm)
wait_state(acc_vm, 6, 0)
check(one.image.info(img_id).STATE == 1, "the image is READY again once its VM is DONE")
check(one.vn.info(acc_net).USED_LEASES == 0, "the lease is released at DONE")
check(one.image.delete(img_id, False) == img_id, "image.delete")
try:
    one.image.info(img_id)
    raise AssertionError("deleted image still there")
except pyone.OneNoExistsException:
    check(True, "a deleted image -> OneNoExistsException")
print("pyone conformance: all checks passed")
