//! A compact ordered attribute map: every key and value lives in one `String`, so a VM's
//! CONTEXT or USER_TEMPLATE costs two allocations however many attributes it holds (the
//! 20,000-VM pool parse is allocation-bound otherwise).

use std::fmt;

/// Ordered `key → value` attributes (duplicates kept; lookups return the first).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AttrMap {
    buf: String,
    // (key start, key end = value start, value end) into `buf`.
    entries: Vec<(u32, u32, u32)>,
}

impl AttrMap {
    /// An empty map with room for `entries` attributes totalling `bytes`.
    pub fn with_capacity(entries: usize, bytes: usize) -> Self {
        Self {
            buf: String::with_capacity(bytes),
            entries: Vec::with_capacity(entries),
        }
    }

    /// Append an attribute (an existing one with the same key is kept in front).
    pub fn push(&mut self, key: &str, value: &str) {
        let ks = self.buf.len();
        self.buf.push_str(key);
        let ke = self.buf.len();
        self.buf.push_str(value);
        let ve = self.buf.len();
        // Attribute text is bounded by the response cap (< 4 GiB).
        self.entries.push((ks as u32, ke as u32, ve as u32));
    }

    /// First value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Number of attributes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No attributes.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Attributes in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries.iter().map(move |&(ks, ke, ve)| {
            (
                &self.buf[ks as usize..ke as usize],
                &self.buf[ke as usize..ve as usize],
            )
        })
    }

    /// Keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// The `i`-th attribute.
    pub fn get_index(&self, i: usize) -> Option<(&str, &str)> {
        self.iter().nth(i)
    }

    /// As an owned ordered map (first occurrence wins).
    pub fn to_index_map(&self) -> indexmap::IndexMap<String, String> {
        let mut m = indexmap::IndexMap::with_capacity(self.len());
        for (k, v) in self.iter() {
            m.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
        m
    }
}

impl fmt::Debug for AttrMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for AttrMap {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(iter: I) -> Self {
        let mut m = AttrMap::default();
        for (k, v) in iter {
            m.push(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_duplicates() {
        let m: AttrMap = [("B", "2"), ("A", ""), ("B", "3")].into_iter().collect();
        assert_eq!(m.len(), 3);
        assert_eq!(m.get("B"), Some("2"));
        assert_eq!(m.get("A"), Some(""));
        assert_eq!(m.get("C"), None);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["B", "A", "B"]);
        assert_eq!(m.to_index_map().len(), 2);
        assert_eq!(format!("{m:?}"), r#"{"B": "2", "A": "", "B": "3"}"#);
    }
}
