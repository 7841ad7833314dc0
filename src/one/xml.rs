//! A flat, borrowed XML tree on quick-xml: one `Vec` of nodes whose names and texts
//! borrow from the input (only text mixing entity references and other text is copied).
//! Pools are streamed: each top-level object is parsed into a reused tree, turned into a
//! typed model, and the tree is cleared. A [`Selection`] lets a model name the elements it
//! reads; the others (MONITORING, HISTORY details, DISKs, ...) are stepped over by a byte
//! scanner without building nodes, which halves the work on full VM bodies.

use std::borrow::Cow;

use quick_xml::events::Event;
use quick_xml::Reader;

const NONE: u32 = u32::MAX;

/// Elements may nest at most this deep (oned's deepest bodies nest about 8); deeper input
/// is refused with [`XmlErrorKind::TooDeep`] before it costs stack or memory.
pub const MAX_DEPTH: usize = 64;

/// Malformed or refused XML, with the byte offset where it was noticed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} XML at byte {position}: {reason}")]
pub struct XmlError {
    /// Why the document was refused.
    pub kind: XmlErrorKind,
    /// Byte offset in the document.
    pub position: u64,
    /// What was wrong.
    pub reason: String,
}

/// The kinds of [`XmlError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XmlErrorKind {
    /// Not well-formed, or not the expected structure.
    Malformed,
    /// Elements nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

impl std::fmt::Display for XmlErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XmlErrorKind::Malformed => "malformed",
            XmlErrorKind::TooDeep => "too deeply nested",
        })
    }
}

impl XmlError {
    /// A malformed document.
    pub fn malformed(position: u64, reason: impl Into<String>) -> Self {
        Self {
            kind: XmlErrorKind::Malformed,
            position,
            reason: reason.into(),
        }
    }

    /// Nesting deeper than [`MAX_DEPTH`] at `position`.
    pub fn too_deep(position: u64) -> Self {
        Self {
            kind: XmlErrorKind::TooDeep,
            position,
            reason: format!("more than {MAX_DEPTH} nested elements"),
        }
    }
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
    // Scratch stacks kept between objects of a pool so that parsing one allocates nothing.
    open: Vec<Open<'a>>,
}

/// Selection state of an element (see [`Selection`]).
pub(crate) type Sel = u8;

/// State meaning "keep this element and everything below it".
pub(crate) const ALL: Sel = 0;

/// Which elements of an object a model reads. The object's root element gets state `root`;
/// a child element `name` of an element in state `s` gets `child(s, name)`, or is skipped
/// unread (no node, no text) when that is `None`. Below an element in state [`ALL`]
/// everything is kept without asking.
#[derive(Clone, Copy)]
pub(crate) struct Selection {
    /// State of the root element.
    pub(crate) root: Sel,
    /// State of a child element, `None` to skip it.
    pub(crate) child: fn(Sel, &str) -> Option<Sel>,
}

/// Keep every element.
pub(crate) const EVERYTHING: Selection = Selection {
    root: ALL,
    child: |_, _| Some(ALL),
};

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

fn err(reader: &Reader<&[u8]>, input: &str, reason: impl Into<String>) -> XmlError {
    XmlError::malformed(position(reader, input), reason)
}

/// Byte offset of the reader in `input`. Skipping moves the reader's slice forward behind
/// quick-xml's back, so its own counter falls behind; the length of what is left is exact.
fn position(reader: &Reader<&[u8]>, input: &str) -> u64 {
    input.len().saturating_sub(reader.get_ref().len()) as u64
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
        return Err(err(reader, input, "tag name outside the input"));
    }
    input
        .get(start..end)
        .ok_or_else(|| err(reader, input, "invalid UTF-8 in a tag name"))
}

/// Index of the `>` ending a start tag (`tag` starts after its `<`), stepping over quoted
/// attribute values, which may hold `>`. A plain loop: tags are a few bytes long, too
/// short for memchr's set-up to pay off.
fn start_tag_end(tag: &[u8]) -> Option<usize> {
    let mut quote = None;
    tag.iter().position(|&b| match quote {
        Some(q) => {
            if b == q {
                quote = None;
            }
            false
        }
        None if b == b'"' || b == b'\'' => {
            quote = Some(b);
            false
        }
        None => b == b'>',
    })
}

