//! The gateway's CoAP resources, and how a request finds one: `/t/...`
//! takes telemetry, `/health` says whether Kinesis is reachable,
//! `/.well-known/core` lists both (RFC 6690). No IO.

use bytes::Bytes;
use coap_lite::{RequestType, ResponseType};

use super::block;
use super::message::{FORMAT_CBOR, FORMAT_JSON, FORMAT_LINK, FORMAT_TEXT, Reply, Request};
use crate::decode::{Decoder, Micros};
use crate::gateway::auth::{
    AuthPolicy, Claim, Denied, NONCE_PARAMETER, SIGNATURE_PARAMETER, TIME_PARAMETER,
};
use crate::gateway::cbor;
use crate::gateway::record::{self, Conflict, Origin, Payload};

/// What `GET /.well-known/core` answers.
pub const WELL_KNOWN_CORE: &str = concat!(
    r#"</t>;rt="ingest.telemetry";ct="50 60";title="POST /t/{device} or /t/{house}/{device}","#,
    r#"</health>;rt="ingest.health";ct=0"#
);

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `GET /.well-known/core`.
    WellKnownCore,
    /// `GET /health`.
    Health,
    /// `POST /t/<device>` or `POST /t/<house>/<device>`.
    Telemetry {
        /// The house, for the three-segment form.
        house: Option<&'a str>,
        /// The device: the partition key.
        device: &'a str,
    },
}

/// The route of `request`, or the answer for a path that has none (4.04)
/// or a method the resource does not take (4.05).
pub fn route(request: &Request) -> Result<Route<'_>, Reply> {
    let path: Vec<&str> = request.path.iter().map(String::as_str).collect();
    let (route, allowed) = match path.as_slice() {
        [".well-known", "core"] => (Route::WellKnownCore, RequestType::Get),
        ["health"] => (Route::Health, RequestType::Get),
        ["t", device] if !device.is_empty() => (
            Route::Telemetry {
                house: None,
                device,
            },
            RequestType::Post,
        ),
        ["t", house, device] if !house.is_empty() && !device.is_empty() => (
            Route::Telemetry {
                house: Some(house),
                device,
            },
            RequestType::Post,
        ),
        _ => {
            return Err(Reply::error(
                ResponseType::NotFound,
                "no such resource: POST telemetry to /t/{device} or /t/{house}/{device}",
            ));
        }
    };
    if request.method != Some(allowed) {
        let method = match allowed {
            RequestType::Get => "GET",
            _ => "POST",
        };
        return Err(Reply::error(
            ResponseType::MethodNotAllowed,
            format!("this resource takes {method} only"),
        ));
    }
    // Accept is critical (RFC 7252 §5.10.4): a resource answers in its one
    // format or 4.06. Telemetry's 2.04 has no content, so any Accept is met.
    let format = match route {
        Route::WellKnownCore => Some(FORMAT_LINK),
        Route::Health => Some(FORMAT_TEXT),
        Route::Telemetry { .. } => None,
    };
    match (request.accept, format) {
        (Some(wanted), Some(format)) if wanted != format => Err(Reply::error(
            ResponseType::NotAcceptable,
            format!("this resource answers in Content-Format {format} only"),
        )),
        _ => Ok(route),
    }
}

/// The answer to `GET /.well-known/core`.
pub fn well_known_core() -> Reply {
    Reply {
        payload: WELL_KNOWN_CORE.as_bytes().to_vec(),
        content_format: Some(FORMAT_LINK),
        ..Reply::empty(ResponseType::Content)
    }
}

/// What telemetry requests are checked against.
#[derive(Debug)]
pub struct TelemetryRules<'a> {
    /// Larger payloads get 4.13.
    pub max_payload_bytes: usize,
    /// Who must sign.
    pub auth: &'a AuthPolicy,
}

