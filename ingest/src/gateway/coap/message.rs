//! CoAP messages (RFC 7252) as the gateway reads and writes them, on top of
//! coap-lite's [`Packet`]: a request's options read once into a
//! [`Request`], and the datagrams of the answers (piggybacked ACK, separate
//! or non-confirmable response, empty ACK, reset). No IO.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use super::block::Block;

/// Content-Format of JSON (`application/json`).
pub const FORMAT_JSON: u16 = 50;
/// Content-Format of CBOR (`application/cbor`).
pub const FORMAT_CBOR: u16 = 60;
/// Content-Format of link-format (`application/link-format`).
pub const FORMAT_LINK: u16 = 40;
/// Content-Format of plain text.
pub const FORMAT_TEXT: u16 = 0;

/// The options the gateway understands; every other critical option (odd
/// number) makes a request fail with 4.02, as RFC 7252 §5.4.1 requires.
const URI_HOST: u16 = 3;
const OBSERVE: u16 = 6;
const URI_PORT: u16 = 7;
const URI_PATH: u16 = 11;
const CONTENT_FORMAT: u16 = 12;
const URI_QUERY: u16 = 15;
const ACCEPT: u16 = 17;
const BLOCK2: u16 = 23;
const BLOCK1: u16 = 27;
const SIZE2: u16 = 28;
const SIZE1: u16 = 60;
const NO_RESPONSE: u16 = 258;

/// A request, its options read.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// CON (true) or NON.
    pub confirmable: bool,
    /// The message id: with the endpoint, what identifies retransmissions.
    pub message_id: u16,
    /// The token every response must echo.
    pub token: Vec<u8>,
    /// The method; `None` for a request code RFC 7252 does not define.
    pub method: Option<RequestType>,
    /// The Uri-Path segments.
    pub path: Vec<String>,
    /// The Uri-Query parameters, each `name=value` or `name`.
    pub query: Vec<String>,
    /// The Content-Format, if given (one longer than 2 bytes is ignored,
    /// as an elective option in the wrong format must be).
    pub content_format: Option<u16>,
    /// The Accept option: the Content-Format the answer must have.
    pub accept: Option<u16>,
    /// The Block1 option: this payload is one block of a larger one.
    pub block1: Option<Block>,
    /// The Size1 option: the size of the whole payload, if the client says.
    pub size1: Option<u32>,
    /// The No-Response option (RFC 7967): bit 2 suppresses 2.xx, bit 8
    /// 4.xx, bit 16 5.xx.
    pub no_response: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A request the gateway cannot read: answered with this code and text.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// 4.00 or 4.02.
    pub code: ResponseType,
    /// Why, for the diagnostic payload.
    pub reason: String,
}

impl Request {
    /// Reads a request packet's options. The packet must be a request.
    pub fn from_packet(packet: Packet) -> Result<Request, Unreadable> {
        let method = match packet.header.code {
            MessageClass::Request(RequestType::UnKnown) => None,
            MessageClass::Request(method) => Some(method),
            // Reserved method codes (0.08 to 0.31) and anything else.
            _ => None,
        };
        let mut request = Request {
            confirmable: packet.header.get_type() == MessageType::Confirmable,
            message_id: packet.header.message_id,
            token: packet.get_token().to_vec(),
            method,
            path: Vec::new(),
            query: Vec::new(),
            content_format: None,
            accept: None,
            block1: None,
            size1: None,
            no_response: 0,
            payload: Vec::new(),
        };
        for (&number, values) in packet.options() {
            match number {
                URI_PATH | URI_QUERY => {
                    for value in values {
                        let text = String::from_utf8(value.clone()).map_err(|_| Unreadable {
                            code: ResponseType::BadRequest,
                            reason: "a Uri-Path or Uri-Query option is not UTF-8".into(),
                        })?;
                        if number == URI_PATH {
                            request.path.push(text);
                        } else {
                            request.query.push(text);
                        }
                    }
                }
                // Elective: a value that is not a 2-byte uint is ignored.
                CONTENT_FORMAT => request.content_format = values.front().and_then(|v| uint16(v)),
                // Critical: the answer must be in this format, or 4.06.
                ACCEPT => {
                    let value = values.front().map(Vec::as_slice).unwrap_or_default();
                    request.accept = Some(
                        uint16(value).ok_or_else(|| bad_option("Accept is longer than 2 bytes"))?,
                    );
                }
                BLOCK1 => {
                    let value = values.front().map(Vec::as_slice).unwrap_or_default();
                    request.block1 = Some(
                        Block::parse(value)
                            .ok_or_else(|| bad_option("Block1 is longer than 3 bytes"))?,
                    );
                }
                SIZE1 => request.size1 = values.front().and_then(|v| uint(v)),
                NO_RESPONSE => {
                    let value = values.front().map(Vec::as_slice).unwrap_or_default();
                    request.no_response = uint(value).unwrap_or(0);
                }
                // Understood, and nothing to do with them here.
                URI_HOST | URI_PORT | OBSERVE | BLOCK2 | SIZE2 => {}
                critical if critical % 2 == 1 => {
                    return Err(bad_option(&format!(
                        "critical option {critical} is not supported"
                    )));
                }
                _elective => {}
            }
        }
        request.payload = packet.payload;
        Ok(request)
    }

