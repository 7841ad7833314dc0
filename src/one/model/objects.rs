//! VM templates, virtual networks, images, users and documents.

use indexmap::IndexMap;

use super::template::{
    int_of, item_path, parse_one, parse_pool, req_int, template, text_child, vector_map,
    ModelError, Template,
};
use crate::one::xml::{NodeId, Tree, EVERYTHING};

/// Owner and name fields every object has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// Owner id.
    pub uid: i64,
    /// Group id.
    pub gid: i64,
    /// Owner name.
    pub uname: String,
    /// Group name.
    pub gname: String,
}

fn owner(tree: &Tree<'_>, node: NodeId, path: &dyn Fn() -> String) -> Result<Owner, ModelError> {
    Ok(Owner {
        uid: req_int(tree, node, "UID", path)?,
        gid: req_int(tree, node, "GID", path)?,
        uname: text_child(tree, node, "UNAME"),
        gname: text_child(tree, node, "GNAME"),
    })
}

fn lock(
    tree: &Tree<'_>,
    node: NodeId,
    path: &dyn Fn() -> String,
) -> Result<Option<i64>, ModelError> {
    tree.child(node, "LOCK")
        .and_then(|l| tree.child(l, "LOCKED"))
        .map(|l| int_of(tree, l, path))
        .transpose()
}

fn template_of(tree: &Tree<'_>, node: NodeId) -> Template {
    tree.child(node, "TEMPLATE")
        .map(|t| template(tree, t))
        .unwrap_or_default()
}

/// A VM template (`one.template.info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmTemplate {
    /// `ID`.
    pub id: i64,
    /// `NAME`.
    pub name: String,
    /// Owner.
    pub owner: Owner,
    /// Registration time (epoch seconds).
    pub regtime: i64,
    /// Lock level when locked.
    pub lock: Option<i64>,
    /// `TEMPLATE`.
    pub template: Template,
}

fn vm_template_from_tree(
    tree: &Tree<'_>,
    node: NodeId,
    pool: Option<(&str, usize)>,
) -> Result<VmTemplate, ModelError> {
    let path = || item_path(pool, "VMTEMPLATE");
    Ok(VmTemplate {
        id: req_int(tree, node, "ID", &path)?,
        name: text_child(tree, node, "NAME"),
        owner: owner(tree, node, &path)?,
        regtime: tree
            .child(node, "REGTIME")
            .map(|c| int_of(tree, c, &path))
            .transpose()?
            .unwrap_or(0),
        lock: lock(tree, node, &path)?,
        template: template_of(tree, node),
    })
}

/// Parse a `<VMTEMPLATE>` document.
pub fn parse_vm_template(body: &str) -> Result<VmTemplate, ModelError> {
    parse_one(body, "VMTEMPLATE", EVERYTHING, vm_template_from_tree)
}

/// Parse a `<VMTEMPLATE_POOL>` document.
pub fn parse_vm_template_pool(body: &str) -> Result<Vec<VmTemplate>, ModelError> {
    parse_pool(
        body,
        "VMTEMPLATE_POOL",
        "VMTEMPLATE",
        EVERYTHING,
        vm_template_from_tree,
    )
}

/// An address range of a virtual network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressRange {
    /// `AR_ID`.
    pub ar_id: i64,
    /// All sub-elements except `LEASES`, in order (`TYPE`, `IP`, `MAC`, `SIZE`, …).
    pub attrs: IndexMap<String, String>,
    /// Number of leases listed (only `one.vn.info` lists them).
    pub leases: usize,
}

/// A virtual network (`one.vn.info`, `one.vnpool.info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtualNetwork {
    /// `ID`.
    pub id: i64,
    /// `NAME`.
    pub name: String,
    /// Owner.
    pub owner: Owner,
    /// `BRIDGE`.
    pub bridge: String,
    /// `VN_MAD`.
    pub vn_mad: String,
    /// `USED_LEASES`.
    pub used_leases: i64,
    /// `AR_POOL/AR`.
    pub address_ranges: Vec<AddressRange>,
    /// `TEMPLATE`.
    pub template: Template,
}

fn vnet_from_tree(
    tree: &Tree<'_>,
    node: NodeId,
    pool: Option<(&str, usize)>,
) -> Result<VirtualNetwork, ModelError> {
    let path = || item_path(pool, "VNET");
    let mut ars = Vec::new();
    if let Some(arp) = tree.child(node, "AR_POOL") {
        for (i, ar) in tree.children(arp).enumerate() {
            let ar_path = || format!("{}/AR_POOL/AR[{i}]", path());
            let mut attrs = vector_map(tree, ar);
            attrs.shift_remove("LEASES");
            ars.push(AddressRange {
                ar_id: req_int(tree, ar, "AR_ID", &ar_path)?,
                attrs,
                leases: tree
                    .child(ar, "LEASES")
                    .map_or(0, |l| tree.children(l).count()),
            });
        }
    }
    Ok(VirtualNetwork {
        id: req_int(tree, node, "ID", &path)?,
        name: text_child(tree, node, "NAME"),
        owner: owner(tree, node, &path)?,
        bridge: text_child(tree, node, "BRIDGE"),
        vn_mad: text_child(tree, node, "VN_MAD"),
        used_leases: tree
            .child(node, "USED_LEASES")
            .map(|c| int_of(tree, c, &path))
            .transpose()?
            .unwrap_or(0),
        address_ranges: ars,
        template: template_of(tree, node),
    })
}

