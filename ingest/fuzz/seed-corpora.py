#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (corpus/<target>/seed-*): the
decoder's contract test records (src/decode/tests/contract.rs), payloads
shaped like the devices' (loadgen's meters, batteries, chargers), and for the
protocol targets valid CoAP datagrams, CBOR items, MQTT topics and KPL
aggregates built here by hand from their specifications. Run again after
changing it; the fuzzers add their own finds beside these."""

import hashlib
import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CONTRACT = os.path.join(HERE, "..", "src", "decode", "tests", "contract.rs")

DEVICE_PAYLOADS = [
    b'{"device":"egauge-000001","house":"h0001","ts":1763900000123,"fields":{"Grid":1.234,"Solar":-0.51,"Battery":0.2,"EV":7.2}}',
    b'{"device":"bms-17","ts":"2025-11-23T12:13:20.123Z","soc":81.5,"temp":[21.5,22.0],"state":"charging","fault":null}',
    b'{"device":"charger-9","house":"h12","ts":1763900000,"fields":{"session":{"id":"s-1","kwh":12.5},"plugged":true}}',
    b'{"Battery":1.5,"EV":-3,"ts":1763900000,"device":"thermostat-4"}',
]


def contract_records():
    text = open(CONTRACT, encoding="utf-8").read()
    for raw in re.findall(r'r#"(\{.*?)"#', text):
        if raw.count("{") >= 1 and '"device"' in raw:
            yield raw.encode()


def write(target, items):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    for item in items:
        name = "seed-" + hashlib.sha1(item).hexdigest()[:16]
        with open(os.path.join(folder, name), "wb") as f:
            f.write(item)


def coap_option(number, previous, value):
    def nibble(n):
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes([n - 13])
        return 14, struct.pack(">H", n - 269)

    delta, delta_ext = nibble(number - previous)
    length, length_ext = nibble(len(value))
    return bytes([(delta << 4) | length]) + delta_ext + length_ext + value


def coap(code, mid, token, options, payload=b"", confirmable=True):
    out = bytes([0x40 | (0 if confirmable else 0x10) | len(token), code]) + struct.pack(">H", mid) + token
    previous = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        out += coap_option(number, previous, value)
        previous = number
    if payload:
        out += b"\xff" + payload
    return out


def framed(*datagrams):
    return b"".join(struct.pack(">H", len(d)) + d for d in datagrams)


def uri(path):
    return [(11, part.encode()) for part in path.split("/")]


def coap_seeds():
    post, get = 0x02, 0x01
    json_format = (12, bytes([50]))
    cbor_format = (12, bytes([60]))
    body = DEVICE_PAYLOADS[0]
    yield b"\x00" + framed(coap(post, 1, b"ab", uri("t/h0001/egauge-000001") + [json_format], body))
    yield b"\x00" + framed(coap(post, 2, b"", uri("t/d") + [cbor_format], bytes.fromhex("a2626869f5617801")))
    yield b"\x00" + framed(coap(get, 3, b"x", uri(".well-known/core")), coap(get, 4, b"y", uri("health")))
    # A block-wise upload in two 16-byte blocks (Block1 = 27, SZX 0).
    whole = b'{"x":1,"y":2.5,"z":"a long enough value"}'
    blocks = [whole[i:i + 16] for i in range(0, len(whole), 16)]
    datagrams = []
    for num, part in enumerate(blocks):
        more = 1 if num < len(blocks) - 1 else 0
        block = bytes([(num << 4) | (more << 3)])
        datagrams.append(coap(post, 10 + num, b"k", uri("t/d") + [(27, block)], part))
    yield b"\x00" + framed(*datagrams)
    # Signed, against the fuzz target's key ("h", "d"): a bad signature.
    query = [(15, b"t=1763900000"), (15, b"n=abc"), (15, b"s=" + b"0f" * 32)]
    yield b"\x03" + framed(coap(post, 20, b"s", uri("t/h/d") + query, b'{"x":1}'))


def cbor_seeds():
    yield bytes.fromhex("a266646576696365616466416261747466fb3ff8000000000000")  # {"device":"d","Batt":1.5}
    yield bytes.fromhex("a3626964182a6174c11a6923a3c061769f01f93e00f4f6ff")
    yield bytes.fromhex("c074323032352d31312d32335431323a31333a32305a")  # tag 0, RFC 3339
    yield bytes.fromhex("1bffffffffffffffff")
    yield bytes.fromhex("3bffffffffffffffff")
    yield bytes.fromhex("fa7fc00000")  # NaN: refused


def mqtt_seeds():
    layouts = ["devices/{device}/telemetry", "+/{house}/{device}/{name}/{ts}/data|event"]
    yield layouts[0].encode() + b"\0devices/meter-1/telemetry\0" + DEVICE_PAYLOADS[0]
    yield layouts[1].encode() + b"\0site/h1/meter-1/power/1763900000/data\0" + b"21.5"
    yield layouts[1].encode() + b"\0site/h1/meter-1/state/2025-11-23T12:13:20Z/event\0" + b"on"
    yield layouts[1].encode() + b'\0x/h1/d/cfg/1763900000/event\0{"a":[1,2]}'


def varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def kpl_aggregate(records):
    """The KPL's documented format: magic, AggregatedRecord protobuf, MD5."""
    keys = []
    body = b""
    for key, data in records:
        if key not in keys:
            keys.append(key)
        record = varint(1 << 3) + varint(keys.index(key)) + field(3, data)
        body += field(3, record)
    message = b"".join(field(1, key.encode()) for key in keys) + body
    return b"\xf3\x89\x9a\xc2" + message + hashlib.md5(message).digest()


def kpl_seeds():
    yield kpl_aggregate([("meter-1", DEVICE_PAYLOADS[0]), ("meter-2", DEVICE_PAYLOADS[3]), ("meter-1", b"{}")])
    yield kpl_aggregate([("k", b"")])
    yield DEVICE_PAYLOADS[1]


records = list(contract_records()) + DEVICE_PAYLOADS
write("decode", records)
write("decode_differential", records)
write("copy_roundtrip", records + [b"\xff".join(records[:8]), b"\xff".join(DEVICE_PAYLOADS)])
write("coap_message", list(coap_seeds()))
write("cbor", list(cbor_seeds()))
write("mqtt_topic", list(mqtt_seeds()))
write("kpl", list(kpl_seeds()))
