//! Address ranges and leases of virtual networks, as oned has them (OpenNebula/one
//! `src/vnm/AddressRange.cc` `from_attr`, `init_mac`, `allocate_addr`, `free_addr`;
//! `src/vm/VirtualMachineNic.cc` `get_network_leases`, `release_network_leases`; facts in
//! docs/upstream-notes.md §1.11).
//!
//! Owns: IPv4 ARs (`IP`, `SIZE`, optional `MAC`) checked and completed at `one.vn.allocate`
//! (AR_ID, MAC = `02:00` + the AR's first IPv4 bytes), the per-AR cursor `NEXT_INDEX`, the
//! lease table, and the pick of a NIC's address ([`State::pick_lease`]).
//! Guarantees: an address is leased to at most one NIC (`lease_tests::next_fit_wraps_and_release_at_done`);
//! leases are taken only by an instantiate that succeeds and given back when the VM reaches
//! DONE; with `Knobs::loopback_only` (the process runtime) no lease outside 127.0.0.0/8 is
//! handed out (`lease_tests::process_runtime_refuses_non_loopback`).
//! Caveats: IPv4 ARs only (no IP6/ETHER ranges); a NIC's IP=/MAC= request is honoured by IP
//! only; SHARED ARs and reservations are not simulated.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::state::{err, OneErr, State, Vnet, ALLOCATE};
use crate::template::{vec_get, vec_set, Val};

/// One AR's lease table: the cursor and index → VM id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ArLeases {
    pub next_index: u64,
    pub used: BTreeMap<u64, i64>,
}

/// A lease picked for a NIC (not yet taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub net: i64,
    pub ar: usize,
    pub index: u64,
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// An AR's first address and size, read from the vnet template.
fn ar_range(ar: &[(String, String)]) -> Option<(Ipv4Addr, u64, [u8; 6])> {
    let ip: Ipv4Addr = vec_get(ar, "IP")?.trim().parse().ok()?;
    let size: u64 = vec_get(ar, "SIZE")?.trim().parse().ok()?;
    let mac = vec_get(ar, "MAC")
        .and_then(parse_mac)
        .unwrap_or_else(|| mac_of(ip));
    Some((ip, size, mac))
}

/// oned's MAC for an IPv4 AR given without one: `MAC_PREFIX` 02:00, then the IPv4 bytes.
pub fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p.trim(), 16))
        .collect::<Result<_, _>>()
        .ok()?;
    parts.try_into().ok()
}

/// `mac_to_s`: lower-case, two hex digits per byte.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC of lease `index`: the AR's low 32 bits + index.
fn mac_at(base: [u8; 6], index: u64) -> [u8; 6] {
    let low = u32::from_be_bytes([base[2], base[3], base[4], base[5]]).wrapping_add(index as u32);
    let b = low.to_be_bytes();
    [base[0], base[1], b[0], b[1], b[2], b[3]]
}

fn ip_at(first: Ipv4Addr, index: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(first).wrapping_add(index as u32))
}

/// The first and last address, MAC of an AR (`IP_END`, `MAC_END`).
pub fn ar_ends(ar: &[(String, String)]) -> Option<(String, String)> {
    let (ip, size, mac) = ar_range(ar)?;
    let last = size.saturating_sub(1);
    Some((ip_at(ip, last).to_string(), mac_str(mac_at(mac, last))))
}