/// First occurrence of the short `needle` in `hay` (building a memmem finder costs more
/// than the search for the few bytes of a CDATA section).
fn find_seq(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut j = 0;
    loop {
        let k = j + memchr::memchr(first, &hay[j..])?;
        if hay[k..].starts_with(needle) {
            return Some(k);
        }
        j = k + 1;
    }
}

/// An element open in [`read_content`]: its name, its node ([`NONE`] when skipped) and
/// its selection state.
#[derive(Debug, Clone, Copy)]
struct Open<'a> {
    name: &'a str,
    node: NodeId,
    sel: Sel,
}

/// Selection state of a child element `name` of an element in state `parent`.
fn child_state(sel: Selection, parent: Sel, name: &str) -> Option<Sel> {
    if parent == ALL {
        Some(ALL)
    } else {
        (sel.child)(parent, name)
    }
}

/// `input[a..b]`, or an error if that is not a slice of `input` (cannot happen when the
/// bounds sit next to ASCII markup bytes, as all callers' do).
fn slice(input: &str, a: usize, b: usize) -> Result<&str, XmlError> {
    input
        .get(a..b)
        .ok_or_else(|| XmlError::malformed(a as u64, "markup splits a UTF-8 character"))
}

/// Build the content of the element `root` (node `root_node`) whose start tag ends at
/// `start` in `input`, keeping what `sel` selects; returns the offset of its end tag.
/// This is the hot loop of every pool parse, so it scans bytes itself (memchr for text and
/// CDATA) rather than going through quick-xml's per-event machinery, which cost three
/// times as much on a 20,000-VM body.
///
/// Guarantees: start and end tags pair up by name (quick-xml's `check_end_names`); text
/// and CDATA go to the innermost kept element exactly as before (entity and character
/// references decoded by quick-xml's `unescape`, whitespace-only runs dropped, CDATA
/// verbatim); skipped elements build no node, and tag look-alikes inside CDATA,
/// comments and processing instructions do not count.
/// Caveats: text inside a skipped element is not decoded, so a bad entity reference there
/// is not reported; attributes are stepped over (oned sends none in these bodies).
fn read_content<'a>(
    input: &'a str,
    start: usize,
    root: &'a str,
    root_node: NodeId,
    sel: Selection,
    tree: &mut Tree<'a>,
) -> Result<usize, XmlError> {
    let bytes = input.as_bytes();
    let fail = |at: usize, reason: String| XmlError::malformed(at as u64, reason);
    let eof = |name: &str| fail(input.len(), format!("document ends inside <{name}>"));
    tree.open.clear();
    tree.open.push(Open {
        name: root,
        node: root_node,
        sel: sel.root,
    });
    let mut i = start;
    loop {
        let Some(&top) = tree.open.last() else {
            return Err(fail(i, "element stack underflow".into()));
        };
        // Markup usually follows markup directly.
        let lt = match bytes.get(i) {
            Some(b'<') => i,
            _ => i + memchr::memchr(b'<', &bytes[i..]).ok_or_else(|| eof(top.name))?,
        };
        if lt > i && top.node != NONE {
            let raw = slice(input, i, lt)?;
            if !raw.bytes().all(|b| b.is_ascii_whitespace()) {
                let text = if raw.contains('&') {
                    quick_xml::escape::unescape(raw)
                        .map_err(|e| fail(i, format!("bad reference in text: {e}")))?
                } else {
                    Cow::Borrowed(raw)
                };
                tree.append_text(top.node, text);
            }
        }
        // `tag` starts after the `<`; `at(n)` is the offset in `input` of `tag[n]`.
        let tag = &bytes[lt + 1..];
        let at = |n: usize| lt + 1 + n;
        match tag.first() {
            Some(b'/') => {
                let n = top.name.len();
                let gt = match tag.get(1 + n) {
                    Some(b'>') => 1 + n,
                    _ => memchr::memchr(b'>', tag).ok_or_else(|| eof(top.name))?,
                };
                let closing = tag[1..gt].trim_ascii_end();
                if closing != top.name.as_bytes() {
                    let closing = String::from_utf8_lossy(closing);
                    return Err(fail(lt, format!("</{closing}> closes <{}>", top.name)));
                }
                tree.open.pop();
                if tree.open.is_empty() {
                    return Ok(lt);
                }
                i = at(gt + 1);
            }
            Some(b'!') if tag.starts_with(b"![CDATA[") => {
                let n = find_seq(&tag[8..], b"]]>").ok_or_else(|| eof(top.name))?;
                if top.node != NONE {
                    let text = slice(input, at(8), at(8 + n))?;
                    tree.append_text(top.node, Cow::Borrowed(text));
                }
                i = at(8 + n + 3);
            }
            Some(b'!') if tag.starts_with(b"!--") => {
                let n = find_seq(&tag[3..], b"-->").ok_or_else(|| eof(top.name))?;
                i = at(3 + n + 3);
            }
            Some(b'?') => {
                let n = find_seq(&tag[1..], b"?>").ok_or_else(|| eof(top.name))?;
                i = at(1 + n + 2);
            }
            Some(b'!') => return Err(fail(lt, "unexpected <! inside an element".into())),
            Some(_) => {
                let gt = start_tag_end(tag).ok_or_else(|| eof(top.name))?;
                let inner = &tag[..gt];
                let len = inner
                    .iter()
                    .position(|&b| b.is_ascii_whitespace() || b == b'/')
                    .unwrap_or(gt);
                if len == 0 {
                    return Err(fail(lt, "a tag without a name".into()));
                }
                let name = slice(input, at(0), at(len))?;
                let state = match top.node {
                    NONE => None,
                    _ => child_state(sel, top.sel, name),
                };
                let node = match state {
                    Some(_) => tree.push(name, Some(top.node)),
                    None => NONE,
                };
                if inner.last() != Some(&b'/') {
                    // `open` is a heap stack, but consumers walk the tree recursively.
                    if tree.open.len() >= MAX_DEPTH {
                        return Err(XmlError::too_deep(lt as u64));
                    }
                    tree.open.push(Open {
                        name,
                        node,
                        sel: state.unwrap_or(ALL),
                    });
                }
                i = at(gt + 1);
            }
            None => return Err(eof(top.name)),
        }
    }
}