/// Parse a `<VNET>` document.
pub fn parse_vnet(body: &str) -> Result<VirtualNetwork, ModelError> {
    parse_one(body, "VNET", EVERYTHING, vnet_from_tree)
}

/// Parse a `<VNET_POOL>` document.
pub fn parse_vnet_pool(body: &str) -> Result<Vec<VirtualNetwork>, ModelError> {
    parse_pool(body, "VNET_POOL", "VNET", EVERYTHING, vnet_from_tree)
}

/// An image (`one.image.info`): what an administrator who registered the appliance
/// images (`one.image.allocate`) waits on before instantiating VMs that use them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// `ID`.
    pub id: i64,
    /// `NAME`.
    pub name: String,
    /// `STATE` (image.xsd: 0 INIT, 1 READY, 2 USED, 3 DISABLED, 4 LOCKED, 5 ERROR, …).
    pub state: i64,
    /// `SOURCE`: where the datastore keeps the image.
    pub source: String,
}

impl Image {
    /// `STATE` READY: copied into its datastore, usable by VMs.
    pub const READY: i64 = 1;
    /// `STATE` ERROR: the copy failed.
    pub const ERROR: i64 = 5;
}

/// Parse an `<IMAGE>` document.
pub fn parse_image(body: &str) -> Result<Image, ModelError> {
    parse_one(body, "IMAGE", EVERYTHING, |tree, node, pool| {
        let path = || item_path(pool, "IMAGE");
        Ok(Image {
            id: req_int(tree, node, "ID", &path)?,
            name: text_child(tree, node, "NAME"),
            state: req_int(tree, node, "STATE", &path)?,
            source: text_child(tree, node, "SOURCE"),
        })
    })
}

/// A user (`one.user.info`). The password hash and login tokens are not kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// `ID`.
    pub id: i64,
    /// `NAME`.
    pub name: String,
    /// Primary group id.
    pub gid: i64,
    /// Primary group name.
    pub gname: String,
    /// All group ids.
    pub groups: Vec<i64>,
    /// `AUTH_DRIVER`.
    pub auth_driver: String,
    /// `ENABLED` = 1.
    pub enabled: bool,
}

fn user_from_tree(
    tree: &Tree<'_>,
    node: NodeId,
    pool: Option<(&str, usize)>,
) -> Result<User, ModelError> {
    let path = || item_path(pool, "USER");
    let groups = match tree.child(node, "GROUPS") {
        Some(g) => tree
            .children(g)
            .map(|c| int_of(tree, c, &|| format!("{}/GROUPS", path())))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok(User {
        id: req_int(tree, node, "ID", &path)?,
        name: text_child(tree, node, "NAME"),
        gid: req_int(tree, node, "GID", &path)?,
        gname: text_child(tree, node, "GNAME"),
        groups,
        auth_driver: text_child(tree, node, "AUTH_DRIVER"),
        enabled: tree.child_text(node, "ENABLED") == Some("1"),
    })
}

/// Parse a `<USER>` document.
pub fn parse_user(body: &str) -> Result<User, ModelError> {
    parse_one(body, "USER", EVERYTHING, user_from_tree)
}

/// A document (OneFlow stores services as TYPE 100 and service templates as TYPE 101).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    /// `ID`.
    pub id: i64,
    /// `NAME`.
    pub name: String,
    /// Owner.
    pub owner: Owner,
    /// `TYPE`.
    pub doc_type: i64,
    /// Lock level when locked.
    pub lock: Option<i64>,
    /// `LOCK/TIME` when locked: an unchanged one identifies a lock nobody released.
    pub lock_time: Option<i64>,
    /// `TEMPLATE` (OneFlow keeps its JSON in `BODY`).
    pub template: Template,
}

impl Document {
    /// `TEMPLATE/BODY`.
    pub fn body(&self) -> Option<&str> {
        self.template.get("BODY")
    }
}

fn document_from_tree(
    tree: &Tree<'_>,
    node: NodeId,
    pool: Option<(&str, usize)>,
) -> Result<Document, ModelError> {
    let path = || item_path(pool, "DOCUMENT");
    Ok(Document {
        id: req_int(tree, node, "ID", &path)?,
        name: text_child(tree, node, "NAME"),
        owner: owner(tree, node, &path)?,
        doc_type: req_int(tree, node, "TYPE", &path)?,
        lock: lock(tree, node, &path)?,
        lock_time: tree
            .child(node, "LOCK")
            .and_then(|l| tree.child(l, "TIME"))
            .map(|t| int_of(tree, t, &path))
            .transpose()?,
        template: template_of(tree, node),
    })
}

/// Parse a `<DOCUMENT>` document.
pub fn parse_document(body: &str) -> Result<Document, ModelError> {
    parse_one(body, "DOCUMENT", EVERYTHING, document_from_tree)
}

/// Parse a `<DOCUMENT_POOL>` document.
pub fn parse_document_pool(body: &str) -> Result<Vec<Document>, ModelError> {
    parse_pool(
        body,
        "DOCUMENT_POOL",
        "DOCUMENT",
        EVERYTHING,
        document_from_tree,
    )
}
