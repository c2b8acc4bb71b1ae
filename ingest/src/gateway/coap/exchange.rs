//! Deduplication of CoAP messages (RFC 7252 §4.5): a request retransmitted
//! with the same message id from the same endpoint is recognised, so its
//! record is put once, and it gets the same answer again.
//!
//! Two generations of a hash map: the current one takes new exchanges; when
//! it is [`EXCHANGE_LIFETIME`] old, or holds half the capacity, it becomes
//! the previous one and the old previous one is dropped. An exchange is
//! therefore remembered for at least EXCHANGE_LIFETIME (247 s) unless more
//! than `capacity` exchanges arrive within that time, in which case for at
//! least the time `capacity / 2` exchanges take: the capacity bounds memory
//! (about 100 bytes an exchange). No IO, no clock: callers pass the time.

use std::collections::HashMap;
use std::mem;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// RFC 7252's EXCHANGE_LIFETIME with its default parameters: how long a
/// message id may be retransmitted (MAX_TRANSMIT_SPAN 45 s, twice the
/// maximum latency of 100 s, and the processing delay of 2 s).
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// An exchange: the client's endpoint and its message id.
pub type Key = (SocketAddr, u16);

/// Where an exchange stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Being processed. `acked`: an empty ACK was sent (the client
    /// retransmitted, or the answer took long), so the answer goes out as a
    /// separate response.
    InFlight {
        /// Whether an empty ACK was sent.
        acked: bool,
    },
    /// Answered: what to send to a retransmission (the piggybacked
    /// response, the empty ACK that preceded a separate response, or the
    /// NON response), or nothing (No-Response, or a NON not answered).
    Answered(Option<Bytes>),
}

/// What [`Exchanges::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A new exchange, now in flight.
    New,
    /// A retransmission of an exchange in this state.
    Duplicate(State),
}

/// The exchanges of the last EXCHANGE_LIFETIME (or `capacity`).
#[derive(Debug)]
pub struct Exchanges {
    /// Exchanges since `started`.
    current: HashMap<Key, State>,
    /// The generation before.
    previous: HashMap<Key, State>,
    /// When `current` began.
    started: Instant,
    /// How long a generation lasts.
    lifetime: Duration,
    /// The most exchanges kept, both generations together.
    capacity: usize,
    /// Generations ended because they were full rather than old.
    early_rotations: u64,
}

impl Exchanges {
    /// Keeps exchanges for `lifetime`, at most `capacity` of them.
    pub fn new(lifetime: Duration, capacity: usize, now: Instant) -> Self {
        Exchanges {
            current: HashMap::new(),
            previous: HashMap::new(),
            started: now,
            lifetime,
            capacity: capacity.max(2),
            early_rotations: 0,
        }
    }

    /// Records the arrival of a request; a duplicate gets its state back.
    pub fn begin(&mut self, key: Key, now: Instant) -> Seen {
        if let Some(state) = self.get(&key) {
            return Seen::Duplicate(state.clone());
        }
        let full = self.current.len() >= self.capacity / 2;
        if full || now.duration_since(self.started) >= self.lifetime {
            if full {
                self.early_rotations += 1;
            }
            self.previous = mem::take(&mut self.current);
            self.started = now;
        }
        self.current.insert(key, State::InFlight { acked: false });
        Seen::New
    }

    /// Marks an exchange in flight as acknowledged with an empty ACK;
    /// returns true if it was in flight and not acknowledged yet (the
    /// caller then sends the empty ACK).
    pub fn acknowledge(&mut self, key: &Key) -> bool {
        match self.get_mut(key) {
            Some(State::InFlight { acked }) if !*acked => {
                *acked = true;
                true
            }
            _ => false,
        }
    }

    /// Records the answer: `resend(acked)` says what a retransmission will
    /// get, knowing whether an empty ACK was sent before (then the answer
    /// goes out as a separate response). Returns that `acked`. An exchange
    /// forgotten meanwhile (capacity) is remembered again.
    pub fn answer(&mut self, key: Key, resend: impl FnOnce(bool) -> Option<Bytes>) -> bool {
        let acked = matches!(self.get(&key), Some(State::InFlight { acked: true }));
        let state = State::Answered(resend(acked));
        match self.get_mut(&key) {
            Some(slot) => *slot = state,
            None => {
                self.current.insert(key, state);
            }
        }
        acked
    }