/// Parse the element whose start tag (`name`) quick-xml just read into `tree` (appended),
/// keeping what `sel` selects. The content is read by [`read_content`]; quick-xml is then
/// moved to the end tag and reads it, so its own stack of open elements stays right.
pub(crate) fn read_subtree<'a>(
    reader: &mut Reader<&'a [u8]>,
    input: &'a str,
    name: &'a str,
    sel: Selection,
    tree: &mut Tree<'a>,
) -> Result<NodeId, XmlError> {
    let root = tree.push(name, None);
    let start = input.len() - reader.get_ref().len();
    let end = read_content(input, start, name, root, sel, tree)?;
    *reader.get_mut() = &input.as_bytes()[end..];
    match reader
        .read_event()
        .map_err(|e| err(reader, input, e.to_string()))?
    {
        Event::End(_) => Ok(root),
        _ => Err(err(reader, input, format!("expected </{name}>"))),
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
            .map_err(|e| err(reader, input, e.to_string()))?
        {
            Event::Start(e) => return Ok((tag_name(reader, input, &e)?, true)),
            Event::Empty(e) => return Ok((tag_name(reader, input, &e)?, false)),
            Event::Eof => return Err(err(reader, input, "empty document")),
            Event::Text(t) if !t.trim_ascii().is_empty() => {
                return Err(err(reader, input, "text before the root element"))
            }
            _ => {}
        }
    }
}

/// Parse a whole document into a tree, keeping what `sel` selects.
pub(crate) fn parse_document(input: &str, sel: Selection) -> Result<Tree<'_>, XmlError> {
    let mut r = reader(input);
    let mut tree = Tree::default();
    let (name, open) = read_root(&mut r, input)?;
    if open {
        read_subtree(&mut r, input, name, sel, &mut tree)?;
    } else {
        tree.push(name, None);
    }
    Ok(tree)
}

