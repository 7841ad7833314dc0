//! oned's XML documents: VM (full and short bodies), VM template, virtual network, user,
//! document, and their pools. Element order follows share/doc/xsd (7.4).

use std::fmt::Write;

use crate::image::Image;
use crate::state::{Doc, Lock, Owner, User, Vm, VmTemplate, Vnet, L_RUNNING, S_ACTIVE};
use crate::template::{Template, Val};
use crate::xml::{esc, push_cdata, push_cdata_el, push_el};

fn owner(out: &mut String, id: i64, o: &Owner, name: &str) {
    push_el(out, "ID", id);
    push_el(out, "UID", o.uid);
    push_el(out, "GID", o.gid);
    push_el(out, "UNAME", &o.uname);
    push_el(out, "GNAME", &o.gname);
    push_el(out, "NAME", name);
}

fn perms(out: &mut String, p: [u8; 9]) {
    out.push_str("<PERMISSIONS>");
    for (n, v) in [
        "OWNER_U", "OWNER_M", "OWNER_A", "GROUP_U", "GROUP_M", "GROUP_A", "OTHER_U", "OTHER_M",
        "OTHER_A",
    ]
    .iter()
    .zip(p)
    {
        push_el(out, n, v);
    }
    out.push_str("</PERMISSIONS>");
}

fn lock(out: &mut String, l: &Option<Lock>) {
    if let Some(l) = l {
        let _ = write!(
            out,
            "<LOCK><LOCKED>{}</LOCKED><OWNER>{}</OWNER><TIME>{}</TIME><REQ_ID>-1</REQ_ID></LOCK>",
            l.level, l.owner, l.time
        );
    }
}

/// Full VM body (`one.vm.info`, `one.vmpool.infoextended`).
pub fn vm_full(out: &mut String, vm: &Vm) {
    out.push_str("<VM>");
    owner(out, vm.id, &vm.own, &vm.name);
    perms(out, vm.own.perm_flags());
    push_el(out, "LAST_POLL", vm.last_poll);
    push_el(out, "STATE", vm.state);
    push_el(out, "LCM_STATE", vm.lcm);
    push_el(out, "PREV_STATE", vm.prev_state);
    push_el(out, "PREV_LCM_STATE", vm.prev_lcm);
    push_el(out, "RESCHED", vm.resched);
    push_el(out, "STIME", vm.stime);
    push_el(out, "ETIME", vm.etime);
    push_el(out, "DEPLOY_ID", &vm.deploy_id);
    lock(out, &vm.lock);
    monitoring(out, vm, false);
    out.push_str("<SCHED_ACTIONS/>");
    vm.template.to_xml("TEMPLATE", out);
    vm.user_template.to_xml("USER_TEMPLATE", out);
    if vm.history.is_empty() {
        out.push_str("<HISTORY_RECORDS/>");
    } else {
        out.push_str("<HISTORY_RECORDS>");
        for h in &vm.history {
            out.push_str("<HISTORY>");
            push_el(out, "OID", vm.id);
            push_el(out, "SEQ", h.seq);
            push_el(out, "HOSTNAME", "localhost");
            push_el(out, "HID", 0);
            push_el(out, "CID", 0);
            push_el(out, "STIME", h.stime);
            push_el(out, "ETIME", h.etime);
            push_el(out, "VM_MAD", "kvm");
            push_el(out, "TM_MAD", "ssh");
            push_el(out, "DS_ID", 0);
            push_el(out, "PLAN_ID", -1);
            push_el(out, "ACTION_ID", -1);
            push_el(out, "PSTIME", h.pstime);
            push_el(out, "PETIME", h.petime);
            push_el(out, "RSTIME", h.rstime);
            push_el(out, "RETIME", h.retime);
            push_el(out, "ESTIME", h.estime);
            push_el(out, "EETIME", h.eetime);
            push_el(out, "ACTION", h.action);
            push_el(out, "UID", h.uid);
            push_el(out, "GID", h.gid);
            push_el(out, "REQUEST_ID", -1);
            out.push_str("</HISTORY>");
        }
        out.push_str("</HISTORY_RECORDS>");
    }
    out.push_str("<BACKUPS><BACKUP_CONFIG/><BACKUP_IDS/></BACKUPS>");
    out.push_str("</VM>");
}

fn monitoring(out: &mut String, vm: &Vm, short: bool) {
    let values = monitoring_values(vm, short);
    if values.is_empty() {
        out.push_str("<MONITORING/>");
        return;
    }
    out.push_str("<MONITORING>");
    for (k, v) in values {
        push_cdata_el(out, k, &v);
    }
    out.push_str("</MONITORING>");
}