/// Checks and completes the ARs of a vnet template being allocated (AR_ID, MAC, TYPE) and
/// returns their empty lease tables. An AR that is not a well-formed IPv4 range is refused.
pub fn init_ars(t: &mut crate::template::Template) -> Result<Vec<ArLeases>, OneErr> {
    let mut tables = Vec::new();
    for (i, a) in t.attrs.iter_mut().filter(|a| a.name == "AR").enumerate() {
        let Val::V(ar) = &mut a.val else {
            return Err(err(
                ALLOCATE,
                "Error allocating a new virtual network. AR must be a vector attribute.",
            ));
        };
        let ty = vec_get(ar, "TYPE").unwrap_or("IP4").to_ascii_uppercase();
        let bad = |why: &str| {
            err(
                ALLOCATE,
                format!("Error allocating a new virtual network. AR {i}: {why}"),
            )
        };
        if ty != "IP4" {
            return Err(bad(&format!(
                "TYPE {ty} is not simulated, onesim has IPv4 (TYPE=IP4) address ranges only"
            )));
        }
        let Some((ip, size, mac)) = ar_range(ar) else {
            return Err(bad(
                "an IP4 address range needs IP (an IPv4 address) and SIZE (a number)",
            ));
        };
        if size == 0 || u64::from(u32::from(ip)) + size > 1 << 32 {
            return Err(bad(
                "SIZE must be positive and the range must end in the IPv4 space",
            ));
        }
        if vec_get(ar, "MAC").is_some_and(|m| parse_mac(m).is_none()) {
            return Err(bad("MAC is not a MAC address"));
        }
        vec_set(ar, "AR_ID", &i.to_string());
        vec_set(ar, "MAC", &mac_str(mac));
        vec_set(ar, "TYPE", "IP4");
        tables.push(ArLeases::default());
    }
    Ok(tables)
}

impl Vnet {
    /// Leases in AR, then index order: (AR id, ip, mac, vm).
    pub fn leases(&self) -> Vec<(usize, String, String, i64)> {
        let mut out = Vec::new();
        for (i, ar) in self.template.vecs("AR").enumerate() {
            let (Some((ip, _, mac)), Some(t)) = (ar_range(ar), self.ar_leases.get(i)) else {
                continue;
            };
            for (idx, vm) in &t.used {
                out.push((
                    i,
                    ip_at(ip, *idx).to_string(),
                    mac_str(mac_at(mac, *idx)),
                    *vm,
                ));
            }
        }
        out
    }
}

