//! Field path → line:column in the YAML text.
//!
//! serde_norway keeps no spans in its `Value`, but every error it returns carries the
//! parser mark of the event being deserialized. So we walk the document along the path
//! with a visitor that fails on purpose at the target node, and read the mark off the
//! error. This uses the parser's own marks, so flow and block styles, anchors and
//! comments are all handled the same way as by the real loader.
//!
//! Guarantees: never panics; returns the deepest existing node on the path (a defaulted
//! field that is absent from the file points at its parent mapping).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::error::{FieldPath, PathSegment, Position};

/// The position of `path` in document `document_index` of `text`, if the document parses.
pub fn locate(text: &str, document_index: usize, path: &FieldPath) -> Option<Position> {
    let de = serde_norway::Deserializer::from_str(text).nth(document_index)?;
    let err = Seek(path.segments()).deserialize(de).err()?;
    position_of(&err)
}

/// The position a serde_norway error points at (1-based), if any.
pub fn position_of(err: &serde_norway::Error) -> Option<Position> {
    err.location().map(|l| Position {
        line: l.line(),
        column: l.column(),
    })
}

/// Walks towards the node at the remaining path; errors when it gets there (or as far as it can).
struct Seek<'a>(&'a [PathSegment]);

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the node being located")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if let Some((PathSegment::Key(want), rest)) = self.0.split_first() {
            while let Some(key) = map.next_key::<serde_norway::Value>()? {
                if key.as_str() == Some(want.as_str()) {
                    map.next_value_seed(Seek(rest))?;
                    break;
                }
                map.next_value::<IgnoredAny>()?;
            }
        }
        Err(de::Error::custom("located"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some((PathSegment::Index(want), rest)) = self.0.split_first() {
            let mut i = 0;
            while i < *want {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Err(de::Error::custom("located"));
                }
                i += 1;
            }
            seq.next_element_seed(Seek(rest))?;
        }
        Err(de::Error::custom("located"))
    }

    // Scalars: the target (or a dead end); fail here so the error carries this mark.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom("located"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom("located"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom("located"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom("located"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom("located"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom("located"))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom("located"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "a: 1\nspec:\n  supernodes:\n    count: 2\n    max: 3\n  list:\n    - x: 1\n    - {y: 2, z: 3}\n";

    fn at(path: &str) -> (usize, usize) {
        let p = locate(DOC, 0, &FieldPath::parse(path)).expect("position");
        (p.line, p.column)
    }

    #[test]
    fn finds_block_and_flow_nodes() {
        assert_eq!(at("spec.supernodes.max"), (5, 10));
        assert_eq!(at("spec.supernodes.count"), (4, 12));
        assert_eq!(at("spec.list[1].z"), (8, 17));
        assert_eq!(at("spec.list[0].x"), (7, 10));
    }

    #[test]
    fn missing_nodes_point_at_the_deepest_parent() {
        assert_eq!(at("spec.supernodes.min"), (4, 5));
        assert_eq!(at("spec.list[7]"), (7, 5));
    }

    #[test]
    fn later_documents_and_garbage_do_not_panic() {
        let two = "a: 1\n---\nb:\n  c: 2\n";
        assert_eq!(
            locate(two, 1, &FieldPath::parse("b.c")).map(|p| p.line),
            Some(4)
        );
        assert_eq!(locate(two, 5, &FieldPath::parse("b")), None);
        let _ = locate("a: [", 0, &FieldPath::parse("a"));
        let _ = locate("", 0, &FieldPath::parse("a"));
    }
}
