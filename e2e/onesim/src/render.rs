//! oned's XML documents: VM (full and short bodies), VM template, virtual network, user,
//! document, and their pools. Element order follows share/doc/xsd (7.4).

use std::fmt::Write;

use crate::state::{Doc, Lock, Owner, State, User, Vm, VmTemplate, Vnet, L_RUNNING, S_ACTIVE};
use crate::template::{Template, Val};
use crate::xml::{esc, push_cdata, push_el};

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
    if !(vm.state == S_ACTIVE && vm.lcm == L_RUNNING) {
        out.push_str("<MONITORING/>");
        return;
    }
    let mem = vm
        .template
        .get("MEMORY")
        .and_then(|m| m.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
        / 4;
    out.push_str("<MONITORING>");
    for (k, v) in [("CPU", "1.0".to_string())]
        .into_iter()
        .chain((!short).then(|| ("ID", vm.id.to_string())))
        .chain([("MEMORY", mem.to_string())])
        .chain((!short).then(|| ("NETRX", "0".to_string())))
        .chain((!short).then(|| ("NETTX", "0".to_string())))
        .chain(short.then(|| ("STATE", "a".to_string())))
        .chain((!short).then(|| ("TIMESTAMP", vm.last_poll.to_string())))
    {
        let _ = write!(out, "<{k}>");
        push_cdata(out, &v);
        let _ = write!(out, "</{k}>");
    }
    out.push_str("</MONITORING>");
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
const SHORT_DISK: &[&str] = &[
    "CLONE",
    "CLONE_TARGET",
    "DATASTORE",
    "DATASTORE_ID",
    "DISK_ID",
    "DISK_SNAPSHOT_TOTAL_SIZE",
    "IMAGE",
    "IMAGE_ID",
    "LN_TARGET",
    "SIZE",
    "TYPE",
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
                    let _ = write!(out, "<{k}>");
                    push_cdata(out, x);
                    let _ = write!(out, "</{k}>");
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
    push_filtered(out, &vm.template, "DISK", SHORT_DISK);
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

/// A VNET; `pool` gives the `vnet_pool.xsd` form (ALLOCATED, no USED_LEASES/LEASES per AR).
pub fn vnet(out: &mut String, n: &Vnet, leases: &[(i64, String)], pool: bool) {
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
        out.push_str("<AR>");
        if pool {
            out.push_str("<ALLOCATED></ALLOCATED>");
        }
        push_el(out, "AR_ID", i);
        if !get("IP").is_empty() {
            push_el(out, "IP", get("IP"));
        }
        push_el(
            out,
            "MAC",
            if get("MAC").is_empty() {
                "02:00:00:00:00:01".into()
            } else {
                get("MAC")
            },
        );
        push_el(out, "NEXT_INDEX", 0);
        push_el(out, "SIZE", get("SIZE").parse::<i64>().unwrap_or(0));
        push_el(
            out,
            "TYPE",
            if get("TYPE").is_empty() {
                "IP4".into()
            } else {
                get("TYPE")
            },
        );
        if pool {
        } else if leases.is_empty() || i > 0 {
            push_el(out, "USED_LEASES", 0);
        } else {
            push_el(out, "USED_LEASES", leases.len());
            out.push_str("<LEASES>");
            for (vmid, ip) in leases {
                let _ = write!(out, "<LEASE><IP>{}</IP><VM>{vmid}</VM></LEASE>", esc(ip));
            }
            out.push_str("</LEASES>");
        }
        out.push_str("</AR>");
    }
    out.push_str("</AR_POOL>");
    out.push_str("</VNET>");
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
    out.push_str("<TEMPLATE><BODY>");
    push_cdata(out, &d.body.to_string());
    out.push_str("</BODY></TEMPLATE>");
    out.push_str("</DOCUMENT>");
}

/// IP leases of a network (for `one.vn.info`).
pub fn leases(st: &State, net_id: i64) -> Vec<(i64, String)> {
    let nid = net_id.to_string();
    st.vms
        .values()
        .filter(|v| v.state != crate::state::S_DONE)
        .flat_map(|v| {
            v.template
                .vecs("NIC")
                .filter(|n| crate::template::vec_get(n, "NETWORK_ID") == Some(nid.as_str()))
                .filter_map(|n| crate::template::vec_get(n, "IP").map(|ip| (v.id, ip.to_string())))
                .collect::<Vec<_>>()
        })
        .collect()
}
