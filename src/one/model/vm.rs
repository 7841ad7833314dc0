//! Virtual machines: full bodies (`one.vm.info`, `one.vmpool.infoextended`) and short bodies
//! (`one.vmpool.info`, which lack PERMISSIONS, CONTEXT and custom USER_TEMPLATE keys).

use super::attrs::AttrMap;
use super::states::{LcmState, VmState};
use super::template::{
    attr_map, int_of, item_path, parse_one, parse_pool, split_template, ModelError,
};
use crate::one::xml::{NodeId, Sel, Selection, Tree, ALL};

/// A NIC of the VM's system template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nic {
    /// `NIC_ID`.
    pub nic_id: Option<i64>,
    /// `IP` (IPv4).
    pub ip: Option<String>,
    /// `IP6_GLOBAL`.
    pub ip6_global: Option<String>,
    /// `IP6` (a static IPv6 address range).
    pub ip6: Option<String>,
    /// `IP6_ULA`.
    pub ip6_ula: Option<String>,
    /// `IP6_LINK`.
    pub ip6_link: Option<String>,
    /// `EXTERNAL_IP` (the NAT address of the NIC).
    pub external_ip: Option<String>,
    /// `MAC`.
    pub mac: Option<String>,
    /// `NETWORK` (name).
    pub network: Option<String>,
    /// `NETWORK_ID`.
    pub network_id: Option<i64>,
    /// `NAME`, e.g. `NIC0`.
    pub name: Option<String>,
}

/// A VM (full or short body; absent parts are empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vm {
    /// `ID`.
    pub id: i64,
    /// `NAME`.
    pub name: String,
    /// Owner id.
    pub uid: i64,
    /// Group id.
    pub gid: i64,
    /// Owner name.
    pub uname: String,
    /// Group name.
    pub gname: String,
    /// `STATE`.
    pub state: VmState,
    /// `LCM_STATE`.
    pub lcm_state: LcmState,
    /// Start time (epoch seconds).
    pub stime: i64,
    /// End time (epoch seconds, 0 while alive).
    pub etime: i64,
    /// Hypervisor id, empty before deploy.
    pub deploy_id: String,
    /// `LOCK/LOCKED` level when locked.
    pub lock: Option<i64>,
    /// `TEMPLATE/TEMPLATE_ID`, the VM template it came from.
    pub template_id: Option<i64>,
    /// `TEMPLATE/NIC`s.
    pub nics: Vec<Nic>,
    /// `TEMPLATE/NIC_ALIAS`es (extra addresses on a NIC).
    pub nic_aliases: Vec<Nic>,
    /// `TEMPLATE/CONTEXT`, in order.
    pub context: AttrMap,
    /// Single-valued `USER_TEMPLATE` attributes in order (`READY`, `SERVICE_ID`,
    /// `ROLE_NAME`, `FL_*`, …).
    pub user_template: AttrMap,
    /// Vector `USER_TEMPLATE` attributes (e.g. `SCHED_ACTION`), in order.
    pub user_template_vectors: Vec<(String, AttrMap)>,
    /// Host of the last history record.
    pub hostname: Option<String>,
}

