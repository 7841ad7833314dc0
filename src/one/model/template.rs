//! OpenNebula templates (TEMPLATE / USER_TEMPLATE / CONTEXT bodies) and helpers that turn
//! the borrowed XML tree into owned models with errors naming the element path.

use indexmap::IndexMap;

use super::attrs::AttrMap;
use crate::one::xml::{NodeId, Selection, Tree, XmlError};

/// A model could not be built: the path names the element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Malformed XML.
    #[error(transparent)]
    Xml(#[from] XmlError),
    /// An element is missing or holds the wrong kind of value.
    #[error("{path}: {reason}")]
    Field {
        /// Element path, e.g. `VM_POOL/VM[3]/STATE`.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

impl ModelError {
    pub(crate) fn field(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Field {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// One template attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateValue {
    /// `NAME = "value"`.
    Single(String),
    /// `NAME = [ K = "v", … ]` (sub-attributes in order).
    Vector(IndexMap<String, String>),
}

/// A template: attributes in OpenNebula's order, names may repeat (several `NIC`s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Template {
    /// The attributes.
    pub attrs: Vec<(String, TemplateValue)>,
}

impl Template {
    /// First single-valued attribute called `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.attrs.iter().find_map(|(k, v)| match v {
            TemplateValue::Single(s) if k == key => Some(s.as_str()),
            _ => None,
        })
    }

    /// First vector attribute called `key`.
    pub fn vector(&self, key: &str) -> Option<&IndexMap<String, String>> {
        self.attrs.iter().find_map(|(k, v)| match v {
            TemplateValue::Vector(m) if k == key => Some(m),
            _ => None,
        })
    }

    /// Every vector attribute called `key`.
    pub fn vectors<'s>(
        &'s self,
        key: &'s str,
    ) -> impl Iterator<Item = &'s IndexMap<String, String>> {
        self.attrs.iter().filter_map(move |(k, v)| match v {
            TemplateValue::Vector(m) if k == key => Some(m),
            _ => None,
        })
    }

    /// Single-valued attributes as an ordered map (first occurrence wins).
    pub fn singles(&self) -> IndexMap<String, String> {
        let mut out = IndexMap::new();
        for (k, v) in &self.attrs {
            if let TemplateValue::Single(s) = v {
                out.entry(k.clone()).or_insert_with(|| s.clone());
            }
        }
        out
    }
}

/// Sub-elements of a vector attribute (nested vectors are flattened away: OpenNebula has
/// none at the second level).
pub(crate) fn vector_map(tree: &Tree<'_>, node: NodeId) -> IndexMap<String, String> {
    tree.children(node)
        .filter(|&c| !tree.has_children(c))
        .map(|c| (tree.name(c).to_string(), tree.raw_text(c).to_string()))
        .collect()
}

/// Parse a template element.
pub(crate) fn template(tree: &Tree<'_>, node: NodeId) -> Template {
    Template {
        attrs: tree
            .children(node)
            .map(|c| {
                let v = if tree.has_children(c) {
                    TemplateValue::Vector(vector_map(tree, c))
                } else {
                    TemplateValue::Single(tree.raw_text(c).to_string())
                };
                (tree.name(c).to_string(), v)
            })
            .collect(),
    }
}

/// Leaf children of `node` as an [`AttrMap`] (one pass to size it, one to fill it).
pub(crate) fn attr_map(tree: &Tree<'_>, node: NodeId) -> AttrMap {
    let (mut n, mut bytes) = (0, 0);
    for c in tree.children(node).filter(|&c| !tree.has_children(c)) {
        n += 1;
        bytes += tree.name(c).len() + tree.raw_text(c).len();
    }
    let mut m = AttrMap::with_capacity(n, bytes);
    for c in tree.children(node).filter(|&c| !tree.has_children(c)) {
        m.push(tree.name(c), tree.raw_text(c));
    }
    m
}

/// Single-valued attributes into `singles`, vectors into `vectors`.
pub(crate) fn split_template(
    tree: &Tree<'_>,
    node: NodeId,
    singles: &mut AttrMap,
    vectors: &mut Vec<(String, AttrMap)>,
) {
    *singles = attr_map(tree, node);
    for c in tree.children(node).filter(|&c| tree.has_children(c)) {
        vectors.push((tree.name(c).to_string(), attr_map(tree, c)));
    }
}

/// Integer content of `node`.
pub(crate) fn int_of(
    tree: &Tree<'_>,
    node: NodeId,
    path: &dyn Fn() -> String,
) -> Result<i64, ModelError> {
    let t = tree.text(node);
    t.parse::<i64>().map_err(|_| {
        ModelError::field(
            format!("{}/{}", path(), tree.name(node)),
            format!(
                "expected an integer, found {:?}",
                crate::one::json::shorten(t)
            ),
        )
    })
}

/// Required integer child.
pub(crate) fn req_int(
    tree: &Tree<'_>,
    node: NodeId,
    name: &str,
    path: &dyn Fn() -> String,
) -> Result<i64, ModelError> {
    match tree.child(node, name) {
        Some(c) => int_of(tree, c, path),
        None => Err(ModelError::field(format!("{}/{name}", path()), "missing")),
    }
}

/// Optional string child (empty when absent).
pub(crate) fn text_child(tree: &Tree<'_>, node: NodeId, name: &str) -> String {
    tree.child_text(node, name).unwrap_or_default().to_string()
}

/// Path prefix `ROOT` or `POOL/ROOT[i]` for errors.
pub(crate) fn item_path(pool: Option<(&str, usize)>, root: &str) -> String {
    match pool {
        Some((p, i)) => format!("{p}/{root}[{i}]"),
        None => root.to_string(),
    }
}

/// Parse a pool body: every child element named `item` (with the elements `sel` selects)
/// goes through `parse`.
pub(crate) fn parse_pool<T>(
    body: &str,
    pool_name: &str,
    item: &str,
    sel: Selection,
    mut parse: impl FnMut(&Tree<'_>, NodeId, Option<(&str, usize)>) -> Result<T, ModelError>,
) -> Result<Vec<T>, ModelError> {
    let mut out = Vec::new();
    let mut i = 0usize;
    crate::one::xml::for_each_child(body, pool_name, sel, |tree, node| {
        if tree.name(node) == item {
            out.push(parse(tree, node, Some((pool_name, i)))?);
            i += 1;
        }
        Ok::<(), ModelError>(())
    })?;
    Ok(out)
}

/// Parse a single-object document whose root must be `root` (with the elements `sel`
/// selects).
pub(crate) fn parse_one<T>(
    body: &str,
    root: &str,
    sel: Selection,
    parse: impl FnOnce(&Tree<'_>, NodeId, Option<(&str, usize)>) -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    let tree = crate::one::xml::parse_document(body, sel)?;
    let r = tree.root();
    if tree.name(r) != root {
        return Err(ModelError::field(
            tree.name(r),
            format!("expected a <{root}> document"),
        ));
    }
    parse(&tree, r, None)
}