/// The VM's last monitoring record (empty unless RUNNING): the body's `<MONITORING>` and
/// what OneFlow's elasticity rules read after USER_TEMPLATE.
pub fn monitoring_values(vm: &Vm, short: bool) -> Vec<(&'static str, String)> {
    if !(vm.state == S_ACTIVE && vm.lcm == L_RUNNING) {
        return Vec::new();
    }
    let mem = vm
        .template
        .get("MEMORY")
        .and_then(|m| m.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
        / 4;
    [("CPU", "1.0".to_string())]
        .into_iter()
        .chain((!short).then(|| ("ID", vm.id.to_string())))
        .chain([("MEMORY", mem.to_string())])
        .chain((!short).then(|| ("NETRX", "0".to_string())))
        .chain((!short).then(|| ("NETTX", "0".to_string())))
        .chain(short.then(|| ("STATE", "a".to_string())))
        .chain((!short).then(|| ("TIMESTAMP", vm.last_poll.to_string())))
        .collect()
}

const SHORT_NIC: &[&str] = &[
    "EXTERNAL_IP",
    "IP",
    "IP6",
    "IP6_GLOBAL",
    "IP6_LINK",
    "IP6_ULA",
    "MAC",
    "NETWORK",
    "NETWORK_ID",
    "NETWORK_MODE",
    "NIC_ID",
    "SCHED_RANK",
    "SCHED_REQUIREMENTS",
    "SECURITY_GROUPS",
];
/// `VirtualMachineDisk::to_xml_short`: these 11, in this order, empty when absent.
const SHORT_DISK: &[&str] = &[
    "DISK_ID",
    "DATASTORE",
    "DATASTORE_ID",
    "IMAGE",
    "IMAGE_ID",
    "SIZE",
    "TYPE",
    "CLONE",
    "CLONE_TARGET",
    "LN_TARGET",
    "DISK_SNAPSHOT_TOTAL_SIZE",
];
const SHORT_USER: &[&str] = &[
    "ERROR",
    "LABELS",
    "SCHED_ACTION",
    "SCHED_DS_RANK",
    "SCHED_DS_REQUIREMENTS",
    "SCHED_MESSAGE",
    "SCHED_RANK",
    "SCHED_REQUIREMENTS",
    "USER_PRIORITY",
];

fn push_filtered(out: &mut String, t: &Template, name: &str, keep: &[&str]) {
    for a in t.attrs.iter().filter(|a| a.name == name) {
        let _ = write!(out, "<{name}>");
        match &a.val {
            Val::S(s) => push_cdata(out, s),
            Val::V(v) => {
                for (k, x) in v.iter().filter(|(k, _)| keep.contains(&k.as_str())) {
                    push_cdata_el(out, k, x);
                }
            }
        }
        let _ = write!(out, "</{name}>");
    }
}

/// Short VM body (`one.vmpool.info`).
pub fn vm_short(out: &mut String, vm: &Vm) {
    out.push_str("<VM>");
    owner(out, vm.id, &vm.own, &vm.name);
    push_el(out, "LAST_POLL", vm.last_poll);
    push_el(out, "STATE", vm.state);
    push_el(out, "LCM_STATE", vm.lcm);
    push_el(out, "RESCHED", vm.resched);
    push_el(out, "STIME", vm.stime);
    push_el(out, "ETIME", vm.etime);
    push_el(out, "DEPLOY_ID", &vm.deploy_id);
    lock(out, &vm.lock);
    out.push_str("<TEMPLATE>");
    for k in ["CPU", "MEMORY", "VCPU"] {
        push_filtered(out, &vm.template, k, &[]);
    }
    for d in vm.template.vecs("DISK") {
        out.push_str("<DISK>");
        for k in SHORT_DISK {
            push_cdata_el(out, k, crate::template::vec_get(d, k).unwrap_or(""));
        }
        out.push_str("</DISK>");
    }
    push_filtered(out, &vm.template, "NIC", SHORT_NIC);
    push_filtered(out, &vm.template, "GRAPHICS", &["LISTEN", "PORT", "TYPE"]);
    out.push_str("</TEMPLATE>");
    monitoring(out, vm, true);
    let mut ut = Template::default();
    for a in vm
        .user_template
        .attrs
        .iter()
        .filter(|a| SHORT_USER.contains(&a.name.as_str()))
    {
        ut.push(a.clone());
    }
    if ut.attrs.is_empty() {
        out.push_str("<USER_TEMPLATE/>");
    } else {
        ut.to_xml("USER_TEMPLATE", out);
    }
    if vm.history.is_empty() {
        out.push_str("<HISTORY_RECORDS/>");
    } else {
        out.push_str("<HISTORY_RECORDS>");
        for h in &vm.history {
            let _ = write!(
                out,
                "<HISTORY><OID>{}</OID><SEQ>{}</SEQ><HOSTNAME>localhost</HOSTNAME><HID>0</HID><CID>0</CID><DS_ID>0</DS_ID><VM_MAD>kvm</VM_MAD><TM_MAD>ssh</TM_MAD><ACTION>{}</ACTION></HISTORY>",
                vm.id, h.seq, h.action
            );
        }
        out.push_str("</HISTORY_RECORDS>");
    }
    out.push_str("</VM>");
}

pub fn vm_template(out: &mut String, t: &VmTemplate) {
    out.push_str("<VMTEMPLATE>");
    owner(out, t.id, &t.own, &t.name);
    lock(out, &t.lock);
    perms(out, t.own.perm_flags());
    push_el(out, "REGTIME", t.regtime);
    let mut tt = t.template.clone();
    tt.set("NAME", &t.name);
    tt.to_xml("TEMPLATE", out);
    out.push_str("</VMTEMPLATE>");
}

/// A VNET; `pool` gives the `vnet_pool.xsd` form (ALLOCATED, no ends or leases per AR).
/// `leases` are (AR id, IP, MAC, VM) in AR and index order (`Vnet::leases`).
pub fn vnet(out: &mut String, n: &Vnet, leases: &[(usize, String, String, i64)], pool: bool) {
    out.push_str("<VNET>");
    owner(out, n.id, &n.own, &n.name);
    lock(out, &n.lock);
    perms(out, n.own.perm_flags());
    out.push_str("<CLUSTERS><ID>0</ID></CLUSTERS>");
    let g = |k: &str| n.template.get(k).unwrap_or("").to_string();
    push_el(out, "BRIDGE", g("BRIDGE"));
    push_el(out, "BRIDGE_TYPE", "linux");
    push_el(out, "STATE", 1);
    push_el(out, "PREV_STATE", 0);
    push_el(out, "PARENT_NETWORK_ID", "");
    push_el(out, "TEMPLATE_ID", -1);
    push_el(out, "VN_MAD", g("VN_MAD"));
    push_el(out, "PHYDEV", g("PHYDEV"));
    push_el(out, "VLAN_ID", g("VLAN_ID"));
    push_el(out, "OUTER_VLAN_ID", "");
    push_el(out, "VLAN_ID_AUTOMATIC", 0);
    push_el(out, "OUTER_VLAN_ID_AUTOMATIC", 0);
    push_el(out, "USED_LEASES", leases.len());
    out.push_str("<VROUTERS/><UPDATED_VMS/><OUTDATED_VMS/><UPDATING_VMS/><ERROR_VMS/>");
    let mut tt = n.template.clone();
    tt.remove("AR");
    tt.set("NAME", &n.name);
    tt.to_xml("TEMPLATE", out);
    out.push_str("<AR_POOL>");
    for (i, ar) in n.template.vecs("AR").enumerate() {
        let get = |k: &str| crate::template::vec_get(ar, k).unwrap_or("").to_string();
        let mine: Vec<_> = leases.iter().filter(|l| l.0 == i).collect();
        let next_index = n.ar_leases.get(i).map_or(0, |t| t.next_index);
        out.push_str("<AR>");
        if pool {
            // ` <index> <owner>` pairs; a VM's owner word is 0x1000000000 + its id.
            let mut alloc = String::new();
            if let Some(t) = n.ar_leases.get(i) {
                for (idx, vm) in &t.used {
                    let _ = write!(alloc, " {idx} {}", 0x10_0000_0000_i64 + vm);
                }
            }
            push_cdata_el(out, "ALLOCATED", &alloc);
        }
        push_cdata_el(out, "AR_ID", &i.to_string());
        if !get("IP").is_empty() {
            push_cdata_el(out, "IP", &get("IP"));
        }
        push_cdata_el(out, "MAC", &get("MAC"));
        push_cdata_el(out, "NEXT_INDEX", &next_index.to_string());
        push_cdata_el(out, "SHARED", "NO");
        push_cdata_el(out, "SIZE", &get("SIZE"));
        push_cdata_el(out, "TYPE", &get("TYPE"));
        if !pool {
            if let Some((ip_end, mac_end)) = crate::lease::ar_ends(ar) {
                push_cdata_el(out, "MAC_END", &mac_end);
                push_cdata_el(out, "IP_END", &ip_end);
            }
            push_cdata_el(out, "USED_LEASES", &mine.len().to_string());
            if mine.is_empty() {
                out.push_str("<LEASES/>");
            } else {
                out.push_str("<LEASES>");
                for (_, ip, mac, vm) in mine {
                    out.push_str("<LEASE>");
                    push_cdata_el(out, "IP", ip);
                    push_cdata_el(out, "MAC", mac);
                    push_cdata_el(out, "VM", &vm.to_string());
                    out.push_str("</LEASE>");
                }
                out.push_str("</LEASES>");
            }
        }
        out.push_str("</AR>");
    }
    out.push_str("</AR_POOL>");
    out.push_str("</VNET>");
}

/// An IMAGE (`Image::to_xml`; `image.xsd` order).
pub fn image(out: &mut String, i: &Image) {
    out.push_str("<IMAGE>");
    owner(out, i.id, &i.own, &i.name);
    lock(out, &i.lock);
    perms(out, i.own.perm_flags());
    push_el(out, "TYPE", i.img_type);
    push_el(out, "DISK_TYPE", 0);
    push_el(out, "PERSISTENT", u8::from(i.persistent));
    push_el(out, "REGTIME", i.regtime);
    push_el(out, "MODTIME", i.modtime);
    for (k, v) in [
        ("SOURCE", &i.source),
        ("PATH", &i.path),
        ("FORMAT", &i.format),
        ("FS", &String::new()),
    ] {
        push_cdata_el(out, k, v);
    }
    push_el(out, "SIZE", i.size_mb);
    push_el(out, "STATE", i.state);
    push_el(out, "PREV_STATE", i.prev_state);
    push_el(out, "RUNNING_VMS", i.vms.len());
    push_el(out, "CLONING_OPS", 0);
    push_el(out, "CLONING_ID", -1);
    push_el(out, "TARGET_SNAPSHOT", -1);
    push_el(out, "DATASTORE_ID", crate::image::DEFAULT_DS);
    push_el(out, "DATASTORE", crate::image::DEFAULT_DS_NAME);
    out.push_str("<VMS>");
    for v in &i.vms {
        push_el(out, "ID", v);
    }
    out.push_str("</VMS><CLONES></CLONES><APP_CLONES></APP_CLONES>");
    i.template.to_xml("TEMPLATE", out);
    out.push_str("<SNAPSHOTS><ALLOW_ORPHANS><![CDATA[NO]]></ALLOW_ORPHANS><CURRENT_BASE><![CDATA[-1]]></CURRENT_BASE><NEXT_SNAPSHOT><![CDATA[0]]></NEXT_SNAPSHOT></SNAPSHOTS>");
    out.push_str("<BACKUP_INCREMENTS></BACKUP_INCREMENTS><BACKUP_DISK_IDS></BACKUP_DISK_IDS>");
    out.push_str("</IMAGE>");
}

/// A USER; `pool` gives the `user_pool.xsd` form (no quota sections).
pub fn user(out: &mut String, u: &User, decrypt: bool, pool: bool) {
    out.push_str("<USER>");
    push_el(out, "ID", u.id);
    push_el(out, "GID", u.gid);
    let _ = write!(out, "<GROUPS><ID>{}</ID></GROUPS>", u.gid);
    push_el(out, "GNAME", &u.gname);
    push_el(out, "NAME", &u.name);
    // oned stores a hash; never echo the password.
    push_el(out, "PASSWORD", hash_hex(&u.password));
    push_el(out, "AUTH_DRIVER", &u.driver);
    push_el(out, "ENABLED", u8::from(u.enabled));
    for (t, exp) in &u.tokens {
        let _ = write!(out, "<LOGIN_TOKEN><TOKEN>{}</TOKEN><EXPIRATION_TIME>{exp}</EXPIRATION_TIME><EGID>-1</EGID></LOGIN_TOKEN>", esc(t));
    }
    let mut t = u.template.clone();
    if !decrypt {
        t.remove("TOKEN_PASSWORD");
    }
    t.to_xml("TEMPLATE", out);
    if pool {
        out.push_str("</USER>");
        return;
    }
    out.push_str("<DATASTORE_QUOTA/><NETWORK_QUOTA/><VM_QUOTA/><IMAGE_QUOTA/>");
    out.push_str("<DEFAULT_USER_QUOTAS><DATASTORE_QUOTA/><NETWORK_QUOTA/><VM_QUOTA/><IMAGE_QUOTA/></DEFAULT_USER_QUOTAS>");
    out.push_str("</USER>");
}

fn hash_hex(s: &str) -> String {
    // A stable, non-reversible stand-in for oned's SHA-256 (FNV-1a, enough for display).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

pub fn document(out: &mut String, d: &Doc) {
    out.push_str("<DOCUMENT>");
    owner(out, d.id, &d.own, &d.name);
    push_el(out, "TYPE", d.doc_type);
    perms(out, d.own.perm_flags());
    lock(out, &d.lock);
    out.push_str("<TEMPLATE>");
    if !d.body.is_null() {
        out.push_str("<BODY>");
        push_cdata(out, &d.body.to_string());
        out.push_str("</BODY>");
    }
    d.template.push_xml_body(out);
    out.push_str("</TEMPLATE>");
    out.push_str("</DOCUMENT>");
}