impl Vm {
    /// A single-valued user-template attribute.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.user_template.get(key)
    }

    /// `USER_TEMPLATE/SERVICE_ID` as a number (`None` if absent or not a number).
    pub fn service_id(&self) -> Option<i64> {
        self.attr("SERVICE_ID")?.trim().parse().ok()
    }

    /// `USER_TEMPLATE/ROLE_NAME`.
    pub fn role_name(&self) -> Option<&str> {
        self.attr("ROLE_NAME")
    }

    /// `READY=YES` (trimmed), as OneFlow's ready_status_gate reads it.
    pub fn is_ready(&self) -> bool {
        self.attr("READY").is_some_and(|v| v.trim() == "YES")
    }

    /// ACTIVE/RUNNING.
    pub fn is_running(&self) -> bool {
        self.state == VmState::Active && self.lcm_state == LcmState::Running
    }

    /// First IPv4 address of any NIC.
    pub fn first_ip(&self) -> Option<&str> {
        self.nics.iter().find_map(|n| n.ip.as_deref())
    }

    /// Every address oned assigned to the VM's NICs and NIC aliases (IPv4, IPv6 and the
    /// NAT address), in document order; values that are not IP addresses are left out.
    /// oned writes these and neither the VM's owner nor OneGate can change them, unlike the
    /// user template.
    pub fn addresses(&self) -> Vec<std::net::IpAddr> {
        self.nics
            .iter()
            .chain(&self.nic_aliases)
            .flat_map(|n| {
                [
                    &n.ip,
                    &n.ip6,
                    &n.ip6_global,
                    &n.ip6_ula,
                    &n.ip6_link,
                    &n.external_ip,
                ]
            })
            .filter_map(|a| a.as_deref()?.trim().parse().ok())
            .collect()
    }
}

fn nic(tree: &Tree<'_>, node: NodeId) -> Nic {
    let mut n = Nic::default();
    for c in tree.children(node) {
        let v = || Some(tree.raw_text(c).to_string());
        match tree.name(c) {
            "NIC_ID" => n.nic_id = tree.text(c).parse().ok(),
            "IP" => n.ip = v(),
            "IP6_GLOBAL" => n.ip6_global = v(),
            "IP6" => n.ip6 = v(),
            "IP6_ULA" => n.ip6_ula = v(),
            "IP6_LINK" => n.ip6_link = v(),
            "EXTERNAL_IP" => n.external_ip = v(),
            "MAC" => n.mac = v(),
            "NETWORK" => n.network = v(),
            "NETWORK_ID" => n.network_id = tree.text(c).parse().ok(),
            "NAME" => n.name = v(),
            _ => {}
        }
    }
    n
}

// Selection states of the VM body (see `VM_ELEMENTS`).
const VM: Sel = 1;
const VM_TEMPLATE: Sel = 2;
const HISTORY_RECORDS: Sel = 3;
const HISTORY: Sel = 4;

/// The elements `vm_from_tree` reads; everything else (PERMISSIONS, MONITORING, DISKs,
/// HISTORY details, SNAPSHOTS, BACKUPS, ...) is skipped unparsed, which is most of a full
/// body. Keep in step with `vm_from_tree` and `nic` (the test
/// `selection_keeps_all_the_model_reads` compares against a full parse).
const VM_ELEMENTS: Selection = Selection {
    root: VM,
    child: |parent, name| match (parent, name) {
        (
            VM,
            "ID" | "UID" | "GID" | "UNAME" | "GNAME" | "NAME" | "STATE" | "LCM_STATE" | "STIME"
            | "ETIME" | "DEPLOY_ID" | "LOCK" | "USER_TEMPLATE",
        ) => Some(ALL),
        (VM, "TEMPLATE") => Some(VM_TEMPLATE),
        (VM, "HISTORY_RECORDS") => Some(HISTORY_RECORDS),
        (VM_TEMPLATE, "NIC" | "NIC_ALIAS" | "CONTEXT" | "TEMPLATE_ID") => Some(ALL),
        // Every record is kept (the model reads the last one) but only its HOSTNAME.
        (HISTORY_RECORDS, _) => Some(HISTORY),
        (HISTORY, "HOSTNAME") => Some(ALL),
        _ => None,
    },
};