    /// Exchanges remembered now.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// How often a generation ended early because `capacity` was reached:
    /// non-zero means retransmissions are remembered for less than
    /// EXCHANGE_LIFETIME.
    pub fn early_rotations(&self) -> u64 {
        self.early_rotations
    }

    fn get(&self, key: &Key) -> Option<&State> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    fn get_mut(&mut self, key: &Key) -> Option<&mut State> {
        match self.current.get_mut(key) {
            Some(state) => Some(state),
            None => self.previous.get_mut(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, id: u16) -> Key {
        (SocketAddr::from(([127, 0, 0, 1], port)), id)
    }

    #[test]
    fn a_retransmission_is_recognised_in_each_state() {
        let t0 = Instant::now();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, 1_000, t0);
        assert_eq!(exchanges.begin(key(1, 7), t0), Seen::New);
        // Same id from another endpoint, another id from the same: new.
        assert_eq!(exchanges.begin(key(2, 7), t0), Seen::New);
        assert_eq!(exchanges.begin(key(1, 8), t0), Seen::New);
        assert_eq!(
            exchanges.begin(key(1, 7), t0),
            Seen::Duplicate(State::InFlight { acked: false })
        );
        assert!(exchanges.acknowledge(&key(1, 7)));
        assert!(!exchanges.acknowledge(&key(1, 7)), "only one empty ACK");
        assert!(exchanges.answer(key(1, 7), |acked| {
            assert!(acked);
            Some(Bytes::from_static(b"ack"))
        }));
        assert!(!exchanges.answer(key(1, 8), |_| None));
        assert_eq!(
            exchanges.begin(key(1, 7), t0),
            Seen::Duplicate(State::Answered(Some(Bytes::from_static(b"ack"))))
        );
        assert_eq!(
            exchanges.begin(key(1, 8), t0),
            Seen::Duplicate(State::Answered(None))
        );
        assert!(!exchanges.acknowledge(&key(1, 8)), "answered: no empty ACK");
    }

    #[test]
    fn exchanges_are_kept_for_the_lifetime_then_forgotten() {
        let t0 = Instant::now();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, 1_000, t0);
        exchanges.begin(key(1, 1), t0);
        let later = t0 + EXCHANGE_LIFETIME - Duration::from_secs(1);
        assert!(matches!(
            exchanges.begin(key(1, 1), later),
            Seen::Duplicate(_)
        ));
        // A new exchange after one lifetime starts a generation; the old
        // one is still remembered until the next.
        let one = t0 + EXCHANGE_LIFETIME;
        assert_eq!(exchanges.begin(key(1, 2), one), Seen::New);
        assert!(matches!(
            exchanges.begin(key(1, 1), one),
            Seen::Duplicate(_)
        ));
        let two = one + EXCHANGE_LIFETIME;
        assert_eq!(exchanges.begin(key(1, 3), two), Seen::New);
        assert_eq!(exchanges.begin(key(1, 1), two), Seen::New, "forgotten");
        assert_eq!(exchanges.early_rotations(), 0);
    }

    #[test]
    fn capacity_bounds_memory() {
        let t0 = Instant::now();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, 100, t0);
        for id in 0..1_000 {
            assert_eq!(exchanges.begin(key(1, id), t0), Seen::New);
            assert!(exchanges.len() <= 100);
        }
        // The last 50 at least are remembered.
        for id in 950..1_000 {
            assert!(matches!(
                exchanges.begin(key(1, id), t0),
                Seen::Duplicate(_)
            ));
        }
        assert!(exchanges.early_rotations() > 0);
        // An answer for a forgotten exchange is remembered again.
        assert!(!exchanges.answer(key(1, 0), |_| None));
        assert!(matches!(exchanges.begin(key(1, 0), t0), Seen::Duplicate(_)));
    }
}
