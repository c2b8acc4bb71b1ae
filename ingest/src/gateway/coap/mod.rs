//! CoAP (RFC 7252 over UDP) into Kinesis.
//!
//! - `message.rs`: a request's options read once; the answers' datagrams.
//! - `resource.rs`: the resources (`/t/...`, `/health`,
//!   `/.well-known/core`), routing, and a telemetry request to its record.
//! - `block.rs`: block-wise uploads (RFC 7959 Block1) reassembled.
//! - `exchange.rs`: deduplication of retransmissions.
//! - `server.rs`: the socket, the receive loop, piggybacked and separate
//!   responses.
//!
//! `message`, `resource`, `block` and `exchange` do no IO and are tested alone;
//! the first three are public for the fuzz targets (ingest/fuzz).

pub mod block;
mod exchange;
pub mod message;
pub mod resource;
mod server;

pub use exchange::EXCHANGE_LIFETIME;
pub use message::{FORMAT_CBOR, FORMAT_JSON};
pub use resource::WELL_KNOWN_CORE;
pub use server::{CoapSettings, PIGGYBACK_WINDOW, serve};
