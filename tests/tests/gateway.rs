//! `ingest gateway` end to end: the real binary, the stack's Kinesis
//! emulator (through a proxy that can be cut, where Kinesis must go away)
//! and Mosquitto; the real `coap-client-notls` and `mosquitto_pub` as
//! devices, and raw CoAP datagrams where a test needs to control message
//! ids. Every test reads its own stream back: what was sent is there
//! exactly once, with the device as partition key.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use serde_json::{Value, json};

use tests::consumer::create_stream;
use tests::gateway::{
    CoapPeer, GatewayProcess, aiocoap_post, by_key, coap_client, code, mosquitto_pub,
    mosquitto_pub_with, post, read_stream, request, text,
};
use tests::proxy::{TcpProxy, host_port};

/// Bound for records to arrive; a bound for the test to end, not a speed check.
const ARRIVE_WITHIN: Duration = Duration::from_secs(60);
/// How long to keep reading after the expected records, to catch a duplicate.
const SETTLE: Duration = Duration::from_secs(2);
/// Bound for one CoAP answer on loopback.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

/// Lines of coap-client's output that carry an error code (`4.00 ...`).
fn error_lines(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|line| line.starts_with("4.") || line.starts_with("5."))
        .collect()
}

/// A topic prefix of this test run's own, so that gateways of tests running
/// at the same time never take each other's messages from the shared broker.
fn prefix(test: &str) -> String {
    format!("gwtest-{test}-{}", std::process::id())
}

