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
//! (measured: 272 bytes an exchange, 259 MiB for the default 1,000,000,
//! the cached answers included; see `a_full_table_measured`). No IO, no clock:
//! callers pass the time.
//!
//! A retransmission carries its request's token as well as its message id:
//! the same endpoint and message id with another token is a new request (a
//! device that rebooted and counts its message ids from the start again),
//! which replaces the old exchange instead of being answered from it.
//!
//! The server looks every request up ([`Exchanges::seen`]) but remembers
//! ([`Exchanges::begin`]) only those that changed something (a record
//! queued, a block taken, a signature used): a flood of junk does not
//! rotate the table.

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

/// A request's token (RFC 7252: 0 to 8 bytes), kept inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Token {
    /// How many of `bytes` are the token.
    len: u8,
    /// The token, zero-padded.
    bytes: [u8; 8],
}

impl Token {
    /// The token of a request (longer than 8 bytes is not CoAP; cut).
    pub fn new(token: &[u8]) -> Token {
        let len = token.len().min(8);
        let mut bytes = [0; 8];
        bytes[..len].copy_from_slice(&token[..len]);
        Token {
            len: len as u8,
            bytes,
        }
    }
}

/// One remembered exchange.
#[derive(Debug, Clone)]
struct Entry {
    /// Its request's token: a retransmission has the same.
    token: Token,
    /// Where it stands.
    state: State,
}

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
    current: HashMap<Key, Entry>,
    /// The generation before.
    previous: HashMap<Key, Entry>,
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

    /// The state of the exchange `key` if `token` is its token: the
    /// request is a retransmission. Remembers nothing.
    pub fn seen(&self, key: &Key, token: Token) -> Option<State> {
        self.get(key)
            .filter(|entry| entry.token == token)
            .map(|entry| entry.state.clone())
    }

    /// Records the arrival of a request; a duplicate (same key and token)
    /// gets its state back. The same key with another token replaces the
    /// exchange: a new request.
    pub fn begin(&mut self, key: Key, token: Token, now: Instant) -> Seen {
        match self.get(&key) {
            Some(entry) if entry.token == token => return Seen::Duplicate(entry.state.clone()),
            Some(_) => {
                self.current.remove(&key);
                self.previous.remove(&key);
            }
            None => {}
        }
        let full = self.current.len() >= self.capacity / 2;
        if full || now.duration_since(self.started) >= self.lifetime {
            if full {
                self.early_rotations += 1;
            }
            self.previous = mem::take(&mut self.current);
            self.started = now;
        }
        let state = State::InFlight { acked: false };
        self.current.insert(key, Entry { token, state });
        Seen::New
    }

    /// Marks an exchange in flight as acknowledged with an empty ACK;
    /// returns true if it was in flight and not acknowledged yet (the
    /// caller then sends the empty ACK).
    pub fn acknowledge(&mut self, key: &Key, token: Token) -> bool {
        match self.get_mut(key, token) {
            Some(State::InFlight { acked }) if !*acked => {
                *acked = true;
                true
            }
            _ => false,
        }
    }

    /// Records the answer: `resend(acked)` says what a retransmission will
    /// get, knowing whether an empty ACK was sent before (then the answer
    /// goes out as a separate response). Returns that `acked`, or `None`
    /// when a new request (another token) took the exchange's place: the
    /// answer is then for a client that is gone, and is not sent. An
    /// exchange forgotten meanwhile (capacity) is remembered again.
    pub fn answer(
        &mut self,
        key: Key,
        token: Token,
        resend: impl FnOnce(bool) -> Option<Bytes>,
    ) -> Option<bool> {
        if self.get(&key).is_some_and(|entry| entry.token != token) {
            return None;
        }
        let acked = matches!(
            self.get(&key).map(|entry| &entry.state),
            Some(State::InFlight { acked: true })
        );
        let state = State::Answered(resend(acked));
        match self.get_mut(&key, token) {
            Some(slot) => *slot = state,
            None => {
                self.current.insert(key, Entry { token, state });
            }
        }
        Some(acked)
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

    fn get(&self, key: &Key) -> Option<&Entry> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    /// The state of the exchange `key` if its token is `token`.
    fn get_mut(&mut self, key: &Key, token: Token) -> Option<&mut State> {
        let entry = match self.current.get_mut(key) {
            Some(entry) => Some(entry),
            None => self.previous.get_mut(key),
        };
        entry
            .filter(|entry| entry.token == token)
            .map(|entry| &mut entry.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Token = Token {
        len: 2,
        bytes: [0, 1, 0, 0, 0, 0, 0, 0],
    };

    fn key(port: u16, id: u16) -> Key {
        (SocketAddr::from(([127, 0, 0, 1], port)), id)
    }

    #[test]
    fn a_retransmission_is_recognised_in_each_state() {
        let t0 = Instant::now();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, 1_000, t0);
        assert_eq!(exchanges.begin(key(1, 7), T, t0), Seen::New);
        // Same id from another endpoint, another id from the same: new.
        assert_eq!(exchanges.begin(key(2, 7), T, t0), Seen::New);
        assert_eq!(exchanges.begin(key(1, 8), T, t0), Seen::New);
        assert_eq!(
            exchanges.begin(key(1, 7), T, t0),
            Seen::Duplicate(State::InFlight { acked: false })
        );
        assert!(exchanges.acknowledge(&key(1, 7), T));
        assert!(!exchanges.acknowledge(&key(1, 7), T), "only one empty ACK");
        let answered = exchanges.answer(key(1, 7), T, |acked| {
            assert!(acked);
            Some(Bytes::from_static(b"ack"))
        });
        assert_eq!(answered, Some(true));
        assert_eq!(exchanges.answer(key(1, 8), T, |_| None), Some(false));
        assert_eq!(
            exchanges.begin(key(1, 7), T, t0),
            Seen::Duplicate(State::Answered(Some(Bytes::from_static(b"ack"))))
        );
        assert_eq!(
            exchanges.begin(key(1, 8), T, t0),
            Seen::Duplicate(State::Answered(None))
        );
        assert!(
            !exchanges.acknowledge(&key(1, 8), T),
            "answered: no empty ACK"
        );
    }

    #[test]
    fn exchanges_are_kept_for_the_lifetime_then_forgotten() {
        let t0 = Instant::now();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, 1_000, t0);
        exchanges.begin(key(1, 1), T, t0);
        let later = t0 + EXCHANGE_LIFETIME - Duration::from_secs(1);
        assert!(matches!(
            exchanges.begin(key(1, 1), T, later),
            Seen::Duplicate(_)
        ));
        // A new exchange after one lifetime starts a generation; the old
        // one is still remembered until the next.
        let one = t0 + EXCHANGE_LIFETIME;
        assert_eq!(exchanges.begin(key(1, 2), T, one), Seen::New);
        assert!(matches!(
            exchanges.begin(key(1, 1), T, one),
            Seen::Duplicate(_)
        ));
        let two = one + EXCHANGE_LIFETIME;
        assert_eq!(exchanges.begin(key(1, 3), T, two), Seen::New);
        assert_eq!(exchanges.begin(key(1, 1), T, two), Seen::New, "forgotten");
        assert_eq!(exchanges.early_rotations(), 0);
    }

    #[test]
    fn capacity_bounds_memory() {
        let t0 = Instant::now();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, 100, t0);
        for id in 0..1_000 {
            assert_eq!(exchanges.begin(key(1, id), T, t0), Seen::New);
            assert!(exchanges.len() <= 100);
        }
        // The last 50 at least are remembered.
        for id in 950..1_000 {
            assert!(matches!(
                exchanges.begin(key(1, id), T, t0),
                Seen::Duplicate(_)
            ));
        }
        assert!(exchanges.early_rotations() > 0);
        // An answer for a forgotten exchange is remembered again.
        assert_eq!(exchanges.answer(key(1, 0), T, |_| None), Some(false));
        assert!(matches!(
            exchanges.begin(key(1, 0), T, t0),
            Seen::Duplicate(_)
        ));
    }

    #[test]
    fn a_reused_message_id_with_another_token_is_a_new_request() {
        let t0 = Instant::now();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, 1_000, t0);
        let (old, new) = (Token::new(&[1, 2]), Token::new(&[9]));
        assert_eq!(exchanges.begin(key(1, 7), old, t0), Seen::New);
        let answered = exchanges.answer(key(1, 7), old, |_| Some(Bytes::from_static(b"old")));
        assert_eq!(answered, Some(false));
        // The device rebooted and counts from the same id: not answered
        // from the old exchange, and its data is taken.
        assert_eq!(exchanges.begin(key(1, 7), new, t0), Seen::New);
        assert_eq!(
            exchanges.begin(key(1, 7), new, t0),
            Seen::Duplicate(State::InFlight { acked: false })
        );
        // The old request's late answer is for a client that is gone.
        assert_eq!(exchanges.answer(key(1, 7), old, |_| None), None);
        assert!(!exchanges.acknowledge(&key(1, 7), old));
        assert!(exchanges.acknowledge(&key(1, 7), new));
        // An empty token is a token too.
        assert_eq!(exchanges.begin(key(1, 7), Token::new(&[]), t0), Seen::New);
        assert_eq!(exchanges.len(), 1);
    }

    /// Resident memory of this process, in bytes (Linux).
    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Measures the table at its default capacity (1,000,000 exchanges),
    /// each answered with a piggybacked 2.04 as the server caches it (the
    /// ACK, message id and a 4-byte token: 8 bytes), and prints the bytes
    /// per exchange (`cargo test -p ingest --lib a_full_table -- --nocapture`;
    /// the figure in the module's documentation and the README). Other
    /// tests run in the same process, so the bound is loose.
    #[test]
    fn a_full_table_measured() {
        const CAPACITY: usize = 1_000_000;
        let t0 = Instant::now();
        let before = rss_bytes();
        let mut exchanges = Exchanges::new(EXCHANGE_LIFETIME, CAPACITY, t0);
        for n in 0..CAPACITY as u32 {
            let port = 1 + (n >> 16) as u16;
            let key = key(port, n as u16);
            let token = Token::new(&n.to_be_bytes());
            exchanges.begin(key, token, t0);
            let reply = Bytes::from(vec![0x62, 0x44, n as u8, (n >> 8) as u8, 1, 2, 3, 4]);
            exchanges.answer(key, token, |_| Some(reply));
        }
        let after = rss_bytes();
        let per_exchange = after.saturating_sub(before) / exchanges.len();
        println!(
            "{} exchanges held, {} MiB resident more: {per_exchange} bytes an exchange",
            exchanges.len(),
            (after - before) >> 20
        );
        assert!(exchanges.len() >= CAPACITY / 2);
        assert!(per_exchange < 1_000, "{per_exchange} bytes an exchange");
    }
}
