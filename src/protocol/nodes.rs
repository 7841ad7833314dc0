//! Flower's own view of its SuperNodes, published for the controller's corroboration of a
//! stale heartbeat (#12 item 4c): `FL_FLOWER_NODE_ID` (SuperNode) and `FL_NODES_ONLINE`
//! (SuperLink). One codec for the agent (writer) and the controller (reader).
//!
//! Guarantees: [`NodesOnline::parse`] accepts exactly what [`NodesOnline::encode`] writes,
//! at most [`MAX_NODES`] ids and [`MAX_LEN`] bytes; anything else is an error, never a
//! panic (`tests::the_codec_round_trips_and_refuses_the_rest`).
//! Caveats: both values are peer-writable through OneGate (`PUT /vms/:id`). A forged value
//! can only keep a node from being replaced (the controller replaces nothing the list
//! shows online); it cannot get a healthy node replaced, since a replacement still needs
//! a stale heartbeat.

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, Utc};

/// Most ids in one list: above the largest cluster `validate` allows (1,000 SuperNodes).
pub const MAX_NODES: usize = 1024;
/// Longest value: the time, a space, [`MAX_NODES`] ids of 20 digits and their commas.
pub const MAX_LEN: usize = 32 + MAX_NODES * 21;

/// `FL_NODES_ONLINE`: the Flower node ids the SuperLink holds online, as of `at` (the
/// SuperLink VM's clock when it read its state). Written as `<RFC 3339> <id>,<id>,…`
/// (ids ascending; just the time when none is online).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodesOnline {
    /// When the SuperLink's state was read.
    pub at: DateTime<Utc>,
    /// Flower node ids online at `at`.
    pub ids: BTreeSet<u64>,
}

impl NodesOnline {
    /// The attribute value.
    pub fn encode(&self) -> String {
        let mut out = self.at.to_rfc3339_opts(SecondsFormat::Secs, true);
        let ids: Vec<String> = self.ids.iter().map(u64::to_string).collect();
        if !ids.is_empty() {
            out.push(' ');
            out.push_str(&ids.join(","));
        }
        out
    }

    /// Parse an attribute value (untrusted).
    pub fn parse(v: &str) -> Result<Self, String> {
        if v.len() > MAX_LEN {
            return Err(format!("longer than {MAX_LEN} bytes"));
        }
        let (at, list) = match v.split_once(' ') {
            Some((_, "")) => return Err("a space must be followed by node ids".into()),
            Some(split) => split,
            None => (v, ""),
        };
        let at = DateTime::parse_from_rfc3339(at)
            .map_err(|_| "must start with an RFC 3339 time".to_string())?
            .with_timezone(&Utc);
        let mut ids = BTreeSet::new();
        if !list.is_empty() {
            for id in list.split(',') {
                if ids.len() == MAX_NODES {
                    return Err(format!("more than {MAX_NODES} node ids"));
                }
                ids.insert(parse_node_id(id)?);
            }
        }
        Ok(Self { at, ids })
    }
}

/// A Flower node id (`FL_FLOWER_NODE_ID`, and each id of `FL_NODES_ONLINE`): a non-zero
/// unsigned 64-bit decimal, as the SuperNode logs it (`SuperNode ID: <id>`).
pub fn parse_node_id(v: &str) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(id) if id != 0 && v.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err("a Flower node id must be a non-zero unsigned 64-bit decimal".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codec_round_trips_and_refuses_the_rest() {
        let at = DateTime::parse_from_rfc3339("2026-12-02T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for ids in [
            BTreeSet::new(),
            BTreeSet::from([7]),
            BTreeSet::from([u64::MAX, 1, 15644467414316882310]),
            (1..=MAX_NODES as u64).map(|i| u64::MAX - i).collect(),
        ] {
            let list = NodesOnline { at, ids };
            let text = list.encode();
            assert!(text.len() <= MAX_LEN);
            assert_eq!(NodesOnline::parse(&text), Ok(list));
        }
        assert_eq!(
            NodesOnline::parse("2026-12-02T08:00:00Z 3,1").map(|l| l.ids),
            Ok(BTreeSet::from([1, 3]))
        );
        let too_many: Vec<String> = (1..=MAX_NODES as u64 + 1).map(|i| i.to_string()).collect();
        for bad in [
            "",
            "yesterday 1,2",
            "2026-12-02T08:00:00Z ",
            "2026-12-02T08:00:00Z 1,,2",
            "2026-12-02T08:00:00Z 1, 2",
            "2026-12-02T08:00:00Z 0",
            "2026-12-02T08:00:00Z -1",
            "2026-12-02T08:00:00Z +1",
            "2026-12-02T08:00:00Z 18446744073709551616",
            &format!("2026-12-02T08:00:00Z {}", too_many.join(",")),
            &format!("2026-12-02T08:00:00Z {}", "1".repeat(MAX_LEN)),
        ] {
            assert!(NodesOnline::parse(bad).is_err(), "{bad:.80}");
        }
        assert_eq!(
            parse_node_id("15644467414316882310"),
            Ok(15644467414316882310)
        );
        assert!(parse_node_id("0x10").is_err());
    }
}