/// Stream the children of the root element `expected_root`: each child element is parsed
/// (keeping what `sel` selects) into a reused tree and handed to `each`.
pub(crate) fn for_each_child<'a, E>(
    input: &'a str,
    expected_root: &str,
    sel: Selection,
    mut each: impl FnMut(&Tree<'a>, NodeId) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<XmlError>,
{
    let mut r = reader(input);
    let (root, open) = read_root(&mut r, input)?;
    if root != expected_root {
        return Err(err(
            &r,
            input,
            format!("root is <{root}>, expected <{expected_root}>"),
        )
        .into());
    }
    if !open {
        return Ok(());
    }
    let mut tree = Tree::default();
    loop {
        let ev = r.read_event().map_err(|e| err(&r, input, e.to_string()))?;
        match ev {
            Event::Start(e) => {
                let n = tag_name(&r, input, &e)?;
                tree.clear();
                let id = read_subtree(&mut r, input, n, sel, &mut tree)?;
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
                return Err(
                    err(&r, input, format!("document ends inside <{expected_root}>")).into(),
                )
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
        let t = parse_document(doc, EVERYTHING).unwrap();
        let root = t.root();
        assert_eq!(t.name(root), "VM");
        assert_eq!(t.child_text(root, "ID"), Some("7"));
        assert_eq!(t.child_text(root, "NAME"), Some("a & b"));
        let tt = t.child(root, "T").unwrap();
        let kids: Vec<_> = t.children(tt).map(|c| (t.name(c), t.raw_text(c))).collect();
        assert_eq!(kids, [("X", " 1 "), ("Y", ""), ("X", "<2>")]);
    }

    /// An owned copy of a tree, to compare builders.
    #[derive(Debug, PartialEq)]
    struct El {
        name: String,
        text: String,
        kids: Vec<El>,
    }

    fn owned(t: &Tree<'_>, id: NodeId) -> El {
        El {
            name: t.name(id).to_string(),
            text: t.raw_text(id).to_string(),
            kids: t.children(id).map(|c| owned(t, c)).collect(),
        }
    }

    /// The same tree built from quick-xml's events: the reference `read_content` must match.
    fn reference(doc: &str) -> El {
        let mut r = reader(doc);
        let mut stack: Vec<El> = vec![];
        let mut run = String::new();
        let flush = |run: &mut String, stack: &mut Vec<El>| {
            if !run.bytes().all(|b| b.is_ascii_whitespace()) {
                stack.last_mut().unwrap().text.push_str(run);
            }
            run.clear();
        };
        loop {
            let ev = r.read_event().unwrap();
            let empty = matches!(ev, Event::Empty(_));
            if !matches!(ev, Event::Text(_) | Event::GeneralRef(_)) && !stack.is_empty() {
                flush(&mut run, &mut stack);
            }
            match ev {
                Event::Start(e) | Event::Empty(e) => {
                    let name = e.name().as_ref().to_owned();
                    let el = El {
                        name,
                        text: String::new(),
                        kids: vec![],
                    };
                    if empty {
                        match stack.last_mut() {
                            Some(p) => p.kids.push(el),
                            None => return el,
                        }
                    } else {
                        stack.push(el);
                    }
                }
                Event::End(_) => {
                    let el = stack.pop().unwrap();
                    match stack.last_mut() {
                        Some(p) => p.kids.push(el),
                        None => return el,
                    }
                }
                Event::Text(t) => run.push_str(&t.xml10_content()),
                Event::GeneralRef(g) => {
                    let c = match g.resolve_char_ref().unwrap() {
                        Some(c) => c.to_string(),
                        None => quick_xml::escape::resolve_predefined_entity(&g)
                            .unwrap()
                            .to_string(),
                    };
                    run.push_str(&c);
                }
                Event::CData(c) => stack.last_mut().unwrap().text.push_str(&c),
                Event::Eof => panic!("eof"),
                _ => {}
            }
        }
    }

    #[test]
    fn content_reader_matches_quick_xml_events() {
        let docs = [
            include_str!("../../tests/fixtures/one/vm_full.xml"),
            include_str!("../../tests/fixtures/one/vmpool_extended.xml"),
            include_str!("../../tests/fixtures/one/vmpool_short.xml"),
            "<?xml version=\"1.0\"?>\n<!-- c --><A>\n  <B>x &lt;y&gt; &#65;&#x42; z</B>\n  <C/><C />\n</A>",
            "<A><B k=\"a>b\" j='c\"/>d'>t</B><B k='1'/><!-- <B>no</B> --><?pi <B>no</B> ?></A>",
            "<A><X><X><X/></X></X><Y> <![CDATA[ c ]]> tail <![CDATA[]]></Y><Z>a&amp;<![CDATA[&amp;]]>b</Z></A>",
            "<A><T>\u{e9}t\u{e9} \u{1f33c}</T><E></E><S>  </S></A >",
        ];
        for doc in docs {
            let t = parse_document(doc, EVERYTHING).unwrap();
            assert_eq!(owned(&t, t.root()), reference(doc), "{doc}");
        }
    }

    #[test]
    fn selection_skips_unselected_subtrees_whole() {
        // Root state 1 keeps K (and all below it) and KEEP (state 2, where only N is kept).
        const SEL: Selection = Selection {
            root: 1,
            child: |parent, name| match (parent, name) {
                (1, "K") => Some(ALL),
                (1, "KEEP") => Some(2),
                (2, "N") => Some(ALL),
                _ => None,
            },
        };
        let doc = "<R>text<S><K>no</K><S><K>no</K></S><![CDATA[</S><K>no</K>]]><!-- </S><K>no</K> --></S>\
                   <K>yes<S>kept</S></K><KEEP><N>1</N><S><N>no</N></S><M/><N>2</N></KEEP><S a='</S><K>'/></R>";
        let t = parse_document(doc, SEL).unwrap();
        let expected = "<R>text<K>yes<S>kept</S></K><KEEP><N>1</N><N>2</N></KEEP></R>";
        assert_eq!(owned(&t, t.root()), reference(expected));
        // A pool streams every item with the selection and fresh scratch state.
        let mut seen = vec![];
        for_each_child(
            "<P><R><K>a</K><S><K>b</K></S></R><X/><R><K>c</K></R></P>",
            "P",
            SEL,
            |t, id| {
                seen.push(owned(t, id));
                Ok::<(), XmlError>(())
            },
        )
        .unwrap();
        let kids = |k: &str| vec![reference(&format!("<K>{k}</K>"))];
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].kids, kids("a"));
        assert_eq!(seen[1].name, "X");
        assert_eq!(seen[2].kids, kids("c"));
    }

    #[test]
    fn malformed_content_is_an_error_with_its_position() {
        const NOTHING: Selection = Selection {
            root: 1,
            child: |_, _| None,
        };
        for sel in [EVERYTHING, NOTHING] {
            for (bad, at) in [
                ("<A><B></C></A>", 6),
                ("<A><B><![CDATA[x</B></A>", 24),
                ("<A><B><!-- x</B></A>", 20),
                ("<A><B></B>", 10),
                ("<A><!DOCTYPE x></A>", 3),
                ("<A><B x='>'</B></A>", 15),
                ("<A>< B/></A>", 3),
            ] {
                let e = parse_document(bad, sel).unwrap_err();
                assert_eq!(e.position, at, "{bad:?}: {e}");
            }
        }
        // Entity references are decoded (and checked) in kept text only.
        assert!(parse_document("<A><B>&bogus;</B></A>", EVERYTHING).is_err());
        assert!(parse_document("<A><B>&bogus;</B></A>", NOTHING).is_ok());
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_refused() {
        let doc = |n: usize| format!("{}{}", "<A>".repeat(n), "</A>".repeat(n));
        assert!(parse_document(&doc(MAX_DEPTH), EVERYTHING).is_ok());
        let e = parse_document(&doc(MAX_DEPTH + 1), EVERYTHING).unwrap_err();
        assert_eq!(e.kind, XmlErrorKind::TooDeep, "{e}");
        let e = parse_document(&doc(100_000), EVERYTHING).unwrap_err();
        assert_eq!(e.kind, XmlErrorKind::TooDeep, "{e}");
    }

    #[test]
    fn malformed_documents_are_errors() {
        for bad in ["", "<A>", "<A></B>", "text", "<A>&bogus;</A>"] {
            assert!(parse_document(bad, EVERYTHING).is_err(), "{bad:?}");
        }
    }
}
