//! CoAP datagrams through the gateway's request handling, as the server
//! does it but without sockets: parse, read the options, route, reassemble
//! block-wise uploads, and turn telemetry into its record (with and without
//! signatures required). Nothing panics; every answer encodes to a datagram
//! that parses again; every record made decodes.
//!
//! Input: datagrams, each a big-endian u16 length and its bytes, handled in
//! order by one gateway (so block-wise transfers can span them).
#![no_main]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use coap_lite::{MessageClass, MessageType, Packet};
use ingest::decode::{DecodeLimits, Decoder};
use ingest::gateway::auth::{AuthPolicy, AuthSettings};
use ingest::gateway::coap::block::{Progress, Uploads};
use ingest::gateway::coap::message::{self, Reply, Request};
use ingest::gateway::coap::resource::{self, Route, TelemetryRules};
use libfuzzer_sys::fuzz_target;

const ARRIVAL: i64 = 1_763_900_000_123_000;
const MAX_PAYLOAD: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let auth = if mode & 1 == 0 {
        AuthPolicy::open()
    } else {
        let keys = HashMap::from([(("h".to_owned(), "d".to_owned()), b"secret".to_vec())]);
        let settings = AuthSettings {
            require: mode & 2 != 0,
            ..AuthSettings::default()
        };
        AuthPolicy::new(keys, settings)
    };
    let rules = TelemetryRules {
        max_payload_bytes: MAX_PAYLOAD,
        auth: &auth,
    };
    let mut uploads = Uploads::default();
    let mut decoder = Decoder::new(DecodeLimits::default());
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 5683));
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let datagram = &rest[2..2 + len.min(rest.len() - 2)];
        rest = &rest[2 + datagram.len()..];
        if let Some(reply) = handle(datagram, &rules, &mut uploads, &mut decoder, peer) {
            let encoded = reply.encode(MessageType::Acknowledgement, 7, b"tok");
            let parsed = Packet::from_bytes(&encoded).unwrap_or_else(|err| {
                panic!("reply {reply:?} encodes to an unreadable datagram: {err}")
            });
            assert!(!message::bare_payload_marker(&encoded, &parsed));
            assert_eq!(parsed.payload, reply.payload);
        }
    }
});

/// One datagram: the answer the gateway would send, if any (a record made
/// is checked here and answered 2.04, as Kinesis accepting it would be).
fn handle(
    bytes: &[u8],
    rules: &TelemetryRules<'_>,
    uploads: &mut Uploads,
    decoder: &mut Decoder,
    peer: SocketAddr,
) -> Option<Reply> {
    let packet = Packet::from_bytes(bytes).ok()?;
    if message::bare_payload_marker(bytes, &packet) {
        return None;
    }
    if !matches!(packet.header.code, MessageClass::Request(_)) {
        return None;
    }
    let request = match Request::from_packet(packet) {
        Ok(request) => request,
        Err(unreadable) => {
            assert!(!unreadable.reason.is_empty());
            return Some(Reply::error(unreadable.code, unreadable.reason));
        }
    };
    let (house, device) = match resource::route(&request) {
        Err(reply) => return Some(reply),
        Ok(Route::WellKnownCore) => return Some(resource::well_known_core()),
        Ok(Route::Health) => return Some(Reply::empty(coap_lite::ResponseType::Content)),
        Ok(Route::Telemetry { house, device }) => (house, device),
    };
    let assembled;
    let request = match request.block1 {
        None => &request,
        Some(block) => {
            let key = (peer, request.path.clone(), request.query.clone());
            let now = Instant::now();
            match uploads.receive(
                key,
                block,
                request.size1,
                &request.payload,
                MAX_PAYLOAD,
                now,
            ) {
                Ok(Progress::Continue(reply)) => return Some(reply),
                Ok(Progress::Complete(body)) => {
                    assert!(
                        body.len() <= MAX_PAYLOAD,
                        "a reassembled body of {} bytes",
                        body.len()
                    );
                    assembled = Request {
                        payload: body,
                        ..request.clone()
                    };
                    &assembled
                }
                Err((reason, reply)) => {
                    assert!(!reason.is_empty());
                    return Some(reply);
                }
            }
        }
    };
    match resource::telemetry(request, house, device, rules, decoder, ARRIVAL) {
        Ok((key, record)) => {
            assert_eq!(key, device, "the partition key is the device");
            let reading = decoder
                .decode(&record, ARRIVAL)
                .unwrap_or_else(|err| panic!("a record the gateway made does not decode: {err}"));
            assert_eq!(reading.device, device);
            Some(Reply::empty(coap_lite::ResponseType::Changed))
        }
        Err((reason, reply)) => {
            assert!(!reason.is_empty());
            Some(reply)
        }
    }
}
