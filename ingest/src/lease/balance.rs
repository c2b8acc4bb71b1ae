//! Balancing: every worker aims at ceil(readable shards / live workers).
//!
//! Free leases are taken up to that target. A worker below target with no
//! free lease takes ONE lease per round from the most loaded worker, and only
//! when that worker holds at least two more than it does: a move always
//! narrows the gap, so moves stop once no two workers differ by more than one
//! (4 shards over 3 workers settle at 2, 1, 1 — from 2, 2, 0 too), with no
//! storms and no ping-pong.

use std::collections::BTreeMap;

/// The fleet as the database sees it now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    /// Workers whose heartbeat is within the lease time.
    pub live_workers: usize,
    /// Shards not ended whose parents are all ended: what can be read now.
    pub readable_shards: usize,
    /// Readable shards whose lease is free or expired.
    pub free_shards: usize,
    /// Unexpired leases of readable shards per owner.
    pub held_by: BTreeMap<String, usize>,
}

/// What a worker should do this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// Take up to this many free leases.
    Acquire(usize),
    /// Take one lease from this worker.
    Steal(String),
    /// Hold what it has.
    Stay,
}

/// ceil(readable / workers), and at least 1 while there is anything to read.
pub fn target(readable_shards: usize, live_workers: usize) -> usize {
    readable_shards.div_ceil(live_workers.max(1))
}

/// What worker `me`, holding `held` leases, should do in `fleet`.
pub fn plan(me: &str, held: usize, fleet: &Fleet) -> Move {
    // The caller heartbeats before asking, so `me` is among the live workers.
    let target = target(fleet.readable_shards, fleet.live_workers);
    if held >= target {
        return Move::Stay;
    }
    if fleet.free_shards > 0 {
        return Move::Acquire((target - held).min(fleet.free_shards));
    }
    let busiest = fleet
        .held_by
        .iter()
        .filter(|(owner, _)| owner.as_str() != me)
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)));
    match busiest {
        Some((owner, &count)) if count >= held + 2 => Move::Steal(owner.clone()),
        _ => Move::Stay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(workers: usize, readable: usize, free: usize, held: &[(&str, usize)]) -> Fleet {
        Fleet {
            live_workers: workers,
            readable_shards: readable,
            free_shards: free,
            held_by: held.iter().map(|(w, n)| (w.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn targets() {
        let cases = [
            (4, 1, 4),
            (4, 2, 2),
            (4, 3, 2),
            (5, 2, 3),
            (0, 3, 0),
            (4, 0, 4),
        ];
        for (shards, workers, expected) in cases {
            assert_eq!(
                target(shards, workers),
                expected,
                "{shards} shards, {workers} workers"
            );
        }
    }

    #[test]
    fn moves() {
        let cases = [
            // A lone worker takes everything free.
            ("a", 0, fleet(1, 4, 4, &[]), Move::Acquire(4)),
            // Two workers split four shards.
            ("b", 0, fleet(2, 4, 2, &[("a", 2)]), Move::Acquire(2)),
            // A newcomer with nothing free steals from the busiest, one at a time.
            (
                "c",
                0,
                fleet(3, 4, 0, &[("a", 3), ("b", 1)]),
                Move::Steal("a".into()),
            ),
            // Two at target and one with none: no one is above target, yet the
            // gap of two is closed by one move.
            (
                "c",
                0,
                fleet(3, 4, 0, &[("a", 2), ("b", 2)]),
                Move::Steal("a".into()),
            ),
            // 2, 1, 1 of four shards is balanced: no ping-pong.
            (
                "c",
                1,
                fleet(3, 4, 0, &[("a", 2), ("b", 1), ("c", 1)]),
                Move::Stay,
            ),
            (
                "b",
                1,
                fleet(3, 4, 0, &[("a", 2), ("b", 1), ("c", 1)]),
                Move::Stay,
            ),
            // At target: stay, even with free shards around.
            ("a", 2, fleet(2, 4, 1, &[("a", 2), ("b", 1)]), Move::Stay),
            // A dead worker's expired leases are free: taken up to target only.
            ("a", 1, fleet(1, 4, 3, &[("a", 1)]), Move::Acquire(3)),
            ("a", 1, fleet(2, 4, 3, &[("a", 1)]), Move::Acquire(1)),
            // Nothing to read.
            ("a", 0, fleet(2, 0, 0, &[]), Move::Stay),
        ];
        for (me, held, fleet, expected) in cases {
            assert_eq!(
                plan(me, held, &fleet),
                expected,
                "{me} holding {held} in {fleet:?}"
            );
        }
    }
}
