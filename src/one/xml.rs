//! A flat, borrowed XML tree on quick-xml: one `Vec` of nodes whose names and texts
//! borrow from the input (only text mixing entity references and other text is copied).
//! Pools are streamed: each top-level object is parsed into a reused tree, turned into a
//! typed model, and the tree is cleared.

use std::borrow::Cow;

use quick_xml::events::Event;
use quick_xml::Reader;

const NONE: u32 = u32::MAX;

/// Malformed XML, with the byte offset where it was noticed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XML at byte {position}: {reason}")]
pub struct XmlError {
    /// Byte offset in the document.
    pub position: u64,
    /// What was wrong.
    pub reason: String,
}

#[derive(Debug)]
pub(crate) struct Node<'a> {
    pub(crate) name: &'a str,
    pub(crate) text: Cow<'a, str>,
    first_child: u32,
    last_child: u32,
    next_sibling: u32,
}

/// Index of a node in a [`Tree`].
pub(crate) type NodeId = u32;

#[derive(Debug, Default)]
pub(crate) struct Tree<'a> {
    nodes: Vec<Node<'a>>,
}

impl<'a> Tree<'a> {
    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
    }

    pub(crate) fn root(&self) -> NodeId {
        0
    }

    pub(crate) fn name(&self, id: NodeId) -> &'a str {
        self.nodes[id as usize].name
    }

    /// Text content, surrounding whitespace trimmed.
    pub(crate) fn text(&self, id: NodeId) -> &str {
        self.nodes[id as usize].text.trim()
    }

    /// Text content exactly as sent (template values keep their spaces).
    pub(crate) fn raw_text(&self, id: NodeId) -> &str {
        &self.nodes[id as usize].text
    }

    pub(crate) fn has_children(&self, id: NodeId) -> bool {
        self.nodes[id as usize].first_child != NONE
    }

    pub(crate) fn children(&self, id: NodeId) -> Children<'_, 'a> {
        Children {
            tree: self,
            next: self.nodes[id as usize].first_child,
        }
    }

    pub(crate) fn child(&self, id: NodeId, name: &str) -> Option<NodeId> {
        self.children(id).find(|&c| self.name(c) == name)
    }

    pub(crate) fn child_text(&self, id: NodeId, name: &str) -> Option<&str> {
        self.child(id, name).map(|c| self.text(c))
    }

    fn push(&mut self, name: &'a str, parent: Option<NodeId>) -> NodeId {
        let id = self.nodes.len() as u32;
        self.nodes.push(Node {
            name,
            text: Cow::Borrowed(""),
            first_child: NONE,
            last_child: NONE,
            next_sibling: NONE,
        });
        if let Some(p) = parent {
            let last = self.nodes[p as usize].last_child;
            if last == NONE {
                self.nodes[p as usize].first_child = id;
            } else {
                self.nodes[last as usize].next_sibling = id;
            }
            self.nodes[p as usize].last_child = id;
        }
        id
    }

    fn append_text(&mut self, id: NodeId, piece: Cow<'a, str>) {
        let text = &mut self.nodes[id as usize].text;
        if text.is_empty() {
            *text = piece;
        } else {
            text.to_mut().push_str(&piece);
        }
    }
}

pub(crate) struct Children<'t, 'a> {
    tree: &'t Tree<'a>,
    next: u32,
}

impl Iterator for Children<'_, '_> {
    type Item = NodeId;
    fn next(&mut self) -> Option<NodeId> {
        if self.next == NONE {
            return None;
        }
        let id = self.next;
        self.next = self.tree.nodes[id as usize].next_sibling;
        Some(id)
    }
}

pub(crate) fn reader(input: &str) -> Reader<&[u8]> {
    let mut r = Reader::from_str(input);
    let c = r.config_mut();
    c.trim_text(false);
    c.check_end_names = true;
    r
}

fn err(reader: &Reader<&[u8]>, reason: impl Into<String>) -> XmlError {
    XmlError {
        position: reader.buffer_position(),
        reason: reason.into(),
    }
}

/// Text borrowed from the reader as a slice of `input` (its address lies inside `input`,
/// so no UTF-8 re-validation is needed); anything else is validated.
fn utf8<'a>(
    reader: &Reader<&'a [u8]>,
    input: &'a str,
    bytes: Cow<'a, [u8]>,
) -> Result<Cow<'a, str>, XmlError> {
    match bytes {
        Cow::Borrowed(b) => {
            let start = (b.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
            if let Some(s) = start
                .checked_add(b.len())
                .and_then(|end| input.get(start..end))
            {
                return Ok(Cow::Borrowed(s));
            }
            std::str::from_utf8(b)
                .map(Cow::Borrowed)
                .map_err(|_| err(reader, "invalid UTF-8"))
        }
        Cow::Owned(b) => String::from_utf8(b)
            .map(Cow::Owned)
            .map_err(|_| err(reader, "invalid UTF-8")),
    }
}

/// The element name of a start tag, as a slice of `input` (the reader borrows from it, so
/// the name's address lies inside `input`; anything else is refused).
fn tag_name<'a>(
    reader: &Reader<&'a [u8]>,
    input: &'a str,
    e: &quick_xml::events::BytesStart<'_>,
) -> Result<&'a str, XmlError> {
    let name = e.name();
    let bytes = name.as_ref();
    let start = (bytes.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
    let end = start.wrapping_add(bytes.len());
    if start > input.len() || end > input.len() {
        return Err(err(reader, "tag name outside the input"));
    }
    input
        .get(start..end)
        .ok_or_else(|| err(reader, "invalid UTF-8 in a tag name"))
}

