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
    seek(text, document_index, path, false)
}

/// The position of the mapping key that names `path` (its last segment), falling back to
/// [`locate`] when there is no such key (a list item, the root, an absent field).
pub fn locate_key(text: &str, document_index: usize, path: &FieldPath) -> Option<Position> {
    seek(text, document_index, path, true)
}

fn seek(text: &str, document_index: usize, path: &FieldPath, key: bool) -> Option<Position> {
    let de = serde_norway::Deserializer::from_str(text).nth(document_index)?;
    let err = Seek {
        path: path.segments(),
        key,
    }
    .deserialize(de)
    .err()?;
    position_of(&err)
}

/// The position a serde_norway error points at (1-based), if any.
pub fn position_of(err: &serde_norway::Error) -> Option<Position> {
    err.location().map(|l| Position {
        line: l.line(),
        column: l.column(),
    })
}

/// Walks towards the node at the remaining path; errors when it gets there (or as far as it
/// can). With `key`, a final mapping key errors at the key itself.
struct Seek<'a> {
    path: &'a [PathSegment],
    key: bool,
}

impl<'a> Seek<'a> {
    fn rest(&self, rest: &'a [PathSegment]) -> Self {
        Seek {
            path: rest,
            key: self.key,
        }
    }
}

/// Reads one mapping key: `Ok(true)` when it is `want`, an error there when also `fail`.
struct KeyProbe<'a> {
    want: &'a str,
    fail: bool,
}

impl KeyProbe<'_> {
    fn hit<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        match key == self.want {
            true if self.fail => Err(E::custom("located")),
            hit => Ok(hit),
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, k: &str) -> Result<bool, E> {
        self.hit(k)
    }
    fn visit_i64<E: de::Error>(self, k: i64) -> Result<bool, E> {
        self.hit(&k.to_string())
    }
    fn visit_u64<E: de::Error>(self, k: u64) -> Result<bool, E> {
        self.hit(&k.to_string())
    }
    fn visit_bool<E: de::Error>(self, k: bool) -> Result<bool, E> {
        self.hit(&k.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

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
        if let Some((PathSegment::Key(want), rest)) = self.path.split_first() {
            let probe = || KeyProbe {
                want,
                fail: self.key && rest.is_empty(),
            };
            while let Some(hit) = map.next_key_seed(probe())? {
                if hit {
                    map.next_value_seed(self.rest(rest))?;
                    break;
                }
                map.next_value::<IgnoredAny>()?;
            }
        }
        Err(de::Error::custom("located"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some((PathSegment::Index(want), rest)) = self.path.split_first() {
            let mut i = 0;
            while i < *want {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Err(de::Error::custom("located"));
                }
                i += 1;
            }
            seq.next_element_seed(self.rest(rest))?;
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
    fn keys_are_found_by_name_and_fall_back_to_the_node() {
        let key = |p: &str| {
            let p = locate_key(DOC, 0, &FieldPath::parse(p)).expect("position");
            (p.line, p.column)
        };
        assert_eq!(key("spec.supernodes.max"), (5, 5));
        assert_eq!(key("spec.supernodes"), (3, 3));
        assert_eq!(key("spec.list[1].z"), (8, 14));
        assert_eq!(key("spec.list[1]"), (8, 7));
        assert_eq!(key("spec.supernodes.min"), (4, 5));
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