impl State {
    /// `AddressRange::allocate_addr` over the vnet's ARs in order: next-fit from each AR's
    /// cursor, wrapping; or the requested `ip`. `pending` are leases already picked for
    /// the same VM. Errors are oned's `Cannot get IP/MAC lease from virtual network <id>.`,
    /// and, under the process runtime, a lease outside 127.0.0.0/8.
    pub fn pick_lease(
        &self,
        net: &Vnet,
        want_ip: Option<&str>,
        pending: &[Lease],
        nic_id: usize,
    ) -> Result<Lease, OneErr> {
        let none = || {
            err(
                ALLOCATE,
                format!(
                    "Error allocating a new virtual machine template. Cannot get IP/MAC lease from virtual network {}.",
                    net.id
                ),
            )
        };
        let want: Option<Ipv4Addr> = match want_ip {
            Some(w) => Some(w.trim().parse().map_err(|_| none())?),
            None => None,
        };
        let taken = |ar: usize, idx: u64| {
            net.ar_leases
                .get(ar)
                .is_some_and(|t| t.used.contains_key(&idx))
                || pending
                    .iter()
                    .any(|l| l.net == net.id && l.ar == ar && l.index == idx)
        };
        let mut found = None;
        'ars: for (i, ar) in net.template.vecs("AR").enumerate() {
            let Some((first, size, mac)) = ar_range(ar) else {
                continue;
            };
            let cursor = net.ar_leases.get(i).map_or(0, |t| t.next_index) % size;
            if let Some(w) = want {
                let off = u64::from(u32::from(w)).wrapping_sub(u64::from(u32::from(first)));
                if u32::from(w) >= u32::from(first) && off < size {
                    if taken(i, off) {
                        return Err(none());
                    }
                    found = Some((i, off, first, mac));
                    break 'ars;
                }
                continue;
            }
            for k in 0..size {
                let idx = (cursor + k) % size;
                if !taken(i, idx) {
                    found = Some((i, idx, first, mac));
                    break 'ars;
                }
            }
        }
        let (ar, index, first, mac) = found.ok_or_else(none)?;
        let ip = ip_at(first, index);
        if self.knobs.loopback_only && !ip.is_loopback() {
            return Err(err(
                ALLOCATE,
                format!(
                    "Error allocating a new virtual machine template. NIC {nic_id}: address {ip} of virtual network {} (AR {ar}) is outside 127.0.0.0/8: onesim's process runtime binds VM addresses on this host's loopback, so its networks need an address range inside 127.0.0.0/8 (e.g. the simulator's own 127.{}.1.1 onwards)",
                    net.id, self.knobs.loopback_net
                ),
            ));
        }
        Ok(Lease {
            net: net.id,
            ar,
            index,
            ip,
            mac: mac_str(mac_at(mac, index)),
        })
    }

    /// Takes the leases of VM `vm` (after its instantiate succeeded): the cursor moves past
    /// each address handed out automatically.
    pub fn take_leases(&mut self, vm: i64, leases: &[(Lease, bool)]) {
        for (l, requested) in leases {
            let Some(n) = self.vnets.get_mut(&l.net) else {
                continue;
            };
            let size = n
                .template
                .vecs("AR")
                .nth(l.ar)
                .and_then(|a| ar_range(a))
                .map_or(1, |r| r.1);
            if n.ar_leases.len() <= l.ar {
                n.ar_leases.resize(l.ar + 1, ArLeases::default());
            }
            let t = &mut n.ar_leases[l.ar];
            t.used.insert(l.index, vm);
            if !requested {
                t.next_index = (l.index + 1) % size.max(1);
            }
        }
        self.dirty = true;
    }

    /// Gives back every lease of VM `vm` (`release_network_leases`, when it reaches DONE).
    pub fn release_leases(&mut self, vm: i64) {
        let Some(v) = self.vms.get(&vm) else {
            return;
        };
        // Each NIC names its lease: network, AR and IP (index = IP − the AR's first).
        let held: Vec<(i64, usize, Ipv4Addr)> = v
            .template
            .vecs("NIC")
            .filter_map(|nic| {
                let net = vec_get(nic, "NETWORK_ID")?.parse().ok()?;
                let ar = vec_get(nic, "AR_ID")?.parse().ok()?;
                let ip = vec_get(nic, "IP")?.parse().ok()?;
                Some((net, ar, ip))
            })
            .collect();
        for (net, ar, ip) in held {
            let Some(n) = self.vnets.get_mut(&net) else {
                continue;
            };
            let first = n.template.vecs("AR").nth(ar).and_then(|a| ar_range(a));
            let (Some((first, _, _)), Some(t)) = (first, n.ar_leases.get_mut(ar)) else {
                continue;
            };
            let index = u64::from(u32::from(ip).wrapping_sub(u32::from(first)));
            if t.used.get(&index) == Some(&vm) {
                t.used.remove(&index);
                self.dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;
    use crate::state::S_DONE;
    use crate::template::vec_get;

    fn st() -> State {
        let mut s = State::new("oneadmin", "pw");
        s.knobs.vm_step_ms = 0;
        s
    }

    fn settle(s: &mut State) {
        for _ in 0..12 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            s.tick();
        }
    }

    fn nic_ip(s: &State, vm: i64) -> String {
        vec_get(s.vms[&vm].template.get_vec("NIC").unwrap(), "IP")
            .unwrap()
            .to_string()
    }

    /// oned's next-fit: .10, .11, .12; the .11 VM terminated; the next gets .13, and .11
    /// again only after the cursor wrapped; MAC = 02:00 + the IPv4 bytes; exhaustion.
    #[test]
    fn next_fit_wraps_and_release_at_done() {
        let mut s = st();
        let net = s
            .alloc_vnet(
                "NAME=n\nVN_MAD=bridge\nBRIDGE=br0\nAR=[TYPE=IP4,IP=10.10.0.10,SIZE=5]",
                0,
            )
            .unwrap();
        let ar = s.vnets[&net].template.get_vec("AR").unwrap().clone();
        assert_eq!(vec_get(&ar, "MAC"), Some("02:00:0a:0a:00:0a"));
        assert_eq!(vec_get(&ar, "AR_ID"), Some("0"));
        let t = s
            .alloc_template("NAME=t\nNIC=[NETWORK=n]\nCONTEXT=[NETWORK=YES]", 0)
            .unwrap();
        let vms: Vec<i64> = (0..3)
            .map(|_| s.instantiate(t, "", false, "", 0).unwrap())
            .collect();
        let ips: Vec<String> = vms.iter().map(|v| nic_ip(&s, *v)).collect();
        assert_eq!(ips, ["10.10.0.10", "10.10.0.11", "10.10.0.12"]);
        let nic = s.vms[&vms[1]].template.get_vec("NIC").unwrap();
        assert_eq!(vec_get(nic, "MAC"), Some("02:00:0a:0a:00:0b"));
        assert_eq!(s.vms[&vms[1]].ip, "10.10.0.11");
        settle(&mut s);
        s.vm_action("terminate", vms[1]).unwrap();
        assert_eq!(s.vnets[&net].leases().len(), 3, "held until DONE");
        settle(&mut s);
        assert_eq!(s.vms[&vms[1]].state, S_DONE);
        assert_eq!(s.vnets[&net].leases().len(), 2);
        let a = s.instantiate(t, "", false, "", 0).unwrap();
        let b = s.instantiate(t, "", false, "", 0).unwrap();
        assert_eq!(
            (nic_ip(&s, a), nic_ip(&s, b)),
            ("10.10.0.13".into(), "10.10.0.14".into())
        );
        let c = s.instantiate(t, "", false, "", 0).unwrap();
        assert_eq!(
            nic_ip(&s, c),
            "10.10.0.11",
            "the cursor wrapped to the freed address"
        );
        let e = s.instantiate(t, "", false, "", 0).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                ALLOCATE,
                "Error allocating a new virtual machine template. Cannot get IP/MAC lease from virtual network 0."
            )
        );
        // A failed instantiate takes no lease and no VM id.
        assert_eq!(s.vnets[&net].leases().len(), 5);
        // Two NICs on one network in one VM get two addresses; an explicit IP is honoured.
        s.vm_action("terminate", a).unwrap();
        s.vm_action("terminate", b).unwrap();
        settle(&mut s);
        let t2 = s
            .alloc_template(
                "NAME=t2\nNIC=[NETWORK_ID=0]\nNIC=[NETWORK_ID=0,IP=10.10.0.14]",
                0,
            )
            .unwrap();
        let v = s.instantiate(t2, "", false, "", 0).unwrap();
        let ips: Vec<String> = s.vms[&v]
            .template
            .vecs("NIC")
            .map(|n| vec_get(n, "IP").unwrap().to_string())
            .collect();
        assert_eq!(ips, ["10.10.0.13", "10.10.0.14"]);
    }

    #[test]
    fn process_runtime_refuses_non_loopback() {
        let mut s = st();
        s.knobs.loopback_only = true;
        s.knobs.loopback_net = 42;
        s.alloc_vnet(
            "NAME=n\nVN_MAD=bridge\nAR=[TYPE=IP4,IP=10.10.0.10,SIZE=5]",
            0,
        )
        .unwrap();
        s.alloc_vnet(
            "NAME=lo\nVN_MAD=bridge\nAR=[TYPE=IP4,IP=127.42.1.1,SIZE=5]",
            0,
        )
        .unwrap();
        let t = s.alloc_template("NAME=t\nNIC=[NETWORK=n]", 0).unwrap();
        let e = s.instantiate(t, "", false, "", 0).unwrap_err();
        assert_eq!(e.code, ALLOCATE);
        assert!(
            e.msg.contains("NIC 0: address 10.10.0.10 of virtual network 0 (AR 0) is outside 127.0.0.0/8: onesim's process runtime binds VM addresses on this host's loopback"),
            "{}",
            e.msg
        );
        assert!(s.vnets[&0].leases().is_empty());
        let t = s.alloc_template("NAME=t2\nNIC=[NETWORK=lo]", 0).unwrap();
        let v = s.instantiate(t, "", false, "", 0).unwrap();
        assert_eq!(s.vms[&v].ip, "127.42.1.1");
    }

    #[test]
    fn malformed_ranges_are_refused() {
        let mut s = st();
        for (ar, why) in [
            ("AR=[TYPE=IP4,SIZE=5]", "needs IP"),
            ("AR=[TYPE=IP4,IP=10.0.0.1,SIZE=0]", "SIZE must be positive"),
            (
                "AR=[TYPE=IP6,IP=10.0.0.1,SIZE=2]",
                "IPv4 (TYPE=IP4) address ranges only",
            ),
            (
                "AR=[TYPE=IP4,IP=255.255.255.255,SIZE=2]",
                "end in the IPv4 space",
            ),
        ] {
            let e = s
                .alloc_vnet(&format!("NAME=n\nVN_MAD=bridge\n{ar}"), 0)
                .unwrap_err();
            assert!(e.msg.contains(why), "{ar}: {}", e.msg);
        }
    }
}