/// Build a VM from its `<VM>` element. One pass over the children; unknown elements are
/// ignored.
pub(crate) fn vm_from_tree(
    tree: &Tree<'_>,
    node: NodeId,
    pool: Option<(&str, usize)>,
) -> Result<Vm, ModelError> {
    let path = || item_path(pool, "VM");
    let mut vm = Vm::default();
    let (mut has_id, mut has_state, mut has_lcm) = (false, false, false);
    for c in tree.children(node) {
        match tree.name(c) {
            "ID" => {
                vm.id = int_of(tree, c, &path)?;
                has_id = true;
            }
            "UID" => vm.uid = int_of(tree, c, &path)?,
            "GID" => vm.gid = int_of(tree, c, &path)?,
            "UNAME" => vm.uname = tree.text(c).to_string(),
            "GNAME" => vm.gname = tree.text(c).to_string(),
            "NAME" => vm.name = tree.text(c).to_string(),
            "STATE" => {
                vm.state = VmState::from_code(int_of(tree, c, &path)?);
                has_state = true;
            }
            "LCM_STATE" => {
                vm.lcm_state = LcmState::from_code(int_of(tree, c, &path)?);
                has_lcm = true;
            }
            "STIME" => vm.stime = int_of(tree, c, &path)?,
            "ETIME" => vm.etime = int_of(tree, c, &path)?,
            "DEPLOY_ID" => vm.deploy_id = tree.text(c).to_string(),
            "LOCK" => {
                vm.lock = tree
                    .child(c, "LOCKED")
                    .map(|l| int_of(tree, l, &|| format!("{}/LOCK", path())))
                    .transpose()?;
            }
            "TEMPLATE" => {
                for t in tree.children(c) {
                    match tree.name(t) {
                        "NIC" => vm.nics.push(nic(tree, t)),
                        "NIC_ALIAS" => vm.nic_aliases.push(nic(tree, t)),
                        "CONTEXT" => vm.context = attr_map(tree, t),
                        "TEMPLATE_ID" => vm.template_id = tree.text(t).parse().ok(),
                        _ => {}
                    }
                }
            }
            "USER_TEMPLATE" => split_template(
                tree,
                c,
                &mut vm.user_template,
                &mut vm.user_template_vectors,
            ),
            "HISTORY_RECORDS" => {
                vm.hostname = tree
                    .children(c)
                    .last()
                    .and_then(|h| tree.child_text(h, "HOSTNAME"))
                    .map(str::to_string);
            }
            _ => {}
        }
    }
    for (ok, name) in [(has_id, "ID"), (has_state, "STATE"), (has_lcm, "LCM_STATE")] {
        if !ok {
            return Err(ModelError::field(format!("{}/{name}", path()), "missing"));
        }
    }
    Ok(vm)
}

/// Parse a `<VM>` document (`one.vm.info`).
pub fn parse_vm(body: &str) -> Result<Vm, ModelError> {
    parse_one(body, "VM", VM_ELEMENTS, vm_from_tree)
}