/// Publishes to `<prefix>/sentinel` (a topic no layout matches) until the
/// gateway has received one: its subscription is in place. Returns how many
/// messages it has received then.
async fn wait_until_subscribed(gateway: &GatewayProcess, prefix: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        mosquitto_pub(&format!("{prefix}/sentinel"), "x", 1).await;
        let received = gateway
            .wait_for_metric(
                "ingest_gateway_mqtt_messages_total",
                &[],
                1.0,
                Duration::from_millis(500),
            )
            .await;
        if received >= 1.0 {
            // Let the sentinels in flight arrive, so the count is stable.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return gateway.metric("ingest_gateway_mqtt_messages_total", &[]);
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not subscribe within 30 s:\n{}",
            gateway.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_client_telemetry_lands_once_with_the_device_as_key() {
    let (stream, source) = create_stream("gw-coap-client", 2).await;
    let mut gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let url = |path: &str| format!("coap://{}{path}", gateway.coap);
    let before = now_millis();

    // Confirmable, canonical form with its own time, house in the path.
    let canonical = r#"{"ts":1763900000123,"fields":{"power":1.5}}"#;
    let out = coap_client(&[
        "-m",
        "post",
        "-t",
        "json",
        "-e",
        canonical,
        &url("/t/h1/dev-a"),
    ])
    .await;
    assert!(error_lines(&out).is_empty(), "{out}");
    // Confirmable, flat form without a time or a house.
    let out = coap_client(&[
        "-m",
        "post",
        "-e",
        r#"{"power":2,"on":true}"#,
        &url("/t/dev-b"),
    ])
    .await;
    assert!(error_lines(&out).is_empty(), "{out}");
    // Non-confirmable.
    let out = coap_client(&[
        "-m",
        "post",
        "-N",
        "-e",
        r#"{"ts":1763900000,"v":3}"#,
        &url("/t/h2/dev-c"),
    ])
    .await;
    assert!(error_lines(&out).is_empty(), "{out}");
    // CBOR (Content-Format 60) from a file.
    let cbor = ciborium::Value::Map(vec![
        ("ts".into(), 1_763_900_000.into()),
        (
            "fields".into(),
            ciborium::Value::Map(vec![("t".into(), ciborium::Value::Float(21.5))]),
        ),
    ]);
    let file = std::env::temp_dir().join(format!("gw-cbor-{}.bin", std::process::id()));
    let mut bytes = Vec::new();
    ciborium::ser::into_writer(&cbor, &mut bytes).unwrap();
    std::fs::write(&file, bytes).unwrap();
    let out = coap_client(&[
        "-m",
        "post",
        "-t",
        "60",
        "-f",
        file.to_str().unwrap(),
        &url("/t/h1/dev-d"),
    ])
    .await;
    std::fs::remove_file(&file).unwrap();
    assert!(error_lines(&out).is_empty(), "{out}");
    let after = now_millis();

    let records = read_stream(&source, 4, ARRIVE_WITHIN, SETTLE).await;
    assert_eq!(
        records.len(),
        4,
        "{:?}",
        records.iter().map(text).collect::<Vec<_>>()
    );
    let keys = by_key(&records);
    let only = |key: &str| -> String {
        let texts = &keys[key];
        assert_eq!(texts.len(), 1, "{key}: {texts:?}");
        texts[0].clone()
    };
    assert_eq!(
        only("dev-a"),
        r#"{"device":"dev-a","house":"h1","ts":1763900000123,"fields":{"power":1.5}}"#
    );
    let b = json(&only("dev-b"));
    let ts = b["ts"].as_i64().expect("the arrival time, epoch ms");
    assert!(
        (before..=after).contains(&ts),
        "{ts} not in [{before}, {after}]"
    );
    assert_eq!(
        b,
        json!({"device": "dev-b", "ts": ts, "power": 2, "on": true})
    );
    assert_eq!(
        only("dev-c"),
        r#"{"device":"dev-c","house":"h2","ts":1763900000,"v":3}"#
    );
    assert_eq!(
        only("dev-d"),
        r#"{"device":"dev-d","house":"h1","ts":1763900000,"fields":{"t":21.5}}"#
    );
    assert_eq!(
        gateway.metric("ingest_gateway_records_put_total", &[r#"protocol="coap""#]),
        4.0
    );
    assert!(gateway.terminate(Duration::from_secs(20)).success());
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmissions_are_answered_alike_and_put_once() {
    let (stream, source) = create_stream("gw-retransmit", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;

    // Retransmitted after the answer: the same answer, byte for byte.
    let first = post("/t/h1/dev-r", br#"{"ts":1763900000123,"v":1}"#, 0x1234)
        .to_bytes()
        .unwrap();
    peer.send_bytes(&first).await;
    let answer = peer.recv_bytes(ANSWER_WITHIN).await.expect("an answer");
    let parsed = Packet::from_bytes(&answer).unwrap();
    assert_eq!(parsed.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(
        (code(&parsed), parsed.header.message_id),
        ("2.04".into(), 0x1234)
    );
    assert_eq!(parsed.get_token(), &0x1234u16.to_be_bytes());
    for _ in 0..2 {
        peer.send_bytes(&first).await;
        assert_eq!(peer.recv_bytes(ANSWER_WITHIN).await, Some(answer.clone()));
    }

    // Retransmitted at once, while the first is with Kinesis: either an
    // empty ACK and then one separate 2.04, or the same piggybacked 2.04
    // twice; in every case one record.
    let second = post("/t/h1/dev-r", br#"{"ts":1763900000124,"v":2}"#, 0x1235)
        .to_bytes()
        .unwrap();
    peer.send_bytes(&second).await;
    peer.send_bytes(&second).await;
    let mut changed = Vec::new();
    while let Some(message) = peer.recv(Duration::from_secs(3)).await {
        if message.header.get_type() == MessageType::Confirmable {
            peer.acknowledge(&message).await;
        }
        if code(&message) == "2.04" {
            assert_eq!(message.get_token(), &0x1235u16.to_be_bytes());
            changed.push(message);
        } else {
            // Only an empty ACK of the request may come besides.
            assert_eq!(message.header.code, MessageClass::Empty, "{message:?}");
            assert_eq!(message.header.message_id, 0x1235);
        }
    }
    match changed.as_slice() {
        [one] => assert!(matches!(
            one.header.get_type(),
            MessageType::Acknowledgement | MessageType::Confirmable
        )),
        [one, two] => {
            assert_eq!(one, two);
            assert_eq!(one.header.get_type(), MessageType::Acknowledgement);
        }
        other => panic!("expected one 2.04, or the same one twice: {other:?}"),
    }

    // Non-confirmable, sent twice: one record, a NON 2.04 each time.
    let mut non = request(
        MessageType::NonConfirmable,
        RequestType::Post,
        "/t/h1/dev-r",
        0x1236,
    );
    non.payload = br#"{"ts":1763900000125,"v":3}"#.to_vec();
    for _ in 0..2 {
        let answer = peer
            .exchange(&non, ANSWER_WITHIN)
            .await
            .expect("a NON answer");
        assert_eq!(answer.header.get_type(), MessageType::NonConfirmable);
        assert_eq!(code(&answer), "2.04");
    }

    // The same message id from another endpoint is another request.
    let other = CoapPeer::new(gateway.coap).await;
    let answer = other
        .exchange(
            &post("/t/h1/dev-r", br#"{"ts":1763900000126,"v":4}"#, 0x1234),
            ANSWER_WITHIN,
        )
        .await
        .expect("an answer");
    assert_eq!(code(&answer), "2.04");

    let records = read_stream(&source, 4, ARRIVE_WITHIN, SETTLE).await;
    let mut values: Vec<i64> = records
        .iter()
        .map(|record| json(&text(record))["v"].as_i64().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, [1, 2, 3, 4]);
    assert!(records.iter().all(|r| r.partition_key == "dev-r"));
    assert!(gateway.metric("ingest_gateway_coap_duplicates_total", &[]) >= 4.0);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_codes_and_nothing_is_put() {
    let (stream, source) = create_stream("gw-bad-input", 1).await;
    let gateway = GatewayProcess::start(&stream, &["--max-payload-bytes", "1024"], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;
    let with = |mut packet: Packet, option: CoapOption, value: &[u8]| {
        packet.add_option(option, value.to_vec());
        packet
    };
    let body = |payload: &[u8]| post("/t/h1/d1", payload, 0);
    // (request, code, text in the diagnostic payload)
    let cases: Vec<(Packet, &str, &str)> = vec![
        (post("/nope", b"{}", 0), "4.04", "no such resource"),
        (post("/t/a/b/c", b"{}", 0), "4.04", "no such resource"),
        (
            request(MessageType::Confirmable, RequestType::Get, "/t/h1/d1", 0),
            "4.05",
            "POST only",
        ),
        (
            request(MessageType::Confirmable, RequestType::Put, "/t/d1", 0),
            "4.05",
            "POST only",
        ),
        (
            request(MessageType::Confirmable, RequestType::Post, "/health", 0),
            "4.05",
            "GET only",
        ),
        (body(br#"{"v":1"#), "4.00", "not a JSON object"),
        (body(br#"[1,2]"#), "4.00", "not a JSON object"),
        (body(br#"{"v":"NaN"}"#), "4.00", "not_finite"),
        (body(br#"{"ts":0,"v":1}"#), "4.00", "timestamp_out_of_range"),
        (body(br#"{"ts":1763900000}"#), "4.00", "no_fields"),
        (body(br#"{"device":"other","v":1}"#), "4.00", r#""other""#),
        (body(&[b'x'; 2000]), "4.13", "2000 bytes"),
        (
            with(body(br#"{"v":1}"#), CoapOption::Block1, &[0x0e]),
            "4.00",
            "block 0 has 7 bytes for a block size of 1024",
        ),
        (
            with(body(br#"{"v":1}"#), CoapOption::ContentFormat, &[0]),
            "4.15",
            "Content-Format 0",
        ),
        (
            with(body(b"\xff\xff"), CoapOption::ContentFormat, &[60]),
            "4.00",
            "not valid CBOR",
        ),
        (
            with(body(br#"{"v":1}"#), CoapOption::IfMatch, b"x"),
            "4.02",
            "critical option 1",
        ),
    ];
    for (i, (mut packet, expected, reason)) in cases.into_iter().enumerate() {
        packet.header.message_id = 100 + i as u16;
        // An answer is never larger than its request: padded (with a query
        // parameter nothing reads), the whole diagnostic fits.
        packet.add_option(CoapOption::UriQuery, vec![b'p'; 200]);
        let answer = peer
            .exchange(&packet, ANSWER_WITHIN)
            .await
            .expect("an answer");
        let diagnostic = String::from_utf8_lossy(&answer.payload).into_owned();
        assert_eq!(code(&answer), expected, "case {i}: {diagnostic}");
        assert!(
            diagnostic.contains(reason),
            "case {i}: {diagnostic:?} lacks {reason:?}"
        );
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        if expected == "4.13" {
            assert_eq!(
                answer.get_first_option(CoapOption::Size1),
                Some(&vec![4, 0])
            );
            // Block1 suggests 1024-byte blocks (SZX 6).
            assert_eq!(
                answer.get_first_option(CoapOption::Block1),
                Some(&vec![0x06])
            );
        }
    }

    // The real client sees the codes too.
    let url = format!("coap://{}/t/h1/d1", gateway.coap);
    let out = coap_client(&["-m", "post", "-e", "{", &url]).await;
    assert!(
        error_lines(&out).iter().any(|l| l.starts_with("4.00")),
        "{out}"
    );
    let out = coap_client(&["-m", "get", &format!("coap://{}/nope", gateway.coap)]).await;
    assert!(
        error_lines(&out).iter().any(|l| l.starts_with("4.04")),
        "{out}"
    );

    // What is there, and a ping.
    let core = peer
        .exchange(
            &request(
                MessageType::Confirmable,
                RequestType::Get,
                "/.well-known/core",
                200,
            ),
            ANSWER_WITHIN,
        )
        .await
        .unwrap();
    assert_eq!(code(&core), "2.05");
    assert_eq!(
        core.get_first_option(CoapOption::ContentFormat),
        Some(&vec![40])
    );
    assert_eq!(
        core.payload,
        ingest::gateway::coap::WELL_KNOWN_CORE.as_bytes()
    );
    let health = peer
        .exchange(
            &request(MessageType::Confirmable, RequestType::Get, "/health", 201),
            ANSWER_WITHIN,
        )
        .await
        .unwrap();
    assert_eq!(code(&health), "2.05");
    let ping = [0x40, 0x00, 0x00, 0xca];
    peer.send_bytes(&ping).await;
    assert_eq!(
        peer.recv_bytes(ANSWER_WITHIN).await,
        Some(vec![0x70, 0x00, 0x00, 0xca])
    );
    // A confirmable message that is not CoAP past its header: a reset.
    peer.send_bytes(&[0x40, 0x02, 0x00, 0xcb, 0xf0]).await;
    assert_eq!(
        peer.recv_bytes(ANSWER_WITHIN).await,
        Some(vec![0x70, 0x00, 0x00, 0xcb])
    );

    let rejected = |reason: &str| {
        gateway.metric(
            "ingest_gateway_rejected_total",
            &[r#"protocol="coap""#, &format!("reason=\"{reason}\"")],
        )
    };
    let counted = [
        ("not_found", 3.0),
        ("method_not_allowed", 3.0),
        ("bad_payload", 8.0),
        ("too_large", 1.0),
        ("bad_block", 1.0),
        ("unsupported_format", 1.0),
        ("bad_option", 1.0),
        ("malformed", 1.0),
    ];
    for (reason, count) in counted {
        assert_eq!(rejected(reason), count, "{reason}");
    }
    let records = read_stream(&source, 0, ARRIVE_WITHIN, SETTLE).await;
    assert!(
        records.is_empty(),
        "{:?}",
        records.iter().map(text).collect::<Vec<_>>()
    );
    source.delete_stream().await.unwrap();
}

/// Writes a keys file only its owner may read, as the gateway requires;
/// by rename, so that the gateway never reads it half written.
fn write_keys(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&next, path).unwrap();
}

fn unix_seconds() -> i64 {
    now_millis() / 1000
}

/// `/t/{house}/{device}?time=..&nonce=..&sig=..` signed with `key`.
fn signed_path(
    key: &[u8],
    house: &str,
    device: &str,
    time: i64,
    nonce: &str,
    payload: &str,
) -> String {
    let sig =
        ingest::gateway::auth::sign(key, "POST", house, device, time, nonce, payload.as_bytes());
    format!("/t/{house}/{device}?time={time}&nonce={nonce}&sig={sig}")
}

/// A JSON object of exactly `size` bytes: `{"v":<v>,"note":"xx..."}`.
fn padded_json(v: usize, size: usize) -> String {
    let head = format!(r#"{{"v":{v},"note":""#);
    let pad = size - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(pad))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiocoap_sends_1_4_and_16_kib_block_wise_and_each_lands_once() {
    let (stream, source) = create_stream("gw-blockwise", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let url = format!("coap://{}/t/h1/dev-big", gateway.coap);
    let sizes = [1024, 4096, 16 * 1024];
    for (v, size) in sizes.into_iter().enumerate() {
        let answer = aiocoap_post(&url, padded_json(v, size).as_bytes()).await;
        assert_eq!(answer["code"], "2.04", "{size} bytes: {answer}");
    }
    // aiocoap sent 1024 bytes whole and the others in 1024-byte blocks:
    // 3 and 15 of them answered 2.31 Continue.
    let continued = gateway.metric("ingest_gateway_coap_requests_total", &[r#"code="2.31""#]);
    assert_eq!(continued, 18.0);

    // Over the limit (16 KiB): 4.13 with the limit in Size1, at the first
    // block (aiocoap announces the whole size in Size1). aiocoap hides the
    // Block1 of the answer; the raw test below checks it.
    let over = aiocoap_post(&url, padded_json(9, 16 * 1024 + 1).as_bytes()).await;
    assert_eq!(over["code"], "4.13", "{over}");
    assert_eq!(over["size1"], 16 * 1024, "{over}");

    let records = read_stream(&source, 3, ARRIVE_WITHIN, SETTLE).await;
    assert_eq!(
        records.len(),
        3,
        "one record for each payload, none for the refused one"
    );
    for (v, size) in sizes.into_iter().enumerate() {
        let sent = json(&padded_json(v, size));
        let record = records
            .iter()
            .map(|r| json(&text(r)))
            .find(|r| r["v"] == v)
            .unwrap_or_else(|| panic!("no record with v={v}"));
        assert_eq!(
            record["note"], sent["note"],
            "the {size}-byte payload whole"
        );
        assert_eq!(record["house"], "h1");
    }
    assert!(records.iter().all(|r| r.partition_key == "dev-big"));
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_are_deduplicated_in_order_and_only_a_whole_body_is_put() {
    let (stream, source) = create_stream("gw-blocks", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;
    // 16-byte blocks (SZX 0): Block1 is NUM << 4 | M << 3 | SZX.
    let body = br#"{"v":7,"note":"block-wise, sixteen bytes a block"}"#;
    let chunks: Vec<&[u8]> = body.chunks(16).collect();
    let block = |num: usize, message_id: u16| {
        let more = num + 1 < chunks.len();
        let mut packet = post("/t/h1/dev-blk", chunks[num], message_id);
        packet.add_option(
            CoapOption::Block1,
            vec![((num as u8) << 4) | (u8::from(more) << 3)],
        );
        packet
    };
    let send = |packet: Packet| {
        let peer = &peer;
        async move {
            peer.exchange(&packet, ANSWER_WITHIN)
                .await
                .expect("an answer")
        }
    };

    // Block 0, then its retransmission: the same 2.31, counted a duplicate.
    let first = send(block(0, 1)).await;
    assert_eq!(code(&first), "2.31");
    assert_eq!(
        first.get_first_option(CoapOption::Block1),
        Some(&vec![0x08])
    );
    assert_eq!(code(&send(block(0, 1)).await), "2.31");
    assert_eq!(
        gateway.metric("ingest_gateway_coap_duplicates_total", &[]),
        1.0
    );
    // Announced over the limit by Size1: 4.13 with Size1 and a Block1
    // naming the block and the size to use.
    let mut announced = block(0, 30);
    announced.add_option(CoapOption::Size1, vec![0x4e, 0x20]);
    let over = send(announced).await;
    assert_eq!(code(&over), "4.13");
    assert_eq!(
        over.get_first_option(CoapOption::Size1),
        Some(&vec![0x40, 0x00])
    );
    assert_eq!(over.get_first_option(CoapOption::Block1), Some(&vec![]));
    // A gap (block 2 after block 0): 4.08, and the transfer is dropped.
    let gap = send(block(2, 2)).await;
    assert_eq!(
        code(&gap),
        "4.08",
        "{}",
        String::from_utf8_lossy(&gap.payload)
    );
    assert_eq!(code(&send(block(1, 3)).await), "4.08");

    // From the start, each block once, the last one retransmitted.
    let mut id = 10;
    for num in 0..chunks.len() - 1 {
        assert_eq!(code(&send(block(num, id)).await), "2.31", "block {num}");
        id += 1;
    }
    let last = chunks.len() - 1;
    let done = send(block(last, id)).await;
    assert_eq!(code(&done), "2.04");
    assert_eq!(
        done.get_first_option(CoapOption::Block1),
        Some(&vec![(last as u8) << 4]),
        "the last block's answer names it"
    );
    assert_eq!(code(&send(block(last, id)).await), "2.04");

    // libcoap's client, block-wise too (-b 64).
    let file = tests::gateway::tempfile_with(&padded_json(8, 300).into_bytes());
    let url = format!("coap://{}/t/h1/dev-lib", gateway.coap);
    let out = coap_client(&[
        "-m",
        "post",
        "-b",
        "64",
        "-t",
        "json",
        "-f",
        &file.display().to_string(),
        &url,
    ])
    .await;
    let _ = std::fs::remove_file(&file);
    assert!(error_lines(&out).is_empty(), "{out}");
    let continued = gateway.metric("ingest_gateway_coap_requests_total", &[r#"code="2.31""#]);
    // 1 + 3 of the raw blocks (a retransmission is answered from the
    // exchange cache, not counted), and 4 of libcoap's 5 blocks of 64 bytes.
    assert_eq!(continued, 8.0);

    let records = read_stream(&source, 2, ARRIVE_WITHIN, SETTLE).await;
    let mut texts: Vec<Value> = records.iter().map(|r| json(&text(r))).collect();
    texts.sort_by_key(|r| r["v"].as_i64());
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(texts[0]["note"], "block-wise, sixteen bytes a block");
    assert_eq!(texts[1]["note"], json(&padded_json(8, 300))["note"]);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_unknown_methods_elective_options_and_bare_payload_markers() {
    let (stream, source) = create_stream("gw-rfc7252", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;
    let get = |path: &str, accept: Option<u8>, message_id: u16| {
        let mut packet = request(MessageType::Confirmable, RequestType::Get, path, message_id);
        if let Some(format) = accept {
            packet.add_option(CoapOption::Accept, vec![format]);
        }
        packet
    };
    let answer = |packet: Packet| {
        let peer = &peer;
        async move {
            peer.exchange(&packet, ANSWER_WITHIN)
                .await
                .expect("an answer")
        }
    };

    // Accept is honoured: each resource answers in its format or 4.06.
    assert_eq!(code(&answer(get("/health", Some(50), 1)).await), "4.06");
    assert_eq!(
        code(&answer(get("/.well-known/core", Some(60), 2)).await),
        "4.06"
    );
    assert_eq!(
        code(&answer(get("/.well-known/core", Some(40), 3)).await),
        "2.05"
    );
    let health = answer(get("/health", Some(0), 4)).await;
    assert_eq!(code(&health), "2.05");
    // Max-Age 0 (an empty value): never served from a cache.
    assert_eq!(health.get_first_option(CoapOption::MaxAge), Some(&vec![]));

    // A method code CoAP does not define (0.08): 4.05, not a reset.
    let mut unknown = post("/t/h1/d1", br#"{"v":1}"#, 5);
    unknown.header.code = MessageClass::Reserved(0x08);
    let refused = answer(unknown).await;
    assert_eq!(refused.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(code(&refused), "4.05");

    // An over-long Content-Format is an elective option in the wrong
    // format: ignored, so the JSON payload is taken.
    let mut long_format = post("/t/h1/d-cf", br#"{"v":2}"#, 6);
    long_format.add_option(CoapOption::ContentFormat, vec![0, 0, 50]);
    assert_eq!(code(&answer(long_format).await), "2.04");

    // A payload marker with nothing after it: a message format error, so
    // a confirmable message gets a reset and nothing else.
    let mut bare = post("/t/h1/d-bare", b"", 7).to_bytes().unwrap();
    bare.push(0xff);
    peer.send_bytes(&bare).await;
    assert_eq!(
        peer.recv_bytes(ANSWER_WITHIN).await,
        Some(vec![0x70, 0x00, 0x00, 0x07])
    );

    let records = read_stream(&source, 1, ARRIVE_WITHIN, SETTLE).await;
    let keys: Vec<&str> = records.iter().map(|r| r.partition_key.as_str()).collect();
    assert_eq!(keys, ["d-cf"]);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_bind_house_device_time_and_are_taken_once() {
    let (stream, source) = create_stream("gw-auth", 1).await;
    let dir = std::env::temp_dir().join(format!("gw-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    write_keys(
        &keys,
        "# house/device key\nh1/dev-s s3cret\nh1/dev-t hex:00ff\n",
    );
    let gateway = GatewayProcess::start(
        &stream,
        &["--auth-keys", keys.to_str().unwrap(), "--require-auth"],
        &[],
    )
    .await;
    let url = |path: &str| format!("coap://{}{path}", gateway.coap);
    let payload = r#"{"ts":1763900000123,"v":1}"#;
    let now = unix_seconds();
    let good = signed_path(b"s3cret", "h1", "dev-s", now, "n1", payload);

    // libcoap's client, signed as the README says: taken once.
    let out = coap_client(&["-m", "post", "-e", payload, &url(&good)]).await;
    assert!(error_lines(&out).is_empty(), "{out}");

    // (path, payload, what is wrong): each gets the same bare 4.01.
    let attempts = [
        (good.clone(), payload.to_owned(), "replayed as it was"),
        (
            good.replace("/t/h1/dev-s", "/t/h2/dev-s"),
            payload.to_owned(),
            "moved to another house",
        ),
        (
            good.replace("/t/h1/dev-s", "/t/h1/dev-t"),
            payload.to_owned(),
            "moved to another device",
        ),
        (
            good.replace("/t/h1/dev-s", "/t/dev-s"),
            payload.to_owned(),
            "moved to the path without a house",
        ),
        (
            good.replace("nonce=n1", "nonce=n2"),
            payload.to_owned(),
            "another nonce",
        ),
        (
            good.clone(),
            r#"{"ts":1763900000123,"v":2}"#.to_owned(),
            "another payload",
        ),
        (
            signed_path(b"s3cret", "h1", "dev-s", now - 3_600, "n3", payload),
            payload.to_owned(),
            "an hour old",
        ),
        (
            signed_path(b"s3cret", "h9", "dev-s", now, "n4", payload),
            payload.to_owned(),
            "no key for h9/dev-s",
        ),
        ("/t/h1/dev-s".to_owned(), payload.to_owned(), "unsigned"),
        (
            "/t/dev-s".to_owned(),
            r#"{"house":"h1","v":1}"#.to_owned(),
            "the house in the payload",
        ),
    ];
    let peer = CoapPeer::new(gateway.coap).await;
    for (i, (path, body, what)) in attempts.iter().enumerate() {
        let id = 300 + i as u16;
        let answer = peer
            .exchange(&post(path, body.as_bytes(), id), ANSWER_WITHIN)
            .await
            .expect("an answer");
        assert_eq!(code(&answer), "4.01", "{what}: {answer:?}");
        // Alike: no text, no option, only the ids differ.
        assert_eq!(
            answer.to_bytes().unwrap().len(),
            4 + 2,
            "{what}: {answer:?}"
        );
    }
    let out = coap_client(&["-m", "post", "-e", payload, &url(&good)]).await;
    assert!(
        error_lines(&out).iter().any(|l| l.starts_with("4.01")),
        "the real client's replay: {out}"
    );

    // Rotation: the file is replaced; within the reload interval the new
    // key works and the old one does not.
    write_keys(&keys, "h1/dev-s n3w-secret\nh1/dev-t hex:00ff\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut nonce = 0;
    loop {
        nonce += 1;
        let body = format!(r#"{{"ts":1763900000124,"v":{nonce}}}"#);
        let path = signed_path(
            b"n3w-secret",
            "h1",
            "dev-s",
            unix_seconds(),
            &format!("r{nonce}"),
            &body,
        );
        let answer = peer
            .exchange(&post(&path, body.as_bytes(), 400 + nonce), ANSWER_WITHIN)
            .await
            .expect("an answer");
        if code(&answer) == "2.04" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new key was not taken within 30 s:\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let old = signed_path(b"s3cret", "h1", "dev-s", unix_seconds(), "old", payload);
    let answer = peer
        .exchange(&post(&old, payload.as_bytes(), 500), ANSWER_WITHIN)
        .await
        .expect("an answer");
    assert_eq!(code(&answer), "4.01");
    assert!(gateway.log_text().contains("device keys reloaded"));

    // The first request, and one of the rotation's (the last try).
    let records = read_stream(&source, 2, ARRIVE_WITHIN, SETTLE).await;
    assert_eq!(
        records.len(),
        2,
        "{:?}",
        records.iter().map(text).collect::<Vec<_>>()
    );
    assert_eq!(
        text(&records[0]),
        r#"{"device":"dev-s","house":"h1","ts":1763900000123,"v":1}"#
    );
    let refused = attempts.len() as f64 + 2.0 + f64::from(nonce - 1);
    assert_eq!(
        gateway.metric(
            "ingest_gateway_rejected_total",
            &[r#"reason="unauthorized""#]
        ),
        refused
    );
    std::fs::remove_dir_all(&dir).unwrap();
    source.delete_stream().await.unwrap();
}

#[test]
fn a_keys_file_others_can_read_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let keys = std::env::temp_dir().join(format!("gw-open-keys-{}", std::process::id()));
    std::fs::write(&keys, "h1/dev-s s3cret\n").unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(tests::ingest_bin())
        .args(["gateway", "--stream", "unused", "--metrics-addr", "off"])
        .args(["--auth-keys", keys.to_str().unwrap()])
        .env_remove("INGEST_AUTH_KEYS")
        .output()
        .unwrap();
    std::fs::remove_file(&keys).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("every user may read it (mode 644)"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_error_answer_is_larger_than_its_request() {
    let (stream, source) = create_stream("gw-reflect", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;
    let with_token = |mut packet: Packet, token: &[u8]| {
        packet.set_token(token.to_vec());
        packet.to_bytes().unwrap()
    };
    let critical = {
        let mut packet = post("/t/d1", b"{}", 7);
        packet.add_option(CoapOption::IfMatch, b"x".to_vec());
        packet.to_bytes().unwrap()
    };
    // Small datagrams a spoofed source might send, each answered with an error.
    let datagrams: Vec<(Vec<u8>, &str)> = vec![
        (vec![0x40, 0x01, 0x00, 0x01], "4.04"),
        (
            with_token(
                request(MessageType::Confirmable, RequestType::Get, "/t/d1", 2),
                b"",
            ),
            "4.05",
        ),
        (
            with_token(
                request(MessageType::Confirmable, RequestType::Put, "/health", 3),
                b"\x01",
            ),
            "4.05",
        ),
        (with_token(post("/x", b"", 4), b""), "4.04"),
        (with_token(post("/t/d1", b"{", 5), b""), "4.00"),
        (with_token(post("/t/d1", b"[]", 6), b"\x01\x02"), "4.00"),
        (critical, "4.02"),
    ];
    for (datagram, expected) in datagrams {
        peer.send_bytes(&datagram).await;
        let answer = peer.recv_bytes(ANSWER_WITHIN).await.expect("an answer");
        let packet = Packet::from_bytes(&answer).unwrap();
        assert_eq!(code(&packet), expected, "{datagram:02x?}");
        assert!(
            answer.len() <= datagram.len(),
            "{} bytes answer {} bytes: {datagram:02x?} -> {answer:02x?}",
            answer.len(),
            datagram.len()
        );
    }
    // A larger request still gets the whole text.
    let mut padded = post("/nope", b"{}", 8);
    padded.add_option(CoapOption::UriQuery, vec![b'p'; 120]);
    let answer = peer.exchange(&padded, ANSWER_WITHIN).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer.payload).starts_with("no such resource: POST telemetry to"),
        "{answer:?}"
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_down_gives_503_then_recovers() {
    let (stream, source) = create_stream("gw-kinesis-down", 1).await;
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let via = proxy.url_via(&kinesis);
    let gateway = GatewayProcess::start(
        &stream,
        &["--put-timeout", "8s"],
        &[("AWS_ENDPOINT_URL_KINESIS", &via)],
    )
    .await;
    let peer = CoapPeer::new(gateway.coap).await;
    let health = |id| request(MessageType::Confirmable, RequestType::Get, "/health", id);

    proxy.cut().await;
    // /health follows within a probe or two.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut id = 1;
    loop {
        let answer = peer.exchange(&health(id), ANSWER_WITHIN).await.unwrap();
        if code(&answer) == "5.03" {
            assert_eq!(answer.get_first_option(CoapOption::MaxAge), Some(&vec![5]));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health still says {}",
            code(&answer)
        );
        id += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The real client gets 5.03 once the put timeout passed.
    let url = format!("coap://{}/t/dev-down", gateway.coap);
    let out = coap_client(&["-m", "post", "-e", r#"{"ts":1763900000123,"v":1}"#, &url]).await;
    assert!(
        error_lines(&out).iter().any(|l| l.starts_with("5.03")),
        "coap-client-notls said {out:?}; the gateway's log:\n{}",
        gateway.log_text()
    );

    // A raw request sees how: an empty ACK at once, then a separate
    // confirmable 5.03 with Max-Age.
    peer.send(&post("/t/dev-down", br#"{"ts":1763900000124,"v":1}"#, 500))
        .await;
    let ack = peer.recv(ANSWER_WITHIN).await.expect("an empty ACK");
    assert_eq!(
        (
            ack.header.get_type(),
            ack.header.code,
            ack.header.message_id
        ),
        (MessageType::Acknowledgement, MessageClass::Empty, 500)
    );
    let late = peer
        .recv(Duration::from_secs(15))
        .await
        .expect("a separate response");
    assert_eq!(late.header.get_type(), MessageType::Confirmable);
    assert_eq!(
        (code(&late), late.get_token()),
        ("5.03".into(), &500u16.to_be_bytes()[..])
    );
    assert_eq!(late.get_first_option(CoapOption::MaxAge), Some(&vec![5]));
    peer.acknowledge(&late).await;

    // A request retransmitted while it waits for Kinesis gets an empty ACK
    // (once), and the answer 2.04 separately when Kinesis comes back.
    let waiting = post("/t/dev-down", br#"{"ts":1763900000125,"v":2}"#, 501);
    peer.send(&waiting).await;
    peer.send(&waiting).await;
    let ack = peer.recv(ANSWER_WITHIN).await.expect("an empty ACK");
    assert_eq!(
        (ack.header.code, ack.header.message_id),
        (MessageClass::Empty, 501)
    );
    assert_eq!(
        peer.recv(Duration::from_millis(1500)).await,
        None,
        "one empty ACK only"
    );
    proxy.restore().await;
    let late = peer
        .recv(Duration::from_secs(15))
        .await
        .expect("a separate response");
    assert_eq!(
        (late.header.get_type(), code(&late)),
        (MessageType::Confirmable, "2.04".into())
    );
    assert_eq!(late.get_token(), &501u16.to_be_bytes());
    peer.acknowledge(&late).await;
    // The gateway stops resending once acknowledged.
    assert_eq!(peer.recv(Duration::from_secs(4)).await, None);
    // A late retransmission of the request gets its empty ACK again, not a
    // second put.
    let again = peer
        .exchange(&waiting, ANSWER_WITHIN)
        .await
        .expect("an answer");
    assert_eq!(
        (again.header.code, again.header.message_id),
        (MessageClass::Empty, 501)
    );

    // And then as before: piggybacked.
    let answer = peer
        .exchange(
            &post("/t/dev-down", br#"{"ts":1763900000126,"v":3}"#, 502),
            ANSWER_WITHIN,
        )
        .await
        .unwrap();
    assert_eq!(
        (answer.header.get_type(), code(&answer)),
        (MessageType::Acknowledgement, "2.04".into())
    );
    let answer = peer.exchange(&health(600), ANSWER_WITHIN).await.unwrap();
    assert_eq!(code(&answer), "2.05");

    // Only what was answered 2.04 is in the stream.
    let records = read_stream(&source, 2, ARRIVE_WITHIN, SETTLE).await;
    let mut values: Vec<i64> = records
        .iter()
        .map(|record| json(&text(record))["v"].as_i64().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, [2, 3]);
    assert!(
        gateway.metric(
            "ingest_gateway_rejected_total",
            &[r#"reason="unavailable""#]
        ) >= 2.0
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_become_records_by_topic_layout() {
    let (stream, source) = create_stream("gw-mqtt", 2).await;
    let prefix = prefix("mqtt");
    let mqtt_url = std::env::var("INGEST_MQTT_URL").unwrap();
    let client_id = format!("{prefix}-gateway");
    let gateway = GatewayProcess::start(
        &stream,
        &[
            "--mqtt-url",
            &mqtt_url,
            "--mqtt-topic",
            "devices/+/telemetry",
            "--mqtt-topic",
            &format!("{prefix}/#"),
            "--mqtt-client-id",
            &client_id,
        ],
        &[],
    )
    .await;
    let sentinels = wait_until_subscribed(&gateway, &prefix).await;
    let before = now_millis();
    // Default layout 1: devices/{device}/telemetry, a JSON record.
    mosquitto_pub(
        "devices/dev-m1/telemetry",
        r#"{"ts":1763900000123,"fields":{"power":1.5}}"#,
        1,
    )
    .await;
    mosquitto_pub("devices/dev-m2/telemetry", r#"{"power":2}"#, 1).await;
    // The topic names the device, as topic(2) AS device does.
    mosquitto_pub(
        "devices/dev-m3/telemetry",
        r#"{"device":"spoof","ts":1763900000,"v":3}"#,
        1,
    )
    .await;
    mosquitto_pub("devices/dev-m4/telemetry", r#"{"ts":1763900000,"v":4}"#, 0).await;
    // Default layout 2: <prefix>/{house}/{device}/{name}/{ts}/data|event, one value.
    mosquitto_pub(
        &format!("{prefix}/h42/egauge-A/Battery/1763900000/data"),
        "1.5",
        1,
    )
    .await;
    mosquitto_pub(
        &format!("{prefix}/h42/egauge-A/door/2025-11-23T12:00:00Z/event"),
        "open",
        1,
    )
    .await;
    // No layout matches, or no JSON object: dropped, counted.
    mosquitto_pub(
        &format!("{prefix}/h42/egauge-A/Battery/1763900000/other"),
        "1",
        1,
    )
    .await;
    mosquitto_pub("devices/dev-m5/telemetry", "not json", 1).await;
    let after = now_millis();

    let records = read_stream(&source, 6, ARRIVE_WITHIN, SETTLE).await;
    assert_eq!(
        records.len(),
        6,
        "{:?}",
        records.iter().map(text).collect::<Vec<_>>()
    );
    let keys = by_key(&records);
    let only = |key: &str| -> String {
        let texts = &keys[key];
        assert_eq!(texts.len(), 1, "{key}: {texts:?}");
        texts[0].clone()
    };
    assert_eq!(
        only("dev-m1"),
        r#"{"device":"dev-m1","ts":1763900000123,"fields":{"power":1.5}}"#
    );
    let m2 = json(&only("dev-m2"));
    let ts = m2["ts"].as_i64().unwrap();
    assert!((before..=after).contains(&ts), "{ts}");
    assert_eq!(m2, json!({"device": "dev-m2", "ts": ts, "power": 2}));
    assert_eq!(
        only("dev-m3"),
        r#"{"device":"dev-m3","ts":1763900000,"v":3}"#
    );
    assert_eq!(
        only("dev-m4"),
        r#"{"device":"dev-m4","ts":1763900000,"v":4}"#
    );
    let mut egauge = keys["egauge-A"].clone();
    egauge.sort();
    assert_eq!(
        egauge,
        [
            r#"{"device":"egauge-A","house":"h42","ts":"2025-11-23T12:00:00Z","fields":{"door":"open"}}"#,
            r#"{"device":"egauge-A","house":"h42","ts":1763900000,"fields":{"Battery":1.5}}"#,
        ]
    );
    let received = gateway
        .wait_for_metric(
            "ingest_gateway_mqtt_messages_total",
            &[],
            sentinels + 8.0,
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(received, sentinels + 8.0);
    assert_eq!(
        gateway.metric(
            "ingest_gateway_rejected_total",
            &[r#"protocol="mqtt""#, r#"reason="bad_payload""#]
        ),
        1.0
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_wait_unacknowledged_while_kinesis_is_down() {
    let (stream, source) = create_stream("gw-mqtt-down", 1).await;
    let prefix = prefix("mqtt-down");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let gateway = bridge(
        &stream,
        &prefix,
        &format!("{prefix}-gw"),
        &proxy.url_via(&kinesis),
        &[],
    )
    .await;
    let sentinels = wait_until_subscribed(&gateway, &prefix).await;
    let acked = gateway.metric("ingest_gateway_mqtt_acked_total", &[]);

    proxy.cut().await;
    for i in 1..=5 {
        mosquitto_pub(
            &format!("{prefix}/dev-q{i}/telemetry"),
            &format!(r#"{{"ts":1763900000,"v":{i}}}"#),
            1,
        )
        .await;
    }
    let received = gateway
        .wait_for_metric(
            "ingest_gateway_mqtt_messages_total",
            &[],
            sentinels + 5.0,
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(received, sentinels + 5.0);
    // Held, not acknowledged, for as long as Kinesis is away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gateway.metric("ingest_gateway_mqtt_unacked", &[]), 5.0);
    assert_eq!(
        gateway.metric("ingest_gateway_mqtt_acked_total", &[]),
        acked
    );
    assert_eq!(gateway.metric("ingest_gateway_records_put_total", &[]), 0.0);

    proxy.restore().await;
    let records = read_stream(&source, 5, ARRIVE_WITHIN, SETTLE).await;
    let mut keys: Vec<String> = records.iter().map(|r| r.partition_key.clone()).collect();
    keys.sort();
    assert_eq!(keys, ["dev-q1", "dev-q2", "dev-q3", "dev-q4", "dev-q5"]);
    let now_acked = gateway
        .wait_for_metric(
            "ingest_gateway_mqtt_acked_total",
            &[],
            acked + 5.0,
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(now_acked, acked + 5.0);
    assert_eq!(gateway.metric("ingest_gateway_mqtt_unacked", &[]), 0.0);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_survive_a_gateway_crash_while_kinesis_is_down() {
    let (stream, source) = create_stream("gw-mqtt-crash", 1).await;
    let prefix = prefix("mqtt-crash");
    let client_id = format!("{prefix}-gw");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let mut first = bridge(&stream, &prefix, &client_id, &proxy.url_via(&kinesis), &[]).await;
    let sentinels = wait_until_subscribed(&first, &prefix).await;

    proxy.cut().await;
    for i in 1..=5 {
        mosquitto_pub(
            &format!("{prefix}/dev-c{i}/telemetry"),
            &format!(r#"{{"ts":1763900000,"v":{i}}}"#),
            1,
        )
        .await;
    }
    let received = first
        .wait_for_metric(
            "ingest_gateway_mqtt_messages_total",
            &[],
            sentinels + 5.0,
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(received, sentinels + 5.0);
    assert_eq!(first.metric("ingest_gateway_mqtt_unacked", &[]), 5.0);
    // A crash: nothing acknowledged, nothing put.
    first.kill();

    // The next gateway with the same client id gets the messages again from
    // the broker, and Kinesis is back.
    let second = bridge(&stream, &prefix, &client_id, &kinesis, &[]).await;
    let records = read_stream(&source, 5, ARRIVE_WITHIN, Duration::from_secs(3)).await;
    let mut keys: Vec<String> = records.iter().map(|r| r.partition_key.clone()).collect();
    keys.sort();
    assert_eq!(keys, ["dev-c1", "dev-c2", "dev-c3", "dev-c4", "dev-c5"]);
    assert!(second.metric("ingest_gateway_mqtt_acked_total", &[]) >= 5.0);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_gets_500_and_the_log_not_health_says_why() {
    let (stream, source) = create_stream("gw-deleted", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;
    source.delete_stream().await.unwrap();

    // Retrying cannot bring a stream back: 5.00 at once, not 5.03 later.
    let answer = peer
        .exchange(
            &post("/t/dev-gone", br#"{"ts":1763900000123,"v":1}"#, 1),
            ANSWER_WITHIN,
        )
        .await
        .expect("an answer");
    assert_eq!(code(&answer), "5.00", "{answer:?}");
    assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
    let health = peer
        .exchange(
            &request(MessageType::Confirmable, RequestType::Get, "/health", 2),
            ANSWER_WITHIN,
        )
        .await
        .expect("an answer");
    assert_eq!(code(&health), "5.03");
    // AWS's text (it can name the account and role) is logged, never sent.
    let reason = String::from_utf8_lossy(&health.payload);
    assert!(
        !reason.contains("not found") && reason.len() < 30,
        "{reason}"
    );
    let log = gateway.log_text();
    assert!(
        log.contains("Kinesis is not reachable") && log.contains("not found"),
        "{log}"
    );
    assert_eq!(
        gateway.metric("ingest_gateway_rejected_total", &[r#"reason="refused""#]),
        1.0
    );
}

/// Starts a replica of the bridge group `<prefix>`: like [`mqtt_gateway`],
/// with a shared subscription (`--mqtt-share-group`).
async fn mqtt_replica(
    stream: &str,
    prefix: &str,
    client_id: &str,
    kinesis: &str,
) -> GatewayProcess {
    let mqtt_url = std::env::var("INGEST_MQTT_URL").unwrap();
    GatewayProcess::start(
        stream,
        &[
            "--mqtt-url",
            &mqtt_url,
            "--mqtt-topic",
            &format!("{prefix}/#"),
            "--mqtt-layout",
            &format!("{prefix}/{{device}}/telemetry"),
            "--mqtt-client-id",
            client_id,
            "--mqtt-share-group",
            prefix,
        ],
        &[("AWS_ENDPOINT_URL_KINESIS", kinesis)],
    )
    .await
}

fn mqtt_received(gateway: &GatewayProcess) -> f64 {
    gateway.metric("ingest_gateway_mqtt_messages_total", &[])
}

/// Waits until the replicas together received `total` messages.
async fn wait_until_received(replicas: &[&GatewayProcess], total: f64) {
    let deadline = Instant::now() + ARRIVE_WITHIN;
    loop {
        let received: f64 = replicas.iter().map(|g| mqtt_received(g)).sum();
        if received >= total {
            assert_eq!(received, total, "more messages than were sent");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas received {received} of {total} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridge_replicas_split_the_messages_and_a_killed_ones_come_back() {
    let (stream, source) = create_stream("gw-mqtt-replicas", 2).await;
    let prefix = prefix("mqtt-replicas");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    // Replica 0 reaches Kinesis through a proxy that can be cut.
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let id = |n: u8| format!("{prefix}-{n}");
    let mut zero = mqtt_replica(&stream, &prefix, &id(0), &proxy.url_via(&kinesis)).await;
    let one = mqtt_replica(&stream, &prefix, &id(1), &kinesis).await;
    // Sentinels (no layout takes them) until each replica has had one: both
    // are subscribed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while mqtt_received(&zero) < 1.0 || mqtt_received(&one) < 1.0 {
        assert!(Instant::now() < deadline, "the replicas did not subscribe");
        mosquitto_pub(&format!("{prefix}/sentinel"), "x", 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sentinels = mqtt_received(&zero) + mqtt_received(&one);
    let (zero_before, one_before) = (mqtt_received(&zero), mqtt_received(&one));
    let publish = |i: u32| {
        let topic = format!("{prefix}/dev-r{i}/telemetry");
        async move { mosquitto_pub(&topic, &format!(r#"{{"ts":1763900000,"v":{i}}}"#), 1).await }
    };

    // Both up: each message goes to one of them, and both get some.
    for i in 1..=20 {
        publish(i).await;
    }
    wait_until_received(&[&zero, &one], sentinels + 20.0).await;
    assert!(mqtt_received(&zero) > zero_before, "replica 0 took none");
    assert!(mqtt_received(&one) > one_before, "replica 1 took none");
    read_stream(&source, 20, ARRIVE_WITHIN, Duration::ZERO).await;
    let acked = zero
        .wait_for_metric(
            "ingest_gateway_mqtt_acked_total",
            &[],
            mqtt_received(&zero),
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(acked, mqtt_received(&zero), "replica 0 acknowledged all");

    // Replica 0 loses Kinesis: its share waits unacknowledged; then it dies.
    proxy.cut().await;
    for i in 21..=40 {
        publish(i).await;
    }
    wait_until_received(&[&zero, &one], sentinels + 40.0).await;
    let held = zero.metric("ingest_gateway_mqtt_unacked", &[]);
    assert!(held > 0.0, "replica 0 holds none of the second 20");
    zero.kill();

    // Back under the same client id (and with Kinesis): the broker delivers
    // what it held. Every message is in the stream exactly once.
    let again = mqtt_replica(&stream, &prefix, &id(0), &kinesis).await;
    let records = read_stream(&source, 40, ARRIVE_WITHIN, Duration::from_secs(3)).await;
    let mut keys: Vec<String> = records.iter().map(|r| r.partition_key.clone()).collect();
    keys.sort();
    let mut expected: Vec<String> = (1..=40).map(|i| format!("dev-r{i}")).collect();
    expected.sort();
    assert_eq!(keys, expected);
    let redelivered = again
        .wait_for_metric("ingest_gateway_mqtt_acked_total", &[], held, ARRIVE_WITHIN)
        .await;
    assert!(redelivered >= held, "{redelivered} acked of {held} held");
    source.delete_stream().await.unwrap();
}

/// Starts a gateway bridging `<prefix>/{device}/telemetry` (a JSON object)
/// and `<prefix>/{house}/{device}/{name}/{ts}/data` (one value) as
/// `client_id`, through `kinesis`, with `extra` flags.
async fn bridge(
    stream: &str,
    prefix: &str,
    client_id: &str,
    kinesis: &str,
    extra: &[&str],
) -> GatewayProcess {
    let mqtt_url = std::env::var("INGEST_MQTT_URL").unwrap();
    let topic = format!("{prefix}/#");
    let object = format!("{prefix}/{{device}}/telemetry");
    let value = format!("{prefix}/{{house}}/{{device}}/{{name}}/{{ts}}/data");
    let mut args = vec![
        "--mqtt-url",
        &mqtt_url,
        "--mqtt-topic",
        &topic,
        "--mqtt-layout",
        &object,
        "--mqtt-layout",
        &value,
        "--mqtt-client-id",
        client_id,
    ];
    args.extend_from_slice(extra);
    GatewayProcess::start(stream, &args, &[("AWS_ENDPOINT_URL_KINESIS", kinesis)]).await
}

/// A device id of 300 characters: over Kinesis's 256 for a partition key.
fn poison_device() -> String {
    "d".repeat(300)
}

/// The partition keys of `records`, sorted.
fn sorted_keys(records: &[ingest::source::kinesis::Record]) -> Vec<String> {
    let mut keys: Vec<String> = records.iter().map(|r| r.partition_key.clone()).collect();
    keys.sort();
    keys
}

/// `<stem>1` to `<stem><n>`, sorted as strings.
fn numbered(stem: &str, n: u32) -> Vec<String> {
    let mut names: Vec<String> = (1..=n).map(|i| format!("{stem}{i}")).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_mqtt_message_is_dropped_and_counted_and_the_twenty_after_it_land() {
    let (stream, source) = create_stream("gw-mqtt-poison", 2).await;
    let prefix = prefix("mqtt-poison");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let gateway = bridge(&stream, &prefix, &format!("{prefix}-gw"), &kinesis, &[]).await;
    let sentinels = wait_until_subscribed(&gateway, &prefix).await;

    // A partition key Kinesis refuses, QoS 1.
    mosquitto_pub(
        &format!("{prefix}/{}/telemetry", poison_device()),
        r#"{"ts":1763900000,"v":0}"#,
        1,
    )
    .await;
    // 200,000 control characters (within the 256 KiB payload limit): each
    // becomes \u0001 in the record's JSON, 1.2 MB, over Kinesis's 1 MiB.
    let out = mosquitto_pub_with(
        &[
            "-q",
            "1",
            "-t",
            &format!("{prefix}/h1/dev-big/note/1763900000/data"),
            "-s",
        ],
        &[1u8; 200_000],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    for i in 1..=20 {
        mosquitto_pub(
            &format!("{prefix}/dev-p{i}/telemetry"),
            &format!(r#"{{"ts":1763900000,"v":{i}}}"#),
            1,
        )
        .await;
    }

    let records = read_stream(&source, 20, ARRIVE_WITHIN, SETTLE).await;
    assert_eq!(sorted_keys(&records), numbered("dev-p", 20));
    let rejected = |reason: &str| {
        gateway.metric(
            "ingest_gateway_rejected_total",
            &[r#"protocol="mqtt""#, &format!(r#"reason="{reason}""#)],
        )
    };
    assert_eq!(rejected("key_too_long"), 1.0);
    assert_eq!(rejected("record_too_large"), 1.0);
    // Every message is acknowledged, the two dropped ones too: none is
    // delivered again.
    let received = sentinels + 22.0;
    let acked = gateway
        .wait_for_metric(
            "ingest_gateway_mqtt_acked_total",
            &[],
            received,
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(acked, received, "{}", gateway.log_text());
    assert_eq!(gateway.metric("ingest_gateway_mqtt_unacked", &[]), 0.0);
    assert_eq!(
        gateway.metric("ingest_gateway_put_calls_total", &[r#"outcome="error""#]),
        0.0,
        "no call failed: the poison was never sent"
    );
    source.delete_stream().await.unwrap();
}

/// Sends `packet` and returns the response to it: piggybacked, or the
/// separate one after an empty ACK (acknowledged).
async fn response_to(peer: &CoapPeer, packet: &Packet) -> Packet {
    peer.send(packet).await;
    let first = peer.recv(ANSWER_WITHIN).await.expect("an answer");
    if first.header.code != MessageClass::Empty {
        return first;
    }
    let late = peer
        .recv(Duration::from_secs(30))
        .await
        .expect("a separate response after the empty ACK");
    peer.acknowledge(&late).await;
    late
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_with_a_poison_message_in_its_session_puts_everything_else() {
    let (stream, source) = create_stream("gw-mqtt-poison-restart", 2).await;
    let prefix = prefix("mqtt-poison-restart");
    let client_id = format!("{prefix}-gw");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let mut first = bridge(&stream, &prefix, &client_id, &kinesis, &[]).await;
    wait_until_subscribed(&first, &prefix).await;
    // Gone, its session (and subscription) kept by the broker, which queues
    // the poison first, then twenty good messages.
    first.kill();
    mosquitto_pub(
        &format!("{prefix}/{}/telemetry", poison_device()),
        r#"{"ts":1763900000,"v":0}"#,
        1,
    )
    .await;
    for i in 1..=20 {
        mosquitto_pub(
            &format!("{prefix}/dev-s{i}/telemetry"),
            &format!(r#"{{"ts":1763900000,"v":{i}}}"#),
            1,
        )
        .await;
    }

    // The next gateway of the session gets the poison first; CoAP requests
    // share its calls.
    let second = bridge(&stream, &prefix, &client_id, &kinesis, &[]).await;
    let peer = CoapPeer::new(second.coap).await;
    for i in 1..=20u16 {
        let packet = post(
            &format!("/t/coap-{i}"),
            format!(r#"{{"ts":1763900000,"v":{i}}}"#).as_bytes(),
            i,
        );
        let answer = response_to(&peer, &packet).await;
        assert_eq!(code(&answer), "2.04", "request {i}: {answer:?}");
    }
    let records = read_stream(&source, 40, ARRIVE_WITHIN, SETTLE).await;
    let mut expected = numbered("dev-s", 20);
    expected.extend(numbered("coap-", 20));
    expected.sort();
    assert_eq!(sorted_keys(&records), expected);
    assert_eq!(
        second.metric(
            "ingest_gateway_rejected_total",
            &[r#"protocol="mqtt""#, r#"reason="key_too_long""#]
        ),
        1.0
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_brokers_size_limit_never_reaches_the_bridge() {
    let (stream, source) = create_stream("gw-mqtt-size-limit", 1).await;
    let prefix = prefix("mqtt-size-limit");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let gateway = bridge(&stream, &prefix, &format!("{prefix}-gw"), &kinesis, &[]).await;
    let sentinels = wait_until_subscribed(&gateway, &prefix).await;
    // 300 KiB: over the stack's message_size_limit (256 KiB, the bridge's
    // payload limit). The broker refuses it at publish; the bridge, which
    // reads packets only up to its limit, never sees it.
    let huge = format!(r#"{{"ts":1763900000,"pad":"{}"}}"#, "x".repeat(300 * 1024));
    let topic = format!("{prefix}/dev-huge/telemetry");
    mosquitto_pub_with(&["-q", "1", "-t", &topic, "-s"], huge.as_bytes()).await;
    mosquitto_pub(
        &format!("{prefix}/dev-after/telemetry"),
        r#"{"ts":1763900000,"v":1}"#,
        1,
    )
    .await;
    let records = read_stream(&source, 1, ARRIVE_WITHIN, SETTLE).await;
    assert_eq!(sorted_keys(&records), ["dev-after"]);
    assert_eq!(
        gateway.metric("ingest_gateway_mqtt_messages_total", &[]),
        sentinels + 1.0
    );
    assert_eq!(
        gateway.metric("ingest_gateway_mqtt_connection_errors_total", &[]),
        0.0
    );
    source.delete_stream().await.unwrap();
}

/// The smallest `--queue-bytes`: 2 MiB.
const SMALL_QUEUE_BYTES: &str = "2097152";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_holds_the_bridge_back_without_losing_a_qos1_message_or_an_ack() {
    let (stream, source) = create_stream("gw-mqtt-backpressure", 2).await;
    let prefix = prefix("mqtt-backpressure");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let gateway = bridge(
        &stream,
        &prefix,
        &format!("{prefix}-gw"),
        &proxy.url_via(&kinesis),
        &["--queue-bytes", SMALL_QUEUE_BYTES],
    )
    .await;
    let sentinels = wait_until_subscribed(&gateway, &prefix).await;
    let acked = gateway.metric("ingest_gateway_mqtt_acked_total", &[]);

    proxy.cut().await;
    // 400 QoS 1 messages of 20 KB, 8 MB: the queue takes 2 MiB of them, the
    // forwarder's handover 256, and the event loop holds the rest.
    let count = 400;
    let lines: String = (1..=count)
        .map(|i| {
            format!(
                "{{\"ts\":1763900000,\"v\":{i},\"pad\":\"{}\"}}\n",
                "x".repeat(20_000)
            )
        })
        .collect();
    let topic = format!("{prefix}/dev-bp/telemetry");
    let out = mosquitto_pub_with(&["-q", "1", "-t", &topic, "-l"], lines.as_bytes()).await;
    assert!(out.status.success(), "{out:?}");
    let received = gateway
        .wait_for_metric(
            "ingest_gateway_mqtt_messages_total",
            &[],
            sentinels + f64::from(count),
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(received, sentinels + f64::from(count));
    let held = gateway
        .wait_for_metric("ingest_gateway_mqtt_held", &[], 1.0, ARRIVE_WITHIN)
        .await;
    assert!(held >= 1.0, "the event loop holds none");
    // The gauge is set when the producer's loop turns (a call ends, a
    // record comes), so at one instant it may lag the bytes held (the
    // calls retry with backoff while Kinesis is away): wait for it.
    let queued = gateway
        .wait_for_metric(
            "ingest_gateway_queue_bytes",
            &[],
            1_000_001.0,
            ARRIVE_WITHIN,
        )
        .await;
    assert!(
        queued > 1_000_000.0 && queued <= 2_097_152.0,
        "{queued} bytes queued, limit 2097152"
    );
    // QoS 0 finds the bridge full: dropped and counted, as QoS 0 allows.
    for i in 1..=5 {
        mosquitto_pub(
            &format!("{prefix}/dev-q0-{i}/telemetry"),
            r#"{"ts":1763900000,"v":0}"#,
            0,
        )
        .await;
    }
    let dropped = gateway
        .wait_for_metric(
            "ingest_gateway_rejected_total",
            &[r#"protocol="mqtt""#, r#"reason="overloaded""#],
            5.0,
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(dropped, 5.0);
    assert_eq!(
        gateway.metric("ingest_gateway_mqtt_acked_total", &[]),
        acked
    );

    // Kinesis back: every QoS 1 message lands once and is acknowledged.
    proxy.restore().await;
    let records = read_stream(&source, count as usize, ARRIVE_WITHIN, SETTLE).await;
    let mut values: Vec<u32> = records
        .iter()
        .map(|record| json(&text(record))["v"].as_u64().unwrap() as u32)
        .collect();
    values.sort();
    assert_eq!(values, (1..=count).collect::<Vec<_>>());
    let now_acked = gateway
        .wait_for_metric(
            "ingest_gateway_mqtt_acked_total",
            &[],
            acked + f64::from(count),
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(now_acked, acked + f64::from(count));
    assert_eq!(gateway.metric("ingest_gateway_mqtt_held", &[]), 0.0);
    assert_eq!(gateway.metric("ingest_gateway_mqtt_unacked", &[]), 0.0);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_gets_503_once_the_queue_is_full_in_bytes_not_records() {
    let (stream, source) = create_stream("gw-queue-bytes", 1).await;
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let gateway = GatewayProcess::start(
        &stream,
        &["--queue-bytes", SMALL_QUEUE_BYTES, "--put-timeout", "60s"],
        &[("AWS_ENDPOINT_URL_KINESIS", &proxy.url_via(&kinesis))],
    )
    .await;
    let peer = CoapPeer::new(gateway.coap).await;
    proxy.cut().await;

    // 200 requests of 16,000 bytes (3.2 MB), far below the 50,000 records
    // of --queue-records: some are queued, the rest get 5.03 at once.
    let count: u16 = 200;
    for id in 1..=count {
        peer.send(&post(
            "/t/dev-bytes",
            padded_json(usize::from(id), 16_000).as_bytes(),
            id,
        ))
        .await;
        // Paced, so that the gateway's receive buffer never overflows.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut refused = std::collections::BTreeSet::new();
    let mut queued = std::collections::BTreeSet::new();
    while refused.len() + queued.len() < usize::from(count) {
        let answer = peer
            .recv(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{} refused, {} queued", refused.len(), queued.len()));
        assert_eq!(answer.header.get_type(), MessageType::Acknowledgement);
        let id = answer.header.message_id;
        if answer.header.code == MessageClass::Empty {
            queued.insert(id);
        } else {
            assert_eq!(code(&answer), "5.03", "{answer:?}");
            assert_eq!(answer.get_first_option(CoapOption::MaxAge), Some(&vec![1]));
            refused.insert(id);
        }
    }
    assert!(
        !refused.is_empty(),
        "nothing refused: the queue has no byte limit"
    );
    let queued_bytes = gateway.metric("ingest_gateway_queue_bytes", &[]);
    assert!(
        queued_bytes <= 2_097_152.0 && queued.len() * 16_000 <= 2_097_152,
        "{} queued, {queued_bytes} bytes",
        queued.len()
    );
    assert_eq!(
        gateway.metric("ingest_gateway_rejected_total", &[r#"reason="overloaded""#]),
        refused.len() as f64
    );

    // Kinesis back: each queued request gets its 2.04, separately.
    proxy.restore().await;
    let mut stored = std::collections::BTreeSet::new();
    while stored.len() < queued.len() {
        let late = peer
            .recv(ARRIVE_WITHIN)
            .await
            .unwrap_or_else(|| panic!("{} of {} answered 2.04", stored.len(), queued.len()));
        assert_eq!(late.header.get_type(), MessageType::Confirmable);
        assert_eq!(code(&late), "2.04", "{late:?}");
        peer.acknowledge(&late).await;
        let id = u16::from_be_bytes(late.get_token().try_into().unwrap());
        stored.insert(id);
    }
    assert_eq!(stored, queued);
    let records = read_stream(&source, queued.len(), ARRIVE_WITHIN, SETTLE).await;
    let mut values: Vec<u16> = records
        .iter()
        .map(|record| json(&text(record))["v"].as_u64().unwrap() as u16)
        .collect();
    values.sort();
    assert_eq!(values, queued.into_iter().collect::<Vec<_>>());
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_responses_beyond_the_bound_are_sent_once_and_counted() {
    let (stream, source) = create_stream("gw-separate-bound", 1).await;
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let gateway = GatewayProcess::start(
        &stream,
        &["--max-separate-responses", "2", "--put-timeout", "2s"],
        &[("AWS_ENDPOINT_URL_KINESIS", &proxy.url_via(&kinesis))],
    )
    .await;
    // A peer that never acknowledges (a spoofed source would not).
    let peer = CoapPeer::new(gateway.coap).await;
    proxy.cut().await;
    let count: u16 = 5;
    for id in 1..=count {
        peer.send(&post("/t/dev-sep", br#"{"ts":1763900000,"v":1}"#, id))
            .await;
    }
    // Each: an empty ACK, then its 5.03 as a confirmable message of its own.
    let mut separate: std::collections::HashMap<Vec<u8>, u32> = Default::default();
    let mut empty = 0;
    while empty < count || separate.len() < usize::from(count) {
        let message = peer
            .recv(Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("{empty} empty ACKs, separate: {separate:?}"));
        if message.header.code == MessageClass::Empty {
            empty += 1;
        } else {
            assert_eq!(message.header.get_type(), MessageType::Confirmable);
            assert_eq!(code(&message), "5.03");
            *separate.entry(message.get_token().to_vec()).or_default() += 1;
        }
    }
    let total = gateway
        .wait_for_metric(
            "ingest_gateway_coap_separate_responses_total",
            &[],
            5.0,
            ARRIVE_WITHIN,
        )
        .await;
    assert_eq!(total, 5.0);
    // Two are resent until acknowledged (~93 s for a peer that never
    // does); three were sent once and are not tracked.
    assert_eq!(
        gateway.metric("ingest_gateway_coap_separate_responses_pending", &[]),
        2.0
    );
    assert_eq!(
        gateway.metric(
            "ingest_gateway_coap_separate_responses_untracked_total",
            &[]
        ),
        3.0
    );
    // Until a pause longer than ACK_TIMEOUT x 1.5 (the resends' intervals
    // double: 2 to 3 s, then 4 to 6 s, then 8 to 12 s): resends of those
    // two only.
    while let Some(message) = peer.recv(Duration::from_secs(7)).await {
        *separate.entry(message.get_token().to_vec()).or_default() += 1;
    }
    let resent = separate.values().filter(|&&n| n > 1).count();
    assert_eq!(resent, 2, "{separate:?}");
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_message_id_with_a_new_token_is_a_new_request() {
    let (stream, source) = create_stream("gw-reused-id", 1).await;
    let gateway = GatewayProcess::start(&stream, &[], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;
    let mut first = post("/t/dev-reboot", br#"{"ts":1763900000,"v":1}"#, 7);
    first.set_token(vec![0xa1, 0xa2]);
    let answer = response_to(&peer, &first).await;
    assert_eq!(
        (code(&answer), answer.get_token()),
        ("2.04".into(), &[0xa1, 0xa2][..])
    );
    // A retransmission (same id, same token) is answered alike, not put.
    let again = response_to(&peer, &first).await;
    assert_eq!(
        (code(&again), again.get_token()),
        ("2.04".into(), &[0xa1, 0xa2][..])
    );

    // The device reboots and counts its message ids from the same start:
    // same endpoint, same id, another token and other data.
    let mut rebooted = post("/t/dev-reboot", br#"{"ts":1763900001,"v":2}"#, 7);
    rebooted.set_token(vec![0xb1]);
    let answer = response_to(&peer, &rebooted).await;
    assert_eq!(
        (code(&answer), answer.get_token()),
        ("2.04".into(), &[0xb1][..])
    );

    let records = read_stream(&source, 2, ARRIVE_WITHIN, SETTLE).await;
    let mut values: Vec<i64> = records
        .iter()
        .map(|record| json(&text(record))["v"].as_i64().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, [1, 2]);
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_after_an_outage_is_held_within_bounds_and_every_message_lands() {
    let (stream, source) = create_stream("gw-mqtt-backlog", 1).await;
    let prefix = prefix("mqtt-backlog");
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap();
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let gateway = bridge(
        &stream,
        &prefix,
        &format!("{prefix}-gw"),
        &proxy.url_via(&kinesis),
        &[],
    )
    .await;
    let sentinels = wait_until_subscribed(&gateway, &prefix).await;
    let acked = gateway.metric("ingest_gateway_mqtt_acked_total", &[]);

    // 30,000 QoS 1 messages queue up in the broker while Kinesis is away;
    // when it is back, the broker sends them as fast as acknowledgements
    // go out (Mosquitto 2.0 past its max_inflight_messages).
    proxy.cut().await;
    let count = 30_000u32;
    let lines: String = (1..=count)
        .map(|i| format!("{{\"ts\":1763900000,\"v\":{i}}}\n"))
        .collect();
    let topic = format!("{prefix}/dev-backlog/telemetry");
    let out = mosquitto_pub_with(&["-q", "1", "-t", &topic, "-l"], lines.as_bytes()).await;
    assert!(out.status.success(), "{out:?}");
    proxy.restore().await;

    // The event loop never holds more than its bound (10,000 messages).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut most_held: f64 = 0.0;
    loop {
        most_held = most_held.max(gateway.metric("ingest_gateway_mqtt_held", &[]));
        let now_acked = gateway.metric("ingest_gateway_mqtt_acked_total", &[]);
        if now_acked >= acked + f64::from(count) {
            assert_eq!(now_acked, acked + f64::from(count));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} acknowledged; deferred {}",
            now_acked - acked,
            gateway.metric("ingest_gateway_mqtt_deferred_total", &[])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        most_held <= 10_000.0,
        "the bridge held {most_held} messages"
    );
    let records = read_stream(&source, count as usize, ARRIVE_WITHIN, SETTLE).await;
    let mut values: Vec<u32> = records
        .iter()
        .map(|record| json(&text(record))["v"].as_u64().unwrap() as u32)
        .collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), count as usize, "every message, none lost");
    assert!(
        gateway.metric("ingest_gateway_mqtt_messages_total", &[]) >= sentinels + f64::from(count)
    );
    source.delete_stream().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_does_not_push_out_an_exchange_a_client_retransmits() {
    let (stream, source) = create_stream("gw-exchange-flood", 1).await;
    // A small cache: 100 exchanges.
    let gateway = GatewayProcess::start(&stream, &["--exchange-capacity", "100"], &[]).await;
    let peer = CoapPeer::new(gateway.coap).await;
    let telemetry = post("/t/dev-flood", br#"{"ts":1763900000,"v":1}"#, 1);
    let answer = response_to(&peer, &telemetry).await;
    assert_eq!(code(&answer), "2.04");

    // 1,000 four-byte datagrams (a CON GET of no path: 4.04), as a flood
    // from spoofed sources would send; each is answered, none remembered.
    let flood = CoapPeer::new(gateway.coap).await;
    for id in 2..1_002u16 {
        let [high, low] = id.to_be_bytes();
        flood.send_bytes(&[0x40, 0x01, high, low]).await;
        let answer = flood.recv(ANSWER_WITHIN).await.expect("an answer");
        assert_eq!(code(&answer), "4.04");
    }

    // The client retransmits its request: recognised, answered alike, not
    // put again.
    let again = response_to(&peer, &telemetry).await;
    assert_eq!(code(&again), "2.04");
    let records = read_stream(&source, 1, ARRIVE_WITHIN, SETTLE).await;
    assert_eq!(records.len(), 1, "put twice");
    assert_eq!(
        gateway.metric("ingest_gateway_coap_duplicates_total", &[]),
        1.0
    );
    source.delete_stream().await.unwrap();
}
