//! The Flower-aware OneGate metrics OneFlow elasticity policies compare (seed-facts §3.6):
//! the one codec for `FL_TRAINING_ACTIVE`, `FL_CLIENT_STATUS` and `FL_ROUND_NUMBER`.
//!
//! All three are plain decimal numbers because OneFlow reads an attribute with Ruby's
//! `String#to_f` before averaging it over a role's VMs: `"YES".to_f` is 0.0, so the seed's
//! `YES`/`NO` for `FL_TRAINING_ACTIVE` would compare as 0 for ever (docs/upstream-notes.md,
//! "Elasticity"). Writers print the canonical form; readers accept exactly that form.

/// Longest value any of the three may carry (a u64 in decimal).
const MAX_LEN: usize = 20;

/// `FL_TRAINING_ACTIVE`: `1` while the SuperLink's state holds a run running, else `0`.
pub fn format_active(active: bool) -> &'static str {
    if active {
        "1"
    } else {
        "0"
    }
}

/// Reads `FL_TRAINING_ACTIVE`; `None` for anything but `1` / `0`.
pub fn parse_active(v: &str) -> Option<bool> {
    match v {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// `FL_CLIENT_STATUS`: what a SuperNode is doing, numeric so that a policy can average it
/// (`FL_CLIENT_STATUS > 1.5`: more than half of the SuperNodes training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStatus {
    /// Registered with the SuperLink, no message in hand.
    Idle = 1,
    /// Registered and handling a message (training or evaluating), or handled one less
    /// than the agent's idle grace ago.
    Training = 2,
    /// Not registered with the SuperLink (starting, or registration lost).
    Disconnected = 3,
}

impl ClientStatus {
    /// `1`, `2` or `3`.
    pub fn format(self) -> &'static str {
        match self {
            ClientStatus::Idle => "1",
            ClientStatus::Training => "2",
            ClientStatus::Disconnected => "3",
        }
    }

    /// Reads `FL_CLIENT_STATUS`; `None` for anything but `1`, `2`, `3`.
    pub fn parse(v: &str) -> Option<ClientStatus> {
        match v {
            "1" => Some(ClientStatus::Idle),
            "2" => Some(ClientStatus::Training),
            "3" => Some(ClientStatus::Disconnected),
            _ => None,
        }
    }
}

/// `FL_ROUND_NUMBER`: the round in progress (or last run) of the SuperLink's newest run,
/// decimal; `0` before any round.
pub fn format_round(round: u64) -> String {
    round.to_string()
}

/// Reads `FL_ROUND_NUMBER`: canonical decimal (no sign, no leading zero), bounded.
pub fn parse_round(v: &str) -> Option<u64> {
    if v.is_empty()
        || v.len() > MAX_LEN
        || !v.bytes().all(|b| b.is_ascii_digit())
        || (v.len() > 1 && v.starts_with('0'))
    {
        return None;
    }
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_values_read_back_and_nothing_else_does() {
        for a in [true, false] {
            assert_eq!(parse_active(format_active(a)), Some(a));
        }
        for s in [
            ClientStatus::Idle,
            ClientStatus::Training,
            ClientStatus::Disconnected,
        ] {
            assert_eq!(ClientStatus::parse(s.format()), Some(s));
            assert_eq!(s.format(), (s as u8).to_string());
        }
        for r in [0, 1, 42, u64::MAX] {
            assert_eq!(parse_round(&format_round(r)), Some(r));
        }
        for bad in ["", "YES", "2 ", "01", "-1", "1.0", "4"] {
            assert_eq!(parse_active(bad), None, "{bad:?}");
            assert_eq!(ClientStatus::parse(bad), None, "{bad:?}");
        }
        for bad in [
            "",
            "-1",
            "01",
            "1.5",
            "18446744073709551616",
            "+3",
            "999999999999999999999",
        ] {
            assert_eq!(parse_round(bad), None, "{bad:?}");
        }
    }
}