    /// The value of the query parameter `name` (`name=value`).
    pub fn query_value(&self, name: &str) -> Option<&str> {
        self.query.iter().find_map(|parameter| {
            parameter
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}

/// Whether a No-Response option value suppresses responses with `code`.
pub fn suppresses(no_response: u32, code: ResponseType) -> bool {
    let class = u8::from(MessageClass::Response(code)) >> 5;
    let bit = match class {
        2 => 2,
        4 => 8,
        5 => 16,
        _ => 0,
    };
    no_response & bit != 0
}

fn bad_option(reason: &str) -> Unreadable {
    Unreadable {
        code: ResponseType::BadOption,
        reason: reason.to_owned(),
    }
}

/// An option value as a 16-bit unsigned integer (0 to 2 bytes).
fn uint16(value: &[u8]) -> Option<u16> {
    uint(value).and_then(|v| u16::try_from(v).ok())
}

/// Whether `bytes`, read as `packet`, end in a payload marker with no
/// payload after it: a message format error (RFC 7252 §3) that coap-lite
/// reads as no payload. Counts what the header, token and options take.
pub fn bare_payload_marker(bytes: &[u8], packet: &Packet) -> bool {
    if !packet.payload.is_empty() {
        return false;
    }
    // An option's delta and length take 0, 1 or 2 extended bytes.
    let extended = |n: usize| match n {
        0..=12 => 0,
        13..=268 => 1,
        _ => 2,
    };
    let mut length = 4 + packet.get_token().len();
    let mut previous = 0;
    for (&number, values) in packet.options() {
        for value in values {
            length += 1 + extended(usize::from(number - previous)) + extended(value.len());
            length += value.len();
            previous = number;
        }
    }
    bytes.len() == length + 1
}

/// An option value as an unsigned integer (big-endian, 0 to 4 bytes).
fn uint(value: &[u8]) -> Option<u32> {
    if value.len() > 4 {
        return None;
    }
    Some(value.iter().fold(0, |acc, &b| (acc << 8) | u32::from(b)))
}

/// An answer, before it becomes a datagram.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The response code.
    pub code: ResponseType,
    /// The payload: a diagnostic text for errors, content for GETs.
    pub payload: Vec<u8>,
    /// Content-Format, for content (never for diagnostics, RFC 7252 §5.5.2).
    pub content_format: Option<u16>,
    /// Max-Age in seconds: for 5.03, when to try again.
    pub max_age: Option<u32>,
    /// Size1: with 4.13, the largest payload accepted.
    pub size1: Option<u32>,
    /// Block1: with 2.31, the block taken; with the last block's answer,
    /// that block; with 4.13, the block size to use.
    pub block1: Option<Block>,
}

impl Reply {
    /// A response with no payload.
    pub fn empty(code: ResponseType) -> Self {
        Reply {
            code,
            payload: Vec::new(),
            content_format: None,
            max_age: None,
            size1: None,
            block1: None,
        }
    }

    /// An error response with a diagnostic text.
    pub fn error(code: ResponseType, reason: impl Into<String>) -> Self {
        let mut reason: String = reason.into();
        // Short enough for one datagram with room to spare.
        if reason.len() > 512 {
            let mut cut = 512;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Reply {
            payload: reason.into_bytes(),
            ..Reply::empty(code)
        }
    }

    /// The code as CoAP writes it, e.g. `2.04`: the metric label.
    pub fn code_text(&self) -> String {
        MessageClass::Response(self.code).to_string()
    }

    /// The datagram of this reply to `request` as `kind` (ACK when
    /// piggybacked, CON or NON when separate) with `message_id`.
    pub fn encode(&self, kind: MessageType, message_id: u16, token: &[u8]) -> Vec<u8> {
        let mut packet = Packet::new();
        packet.header.set_version(1);
        packet.header.set_type(kind);
        packet.header.code = MessageClass::Response(self.code);
        packet.header.message_id = message_id;
        packet.set_token(token.to_vec());
        if let Some(format) = self.content_format {
            packet.add_option(CoapOption::ContentFormat, encode_uint(u32::from(format)));
        }
        if let Some(max_age) = self.max_age {
            packet.add_option(CoapOption::MaxAge, encode_uint(max_age));
        }
        if let Some(block1) = self.block1 {
            packet.add_option(CoapOption::Block1, block1.encode());
        }
        if let Some(size1) = self.size1 {
            packet.add_option(CoapOption::Size1, encode_uint(size1));
        }
        packet.payload = self.payload.clone();
        // Our replies are small: well under any datagram limit.
        packet.to_bytes_unlimited().unwrap_or_default()
    }
}

/// An empty ACK: "got it, the answer follows separately".
pub fn empty_ack(message_id: u16) -> Vec<u8> {
    empty(MessageType::Acknowledgement, message_id)
}

/// A reset: "I cannot process this message" (also the answer to a ping).
pub fn reset(message_id: u16) -> Vec<u8> {
    empty(MessageType::Reset, message_id)
}

fn empty(kind: MessageType, message_id: u16) -> Vec<u8> {
    let kind: u8 = match kind {
        MessageType::Confirmable => 0,
        MessageType::NonConfirmable => 1,
        MessageType::Acknowledgement => 2,
        MessageType::Reset => 3,
    };
    let [high, low] = message_id.to_be_bytes();
    vec![0x40 | (kind << 4), 0x00, high, low]
}

/// An option's unsigned integer value in the fewest bytes (0 is empty).
fn encode_uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    bytes[skip..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(build: impl FnOnce(&mut Packet)) -> Result<Request, Unreadable> {
        let mut packet = Packet::new();
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(RequestType::Post);
        packet.header.message_id = 7;
        packet.set_token(vec![1, 2]);
        build(&mut packet);
        let bytes = packet.to_bytes().unwrap();
        Request::from_packet(Packet::from_bytes(&bytes).unwrap())
    }

    #[test]
    fn reads_path_query_format_and_payload() {
        let request = request(|p| {
            for segment in ["t", "h1", "d1"] {
                p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
            }
            p.add_option(CoapOption::UriQuery, b"sig=00ff".to_vec());
            p.add_option(CoapOption::ContentFormat, vec![60]);
            p.add_option(CoapOption::NoResponse, vec![2]);
            p.payload = b"{}".to_vec();
        })
        .unwrap();
        assert_eq!(request.path, ["t", "h1", "d1"]);
        assert_eq!(request.query_value("sig"), Some("00ff"));
        assert_eq!(request.query_value("si"), None);
        assert_eq!(request.content_format, Some(FORMAT_CBOR));
        assert_eq!(request.payload, b"{}");
        assert_eq!(
            (request.message_id, request.token.as_slice()),
            (7, &[1u8, 2][..])
        );
        assert!(request.confirmable);
        assert!(suppresses(request.no_response, ResponseType::Changed));
        assert!(!suppresses(request.no_response, ResponseType::BadRequest));
    }

    #[test]
    fn unknown_critical_options_are_bad_options() {
        let err = request(|p| p.add_option(CoapOption::IfMatch, vec![1])).unwrap_err();
        assert_eq!(err.code, ResponseType::BadOption);
        // Elective options are ignored.
        assert!(request(|p| p.add_option(CoapOption::Unknown(2048), vec![1])).is_ok());
        // An elective option in the wrong format is ignored; a critical one
        // is a bad option.
        let ignored = request(|p| p.add_option(CoapOption::ContentFormat, vec![1, 2, 3])).unwrap();
        assert_eq!(ignored.content_format, None);
        let err = request(|p| p.add_option(CoapOption::Accept, vec![1, 2, 3])).unwrap_err();
        assert_eq!(err.code, ResponseType::BadOption);
        let err = request(|p| p.add_option(CoapOption::Block1, vec![1, 2, 3, 4])).unwrap_err();
        assert_eq!(err.code, ResponseType::BadOption);
        let err = request(|p| p.add_option(CoapOption::UriPath, vec![0xff])).unwrap_err();
        assert_eq!(err.code, ResponseType::BadRequest);
    }

    #[test]
    fn reads_accept_block1_and_size1() {
        let request = request(|p| {
            p.add_option(CoapOption::Accept, vec![]);
            p.add_option(CoapOption::Block1, vec![0x1e]);
            p.add_option(CoapOption::Size1, vec![0x10, 0x00]);
        })
        .unwrap();
        assert_eq!(request.accept, Some(FORMAT_TEXT));
        let block = Block {
            num: 1,
            more: true,
            szx: 6,
        };
        assert_eq!(request.block1, Some(block));
        assert_eq!(request.size1, Some(4096));
        // Reserved method codes are requests without a known method.
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Reserved(0x08);
        assert_eq!(Request::from_packet(packet).unwrap().method, None);
    }

    #[test]
    fn a_payload_marker_needs_a_payload() {
        let mut packet = Packet::new();
        packet.header.code = MessageClass::Request(RequestType::Post);
        packet.set_token(vec![1, 2]);
        for segment in ["t", "a-device-name-longer-than-12"] {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        packet.add_option(CoapOption::NoResponse, vec![2]);
        let plain = packet.to_bytes().unwrap();
        assert!(!bare_payload_marker(
            &plain,
            &Packet::from_bytes(&plain).unwrap()
        ));
        let mut marked = plain.clone();
        marked.push(0xff);
        let read = Packet::from_bytes(&marked).unwrap();
        assert!(read.payload.is_empty(), "coap-lite reads no payload");
        assert!(bare_payload_marker(&marked, &read));
        packet.payload = b"{}".to_vec();
        let with_payload = packet.to_bytes().unwrap();
        let read = Packet::from_bytes(&with_payload).unwrap();
        assert!(!bare_payload_marker(&with_payload, &read));
    }

    #[test]
    fn replies_round_trip_through_coap_lite() {
        let reply = Reply {
            max_age: Some(5),
            ..Reply::error(ResponseType::ServiceUnavailable, "later")
        };
        let bytes = reply.encode(MessageType::Acknowledgement, 9, &[7]);
        let packet = Packet::from_bytes(&bytes).unwrap();
        assert_eq!(packet.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(packet.header.message_id, 9);
        assert_eq!(packet.get_token(), &[7]);
        assert_eq!(packet.header.code.to_string(), "5.03");
        assert_eq!(packet.get_first_option(CoapOption::MaxAge), Some(&vec![5]));
        assert_eq!(packet.payload, b"later");
        assert_eq!(reply.code_text(), "5.03");
        assert_eq!(empty_ack(0x1234), [0x60, 0, 0x12, 0x34]);
        assert_eq!(reset(1), [0x70, 0, 0, 1]);
        assert_eq!(encode_uint(0), Vec::<u8>::new());
        assert_eq!(encode_uint(16384), vec![0x40, 0]);
    }
}