/// Parse a `<VM_POOL>` document, short or extended.
pub fn parse_vm_pool(body: &str) -> Result<Vec<Vm>, ModelError> {
    parse_pool(body, "VM_POOL", "VM", VM_ELEMENTS, vm_from_tree)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::one::xml::EVERYTHING;

    #[test]
    fn selection_keeps_all_the_model_reads() {
        for pool in [
            include_str!("../../../tests/fixtures/one/vmpool_extended.xml"),
            include_str!("../../../tests/fixtures/one/vmpool_short.xml"),
        ] {
            let skipping = parse_vm_pool(pool).unwrap();
            let full = parse_pool(pool, "VM_POOL", "VM", EVERYTHING, vm_from_tree).unwrap();
            assert!(!skipping.is_empty());
            assert_eq!(skipping, full);
        }
        let one = include_str!("../../../tests/fixtures/one/vm_full.xml");
        let full = parse_one(one, "VM", EVERYTHING, vm_from_tree).unwrap();
        assert_eq!(parse_vm(one).unwrap(), full);
        assert!(full.hostname.is_some() && !full.nics.is_empty() && !full.context.is_empty());
    }

    #[test]
    fn addresses_come_from_every_nic_and_alias() {
        let vm = "<VM><ID>1</ID><STATE>3</STATE><LCM_STATE>3</LCM_STATE><TEMPLATE>\
            <NIC><IP>10.0.0.5</IP><IP6_GLOBAL>2001:db8::5</IP6_GLOBAL><IP6_LINK>fe80::5</IP6_LINK>\
              <IP6_ULA>fd00::5</IP6_ULA><EXTERNAL_IP>198.51.100.5</EXTERNAL_IP></NIC>\
            <NIC><IP6>2001:db8:1::5</IP6><IP>not-an-ip</IP></NIC>\
            <NIC_ALIAS><IP>10.0.1.5</IP></NIC_ALIAS></TEMPLATE></VM>";
        let got: Vec<String> = parse_vm(vm)
            .unwrap()
            .addresses()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "10.0.0.5",
                "2001:db8::5",
                "fd00::5",
                "fe80::5",
                "198.51.100.5",
                "2001:db8:1::5",
                "10.0.1.5"
            ]
        );
    }

    #[test]
    fn skipped_sections_cannot_leak_into_the_model() {
        // Look-alikes of every element the model reads, inside sections it skips: as
        // elements, inside CDATA and comments, and with a nested element of the same name.
        let decoys = "<ID>666</ID><NAME>evil</NAME><STATE>7</STATE><LCM_STATE>16</LCM_STATE>\
            <USER_TEMPLATE><FL_ROLE>evil</FL_ROLE><READY>NO</READY></USER_TEMPLATE>\
            <TEMPLATE><NIC><IP>6.6.6.6</IP></NIC><CONTEXT><X>evil</X></CONTEXT></TEMPLATE>\
            <NIC><IP>6.6.6.6</IP></NIC><CONTEXT><X>evil</X></CONTEXT><HOSTNAME>evil</HOSTNAME>\
            <LOCK><LOCKED>4</LOCKED></LOCK><HISTORY_RECORDS><HISTORY><HOSTNAME>evil</HOSTNAME></HISTORY></HISTORY_RECORDS>";
        let vm = format!(
            "<VM><ID>7</ID><NAME>real</NAME>\
             <PERMISSIONS>{decoys}</PERMISSIONS>\
             <MONITORING>{decoys}<MONITORING>{decoys}</MONITORING>\
               <CPU><![CDATA[</MONITORING><USER_TEMPLATE><FL_ROLE>evil</FL_ROLE></USER_TEMPLATE>]]></CPU>\
               <!-- </MONITORING><ID>666</ID> --></MONITORING>\
             <STATE>3</STATE><LCM_STATE>3</LCM_STATE>\
             <SNAPSHOTS>{decoys}</SNAPSHOTS>\
             <TEMPLATE><DISK>{decoys}</DISK><NIC><IP>10.0.0.7</IP></NIC><GRAPHICS>{decoys}</GRAPHICS>\
               <CONTEXT><TOKEN>YES</TOKEN></CONTEXT><OS>{decoys}</OS></TEMPLATE>\
             <USER_TEMPLATE><FL_ROLE>supernode</FL_ROLE><READY>YES</READY></USER_TEMPLATE>\
             <HISTORY_RECORDS><HISTORY><VM_MAD>{decoys}</VM_MAD><HOSTNAME>node1</HOSTNAME>\
               <ACTION>{decoys}</ACTION></HISTORY></HISTORY_RECORDS>\
             <BACKUPS>{decoys}</BACKUPS></VM>"
        );
        let expected = Vm {
            id: 7,
            name: "real".into(),
            state: VmState::Active,
            lcm_state: LcmState::Running,
            nics: vec![Nic {
                ip: Some("10.0.0.7".into()),
                ..Nic::default()
            }],
            context: {
                let mut m = AttrMap::default();
                m.push("TOKEN", "YES");
                m
            },
            user_template: {
                let mut m = AttrMap::default();
                m.push("FL_ROLE", "supernode");
                m.push("READY", "YES");
                m
            },
            hostname: Some("node1".into()),
            ..Vm::default()
        };
        assert_eq!(parse_vm(&vm).unwrap(), expected);
        assert_eq!(
            expected.addresses(),
            ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
        );
        let pool = format!("<VM_POOL>{vm}{vm}</VM_POOL>");
        assert_eq!(parse_vm_pool(&pool).unwrap(), [expected.clone(), expected]);
    }
}
