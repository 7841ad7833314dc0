//! Typed models of OpenNebula objects, parsed from oned's XML bodies (CDATA handled,
//! unknown elements ignored, errors name the element path).

pub mod attrs;
pub mod objects;
pub mod states;
pub mod template;
pub mod vm;

pub use attrs::AttrMap;
pub use objects::{
    parse_document, parse_document_pool, parse_image, parse_user, parse_vm_template,
    parse_vm_template_pool, parse_vnet, parse_vnet_pool, AddressRange, Document, Image, Owner,
    User, VirtualNetwork, VmTemplate,
};
pub use states::{LcmState, RoleState, ServiceState, VmState};
pub use template::{ModelError, Template, TemplateValue};
pub use vm::{parse_vm, parse_vm_pool, Nic, Vm};
