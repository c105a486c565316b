//! Failure detection: how a node judges its peers.
//!
//! Two signals, judged on two clocks:
//! - the catalog heartbeat, written every interval at the *catalog's* clock and read
//!   back against it, so every node sees the same ages and node clocks may drift;
//! - this node's own probes of each peer's RPC port, timed on the local monotonic clock.
//!
//! A node is *suspected* when either signal is older than `suspect_after` (a peer that
//! heartbeats but that this node cannot reach is suspect from here), and *failed* when
//! its catalog heartbeat is older than `fail_after`. Only the catalog signal decides
//! failure, so all nodes agree on it; only failure takes a node out of the layout.

use std::time::Duration;

use serde::Serialize;

/// What this node believes about a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum NodeState {
    Alive,
    Suspected,
    Failed,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "alive",
            NodeState::Suspected => "suspected",
            NodeState::Failed => "failed",
        }
    }
}

/// The two thresholds of failure detection.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub suspect_after: Duration,
    pub fail_after: Duration,
}

/// Judges one member. `heartbeat_age` is by the catalog's clock; `unreachable_for` is how
/// long this node's probes of it have failed (None when it answers, or is this node, or
/// probing is off).
pub fn judge(
    t: Thresholds,
    heartbeat_age: Duration,
    unreachable_for: Option<Duration>,
) -> NodeState {
    if heartbeat_age > t.fail_after {
        NodeState::Failed
    } else if heartbeat_age > t.suspect_after
        || unreachable_for.is_some_and(|d| d > t.suspect_after)
    {
        NodeState::Suspected
    } else {
        NodeState::Alive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        suspect_after: Duration::from_secs(5),
        fail_after: Duration::from_secs(30),
    };
    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn heartbeat_age_moves_a_node_from_alive_to_suspected_to_failed() {
        assert_eq!(judge(T, s(1), None), NodeState::Alive);
        assert_eq!(judge(T, s(5), None), NodeState::Alive, "at the limit");
        assert_eq!(judge(T, s(6), None), NodeState::Suspected);
        assert_eq!(judge(T, s(31), None), NodeState::Failed);
    }

    #[test]
    fn an_unreachable_peer_is_suspected_but_only_the_catalog_declares_failure() {
        assert_eq!(judge(T, s(1), Some(s(2))), NodeState::Alive);
        assert_eq!(judge(T, s(1), Some(s(6))), NodeState::Suspected);
        assert_eq!(
            judge(T, s(1), Some(s(3600))),
            NodeState::Suspected,
            "a partition from this node alone never fails a heartbeating node"
        );
    }
}