fn resolve_ref<'a>(
    reader: &Reader<&'a [u8]>,
    r: &quick_xml::events::BytesRef<'a>,
) -> Result<Cow<'a, str>, XmlError> {
    if let Some(c) = r
        .resolve_char_ref()
        .map_err(|e| err(reader, format!("bad character reference: {e}")))?
    {
        return Ok(Cow::Owned(c.to_string()));
    }
    let name = r.decode().map_err(|_| err(reader, "invalid entity name"))?;
    let s = match name.as_ref() {
        "lt" => "<",
        "gt" => ">",
        "amp" => "&",
        "quot" => "\"",
        "apos" => "'",
        other => return Err(err(reader, format!("unknown entity &{other};"))),
    };
    Ok(Cow::Borrowed(s))
}

/// Parse the element whose start tag (`name`) was just read, into `tree` (appended).
pub(crate) fn read_subtree<'a>(
    reader: &mut Reader<&'a [u8]>,
    input: &'a str,
    name: &'a str,
    tree: &mut Tree<'a>,
) -> Result<NodeId, XmlError> {
    let root = tree.push(name, None);
    let mut stack: Vec<NodeId> = vec![root];
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| err(reader, e.to_string()))?;
        let Some(&cur) = stack.last() else {
            return Ok(root);
        };
        match ev {
            Event::Start(e) => {
                let n = tag_name(reader, input, &e)?;
                let id = tree.push(n, Some(cur));
                stack.push(id);
            }
            Event::Empty(e) => {
                let n = tag_name(reader, input, &e)?;
                tree.push(n, Some(cur));
            }
            Event::End(_) => {
                stack.pop();
                if stack.is_empty() {
                    return Ok(root);
                }
            }
            Event::Text(t) => {
                let raw = t.into_inner();
                if raw.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let s = utf8(reader, input, raw)?;
                tree.append_text(cur, s);
            }
            Event::CData(c) => {
                let s = utf8(reader, input, c.into_inner())?;
                tree.append_text(cur, s);
            }
            Event::GeneralRef(r) => {
                let s = resolve_ref(reader, &r)?;
                tree.append_text(cur, s);
            }
            Event::Eof => return Err(err(reader, format!("document ends inside <{name}>"))),
            Event::Comment(_) | Event::PI(_) | Event::Decl(_) | Event::DocType(_) => {}
        }
    }
}

/// Read up to the first start tag; returns its name (`None` for an empty root `<X/>`).
pub(crate) fn read_root<'a>(
    reader: &mut Reader<&'a [u8]>,
    input: &'a str,
) -> Result<(&'a str, bool), XmlError> {
    loop {
        match reader
            .read_event()
            .map_err(|e| err(reader, e.to_string()))?
        {
            Event::Start(e) => return Ok((tag_name(reader, input, &e)?, true)),
            Event::Empty(e) => return Ok((tag_name(reader, input, &e)?, false)),
            Event::Eof => return Err(err(reader, "empty document")),
            Event::Text(t) if !t.iter().all(u8::is_ascii_whitespace) => {
                return Err(err(reader, "text before the root element"))
            }
            _ => {}
        }
    }
}

/// Parse a whole document into a tree.
pub(crate) fn parse_document(input: &str) -> Result<Tree<'_>, XmlError> {
    let mut r = reader(input);
    let mut tree = Tree::default();
    let (name, open) = read_root(&mut r, input)?;
    if open {
        read_subtree(&mut r, input, name, &mut tree)?;
    } else {
        tree.push(name, None);
    }
    Ok(tree)
}

/// Stream the children of the root element `expected_root`: each child element is parsed
/// into a reused tree and handed to `each` with its name.
pub(crate) fn for_each_child<'a, E>(
    input: &'a str,
    expected_root: &str,
    mut each: impl FnMut(&Tree<'a>, NodeId) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<XmlError>,
{
    let mut r = reader(input);
    let (root, open) = read_root(&mut r, input)?;
    if root != expected_root {
        return Err(err(&r, format!("root is <{root}>, expected <{expected_root}>")).into());
    }
    if !open {
        return Ok(());
    }
    let mut tree = Tree::default();
    loop {
        let ev = r.read_event().map_err(|e| err(&r, e.to_string()))?;
        match ev {
            Event::Start(e) => {
                let n = tag_name(&r, input, &e)?;
                tree.clear();
                let id = read_subtree(&mut r, input, n, &mut tree)?;
                each(&tree, id)?;
            }
            Event::Empty(e) => {
                let n = tag_name(&r, input, &e)?;
                tree.clear();
                let id = tree.push(n, None);
                each(&tree, id)?;
            }
            Event::End(_) => return Ok(()),
            Event::Eof => {
                return Err(err(&r, format!("document ends inside <{expected_root}>")).into())
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_keeps_cdata_entities_and_order() {
        let doc = "<VM><ID>7</ID><NAME>a &amp; b</NAME><T><X><![CDATA[ 1 ]]></X><Y/><X><![CDATA[<2>]]></X></T></VM>";
        let t = parse_document(doc).unwrap();
        let root = t.root();
        assert_eq!(t.name(root), "VM");
        assert_eq!(t.child_text(root, "ID"), Some("7"));
        assert_eq!(t.child_text(root, "NAME"), Some("a & b"));
        let tt = t.child(root, "T").unwrap();
        let kids: Vec<_> = t.children(tt).map(|c| (t.name(c), t.raw_text(c))).collect();
        assert_eq!(kids, [("X", " 1 "), ("Y", ""), ("X", "<2>")]);
    }

    #[test]
    fn malformed_documents_are_errors() {
        for bad in ["", "<A>", "<A></B>", "text", "<A>&bogus;</A>"] {
            assert!(parse_document(bad).is_err(), "{bad:?}");
        }
    }
}