/// Why a telemetry request was refused, for the `reason` metric label.
pub type Refusal = (&'static str, Reply);

/// Turns a telemetry request into the record to put (partition key, JSON),
/// or the answer that refuses it. `arrival` is now, in microseconds.
pub fn telemetry(
    request: &Request,
    house: Option<&str>,
    device: &str,
    rules: &TelemetryRules<'_>,
    decoder: &mut Decoder,
    arrival: Micros,
) -> Result<(String, Bytes), Refusal> {
    // A block-wise payload comes here whole, reassembled by `block`.
    let limit = rules.max_payload_bytes;
    if request.payload.len() > limit {
        let reason = format!(
            "the payload is {} bytes, more than the {limit}-byte limit",
            request.payload.len()
        );
        return Err(("too_large", block::too_large(limit, request.block1, reason)));
    }
    let cbor = match request.content_format {
        None | Some(FORMAT_JSON) => false,
        Some(FORMAT_CBOR) => true,
        Some(other) => {
            return Err((
                "unsupported_format",
                Reply::error(
                    ResponseType::UnsupportedContentFormat,
                    format!("Content-Format {other} is not supported: send JSON (50) or CBOR (60)"),
                ),
            ));
        }
    };
    let claim = Claim {
        method: "POST",
        house,
        device,
        payload: &request.payload,
        time: request.query_value(TIME_PARAMETER),
        nonce: request.query_value(NONCE_PARAMETER),
        signature: request.query_value(SIGNATURE_PARAMETER),
    };
    match rules.auth.check(&claim, arrival.div_euclid(1_000_000)) {
        Ok(_) => {}
        Err(Denied::ReplayCacheFull) => {
            let reply = Reply {
                max_age: Some(1),
                ..Reply::error(ResponseType::ServiceUnavailable, "busy")
            };
            return Err(("overloaded", reply));
        }
        Err(denied) => {
            // The same answer whatever the reason: the reason would tell
            // an attacker which devices have keys. The log says it.
            tracing::debug!(house, device, reason = %denied, "CoAP request not authenticated");
            return Err(("unauthorized", Reply::empty(ResponseType::Unauthorized)));
        }
    }
    let bad = |reason: String| {
        (
            "bad_payload",
            Reply::error(ResponseType::BadRequest, reason),
        )
    };
    let translated;
    let json: &[u8] = if cbor {
        translated = cbor::to_json(&request.payload).map_err(|err| bad(err.to_string()))?;
        translated.as_bytes()
    } else {
        &request.payload
    };
    let origin = Origin {
        device,
        house,
        ts: None,
    };
    let record = record::build(
        origin,
        Payload::Object(json),
        arrival.div_euclid(1_000),
        Conflict::Reject,
        "path",
    )
    .map_err(|err| bad(err.to_string()))?;
    // What the consumer would dead-letter is refused here, with its reason.
    decoder
        .decode(&record, arrival)
        .map_err(|err| bad(format!("{}: {err}", err.kind())))?;
    Ok((device.to_owned(), Bytes::from(record)))
}

#[cfg(test)]
mod tests {
    use coap_lite::ResponseType as R;

    use super::*;
    use crate::gateway::auth::{AuthSettings, sign};

    const NOW: Micros = 1_763_900_000_123_456;

    fn request(method: RequestType, path: &str, payload: &str) -> Request {
        Request {
            confirmable: true,
            message_id: 1,
            token: vec![],
            method: Some(method),
            path: path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            query: vec![],
            content_format: None,
            accept: None,
            block1: None,
            size1: None,
            no_response: 0,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routes_and_their_codes() {
        use RequestType::{Delete, Get, Post, Put};
        let cases: &[(RequestType, &str, Result<Route<'_>, R>)] = &[
            (Get, "/.well-known/core", Ok(Route::WellKnownCore)),
            (Get, "/health", Ok(Route::Health)),
            (
                Post,
                "/t/d1",
                Ok(Route::Telemetry {
                    house: None,
                    device: "d1",
                }),
            ),
            (
                Post,
                "/t/h1/d1",
                Ok(Route::Telemetry {
                    house: Some("h1"),
                    device: "d1",
                }),
            ),
            (Get, "/t/d1", Err(R::MethodNotAllowed)),
            (Put, "/t/h1/d1", Err(R::MethodNotAllowed)),
            (Post, "/health", Err(R::MethodNotAllowed)),
            (Delete, "/.well-known/core", Err(R::MethodNotAllowed)),
            (Post, "/t", Err(R::NotFound)),
            (Post, "/t/a/b/c", Err(R::NotFound)),
            (Post, "/telemetry/d1", Err(R::NotFound)),
            (Get, "/", Err(R::NotFound)),
        ];
        for (method, path, expected) in cases {
            let request = request(*method, path, "");
            let got = route(&request).map_err(|reply| reply.code);
            assert_eq!(&got, expected, "{method:?} {path}");
        }
        // Accept: each resource's own format, or 4.06.
        let accept_cases: &[(RequestType, &str, u16, Result<(), R>)] = &[
            (Get, "/health", FORMAT_TEXT, Ok(())),
            (Get, "/health", FORMAT_JSON, Err(R::NotAcceptable)),
            (Get, "/.well-known/core", FORMAT_LINK, Ok(())),
            (Get, "/.well-known/core", FORMAT_CBOR, Err(R::NotAcceptable)),
            (Post, "/t/h1/d1", FORMAT_CBOR, Ok(())),
        ];
        for (method, path, accept, expected) in accept_cases {
            let mut request = request(*method, path, "");
            request.accept = Some(*accept);
            let got = route(&request).map(|_| ()).map_err(|reply| reply.code);
            assert_eq!(&got, expected, "{method:?} {path} Accept {accept}");
        }
    }

    fn check(request: &Request, auth: &AuthPolicy) -> Result<String, (&'static str, R, String)> {
        let rules = TelemetryRules {
            max_payload_bytes: 64,
            auth,
        };
        telemetry(
            request,
            Some("h1"),
            "d1",
            &rules,
            &mut Decoder::default(),
            NOW,
        )
        .map(|(key, record)| {
            assert_eq!(key, "d1");
            String::from_utf8(record.to_vec()).unwrap()
        })
        .map_err(|(reason, reply)| {
            (
                reason,
                reply.code,
                String::from_utf8(reply.payload).unwrap(),
            )
        })
    }

    #[test]
    fn telemetry_becomes_a_record_or_the_right_refusal() {
        let open = AuthPolicy::open();
        let post = |payload: &str| request(RequestType::Post, "/t/h1/d1", payload);
        assert_eq!(
            check(&post(r#"{"v":1.5}"#), &open).unwrap(),
            r#"{"device":"d1","house":"h1","ts":1763900000123,"v":1.5}"#
        );
        let mut cbor = post("");
        cbor.content_format = Some(FORMAT_CBOR);
        ciborium::ser::into_writer(
            &ciborium::Value::Map(vec![("v".into(), 2.into())]),
            &mut cbor.payload,
        )
        .unwrap();
        assert_eq!(
            check(&cbor, &open).unwrap(),
            r#"{"device":"d1","house":"h1","ts":1763900000123,"v":2}"#
        );

        let mut text = post(r#"{"v":1}"#);
        text.content_format = Some(0);
        let mut bad_cbor = post("not cbor");
        bad_cbor.content_format = Some(FORMAT_CBOR);
        // (request, reason label, code, text in the diagnostic payload)
        let cases = [
            (
                post(&"x".repeat(65)),
                "too_large",
                R::RequestEntityTooLarge,
                "65 bytes",
            ),
            (
                text,
                "unsupported_format",
                R::UnsupportedContentFormat,
                "Content-Format 0",
            ),
            (post("{"), "bad_payload", R::BadRequest, "not a JSON object"),
            (bad_cbor, "bad_payload", R::BadRequest, "not valid CBOR"),
            (
                post(r#"{"device":"d2","v":1}"#),
                "bad_payload",
                R::BadRequest,
                "\"d2\"",
            ),
            (
                post(r#"{"v":"NaN"}"#),
                "bad_payload",
                R::BadRequest,
                "not_finite: ",
            ),
            (
                post(r#"{"ts":0,"v":1}"#),
                "bad_payload",
                R::BadRequest,
                "timestamp_out_of_range",
            ),
            (post(r#"{}"#), "bad_payload", R::BadRequest, "no_fields"),
        ];
        for (request, reason, code, text) in cases {
            let (got_reason, got_code, got_text) = check(&request, &open).unwrap_err();
            assert_eq!((got_reason, got_code), (reason, code), "{got_text}");
            assert!(got_text.contains(text), "{got_text:?} lacks {text:?}");
        }

        let keys = [(("h1".to_owned(), "d1".to_owned()), b"k".to_vec())]
            .into_iter()
            .collect();
        let auth = AuthPolicy::new(
            keys,
            AuthSettings {
                require: true,
                ..AuthSettings::default()
            },
        );
        let now = NOW.div_euclid(1_000_000);
        let signed_query = |nonce: &str, payload: &str| {
            let sig = sign(b"k", "POST", "h1", "d1", now, nonce, payload.as_bytes());
            vec![
                format!("time={now}"),
                format!("nonce={nonce}"),
                format!("sig={sig}"),
            ]
        };
        let mut signed = post(r#"{"v":1}"#);
        signed.query = signed_query("n1", r#"{"v":1}"#);
        assert!(check(&signed, &auth).is_ok());
        // Forged, replayed, unsigned: one answer, 4.01 with no text.
        let mut forged = post(r#"{"v":2}"#);
        forged.query = signed_query("n2", r#"{"v":1}"#);
        for request in [forged, signed, post(r#"{"v":1}"#)] {
            let refused = check(&request, &auth).unwrap_err();
            assert_eq!(refused, ("unauthorized", R::Unauthorized, String::new()));
        }
    }
}
