//! Block-wise uploads (RFC 7959, Block1): a client with a payload larger
//! than it likes to put in one datagram (Californium and aiocoap: over
//! 1 KiB) sends it in numbered blocks; each but the last is answered 2.31
//! Continue, and only the last, with the whole body reassembled, becomes a
//! record. No IO, no clock: callers pass the time.
//!
//! A transfer is identified by the client's endpoint and the request's
//! Uri-Path and Uri-Query (RFC 7959 §2.5: the token may change from block
//! to block). Blocks must come in order; a block that does not continue
//! what is held gets 4.08 Request Entity Incomplete. What is held is
//! bounded twice: each body by `--max-payload-bytes` (more gets 4.13 with
//! Size1), all bodies together by [`UPLOAD_BUDGET_BYTES`] (more gets 5.03
//! with Max-Age), and a transfer not continued within [`UPLOAD_LIFETIME`]
//! is forgotten. Retransmitted blocks never get here: the exchange cache
//! answers them like any retransmitted request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::ResponseType;

use super::message::Reply;

/// The block size the gateway suggests (SZX 6: 1024 bytes, the largest
/// that fits a datagram on any usual path).
pub const PREFERRED_SZX: u8 = 6;
/// All bodies being reassembled together, in bytes: 1,000 uploads of
/// 16 KiB.
pub const UPLOAD_BUDGET_BYTES: usize = 16 * 1024 * 1024;
/// How long a transfer waits for its next block: RFC 7252's
/// MAX_TRANSMIT_WAIT, after which the client has given up on the block.
pub const UPLOAD_LIFETIME: Duration = Duration::from_secs(93);

/// A Block1 option's value: block number, more to come, size exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// NUM: the block's number, counted in blocks of this size.
    pub num: u32,
    /// M: more blocks follow.
    pub more: bool,
    /// SZX: the block size is 2^(SZX + 4); 7 is reserved.
    pub szx: u8,
}

impl Block {
    /// Reads a Block1 value (0 to 3 bytes); `None` if longer.
    pub fn parse(value: &[u8]) -> Option<Block> {
        if value.len() > 3 {
            return None;
        }
        let raw = value.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
        Some(Block {
            num: raw >> 4,
            more: raw & 0x8 != 0,
            szx: (raw & 0x7) as u8,
        })
    }

    /// The value as the option carries it.
    pub fn encode(&self) -> Vec<u8> {
        let raw = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx);
        let bytes = raw.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        bytes[skip..].to_vec()
    }

    /// The block size in bytes.
    pub fn size(&self) -> usize {
        16 << self.szx
    }

    /// Where this block starts in the body.
    fn offset(&self) -> usize {
        self.num as usize * self.size()
    }
}

/// The 4.13 for a body over `limit` bytes, in answer to `block` (if the
/// request was one): Size1 says the limit, Block1 the block size to use
/// (RFC 7959 §2.9.3) with the number of the block refused, as clients
/// match it (aiocoap fails the request on another number).
pub fn too_large(limit: usize, block: Option<Block>, reason: impl Into<String>) -> Reply {
    let mut szx = block.map_or(PREFERRED_SZX, |block| block.szx.min(PREFERRED_SZX));
    while szx > 0 && 16usize << szx > limit {
        szx -= 1;
    }
    Reply {
        size1: Some(u32::try_from(limit).unwrap_or(u32::MAX)),
        block1: Some(Block {
            num: block.map_or(0, |block| block.num),
            more: false,
            szx,
        }),
        ..Reply::error(ResponseType::RequestEntityTooLarge, reason)
    }
}

/// Which transfer a block belongs to: the client, Uri-Path, Uri-Query.
pub type UploadKey = (SocketAddr, Vec<String>, Vec<String>);

/// Why a block was refused: the reason label and the answer.
pub type Refusal = (&'static str, Reply);

/// What a block leads to.
#[derive(Debug, PartialEq)]
pub enum Progress {
    /// More to come: answer 2.31 Continue with this Block1.
    Continue(Reply),
    /// The last block: the whole body.
    Complete(Vec<u8>),
}

#[derive(Debug)]
struct Upload {
    body: Vec<u8>,
    /// When the last block came.
    touched: Instant,
}

/// The uploads being reassembled.
#[derive(Debug, Default)]
pub struct Uploads {
    transfers: HashMap<UploadKey, Upload>,
    /// Bytes held in all bodies.
    held: usize,
}

impl Uploads {
    /// Takes one block of the transfer `key`: `size1` is the Size1 option
    /// (the client's announced total), `limit` the largest body taken.
    pub fn receive(
        &mut self,
        key: UploadKey,
        block: Block,
        size1: Option<u32>,
        payload: &[u8],
        limit: usize,
        now: Instant,
    ) -> Result<Progress, Refusal> {
        if block.szx == 7 {
            return Err(bad("Block1 SZX 7 is reserved (RFC 7959 §2.2)"));
        }
        let fits = if block.more {
            payload.len() == block.size()
        } else {
            payload.len() <= block.size()
        };
        if !fits {
            self.forget(&key);
            return Err(bad(format!(
                "block {} has {} bytes for a block size of {}",
                block.num,
                payload.len(),
                block.size()
            )));
        }
        if block.num == 0 {
            // A first block starts the transfer afresh.
            self.forget(&key);
            if let Some(total) = size1.filter(|&total| total as usize > limit) {
                return Err((
                    "too_large",
                    too_large(
                        limit,
                        Some(block),
                        format!("the payload is {total} bytes, more than the {limit}-byte limit"),
                    ),
                ));
            }
        }
        let offset = block.offset();
        let held = self
            .transfers
            .get(&key)
            .map_or(0, |upload| upload.body.len());
        if offset != held {
            self.forget(&key);
            return Err((
                "incomplete",
                Reply::error(
                    ResponseType::RequestEntityIncomplete,
                    format!(
                        "block {} starts at byte {offset}, but {held} bytes are held: \
                         start again from block 0",
                        block.num
                    ),
                ),
            ));
        }
        if offset + payload.len() > limit {
            self.forget(&key);
            return Err((
                "too_large",
                too_large(
                    limit,
                    Some(block),
                    format!("the payload is more than the {limit}-byte limit"),
                ),
            ));
        }
        if !block.more {
            let mut body = self.forget(&key).unwrap_or_default();
            body.extend_from_slice(payload);
            return Ok(Progress::Complete(body));
        }
        if self.held + payload.len() > UPLOAD_BUDGET_BYTES {
            self.expire(now);
        }
        if self.held + payload.len() > UPLOAD_BUDGET_BYTES {
            self.forget(&key);
            return Err((
                "overloaded",
                Reply {
                    max_age: Some(UPLOAD_RETRY_AFTER),
                    ..Reply::error(
                        ResponseType::ServiceUnavailable,
                        "too many block-wise uploads in progress",
                    )
                },
            ));
        }
        let upload = self.transfers.entry(key).or_insert_with(|| Upload {
            body: Vec::with_capacity(size1.map_or(0, |total| total as usize).min(limit)),
            touched: now,
        });
        upload.body.extend_from_slice(payload);
        upload.touched = now;
        self.held += payload.len();
        Ok(Progress::Continue(Reply {
            block1: Some(block),
            ..Reply::empty(ResponseType::Continue)
        }))
    }

    /// Drops the transfers not continued within [`UPLOAD_LIFETIME`].
    pub fn expire(&mut self, now: Instant) {
        let mut freed = 0;
        self.transfers.retain(|_, upload| {
            let alive = now.duration_since(upload.touched) < UPLOAD_LIFETIME;
            if !alive {
                freed += upload.body.len();
            }
            alive
        });
        self.held -= freed;
    }

    fn forget(&mut self, key: &UploadKey) -> Option<Vec<u8>> {
        let upload = self.transfers.remove(key)?;
        self.held -= upload.body.len();
        Some(upload.body)
    }
}

/// Max-Age of a 5.03 because the upload budget is spent.
const UPLOAD_RETRY_AFTER: u32 = 5;

fn bad(reason: impl Into<String>) -> Refusal {
    ("bad_block", Reply::error(ResponseType::BadRequest, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> UploadKey {
        (
            SocketAddr::from(([127, 0, 0, 1], port)),
            vec!["t".into(), "d1".into()],
            vec![],
        )
    }

    fn block(num: u32, more: bool) -> Block {
        Block { num, more, szx: 0 }
    }

    fn code(result: Result<Progress, Refusal>) -> String {
        match result {
            Ok(Progress::Continue(reply)) => reply.code_text(),
            Ok(Progress::Complete(body)) => {
                format!("complete {}", String::from_utf8(body).unwrap())
            }
            Err((_, reply)) => reply.code_text(),
        }
    }

    #[test]
    fn block_values_round_trip() {
        for (bytes, block) in [
            (
                vec![],
                Block {
                    num: 0,
                    more: false,
                    szx: 0,
                },
            ),
            (
                vec![0x0e],
                Block {
                    num: 0,
                    more: true,
                    szx: 6,
                },
            ),
            (
                vec![0x1e],
                Block {
                    num: 1,
                    more: true,
                    szx: 6,
                },
            ),
            (
                vec![0x01, 0x06],
                Block {
                    num: 16,
                    more: false,
                    szx: 6,
                },
            ),
            (
                vec![0xff, 0xff, 0xfe],
                Block {
                    num: 0xfffff,
                    more: true,
                    szx: 6,
                },
            ),
        ] {
            assert_eq!(Block::parse(&bytes), Some(block));
            assert_eq!(block.encode(), bytes);
        }
        assert_eq!(Block::parse(&[1, 2, 3, 4]), None);
        assert_eq!(Block::parse(&[0x0e]).unwrap().size(), 1024);
    }

    #[test]
    fn blocks_in_order_make_the_body() {
        let mut uploads = Uploads::default();
        let now = Instant::now();
        let sixteen = "a".repeat(16);
        let step = |uploads: &mut Uploads, num, more, payload: &str| {
            code(uploads.receive(key(1), block(num, more), None, payload.as_bytes(), 64, now))
        };
        assert_eq!(step(&mut uploads, 0, true, &sixteen), "2.31");
        assert_eq!(step(&mut uploads, 1, true, &sixteen), "2.31");
        assert_eq!(uploads.held, 32);
        assert_eq!(
            step(&mut uploads, 2, false, "end"),
            format!("complete {sixteen}{sixteen}end")
        );
        assert_eq!((uploads.transfers.len(), uploads.held), (0, 0));

        // A gap: 4.08, and the transfer is gone.
        assert_eq!(step(&mut uploads, 0, true, &sixteen), "2.31");
        assert_eq!(step(&mut uploads, 2, true, &sixteen), "4.08");
        assert_eq!(step(&mut uploads, 3, false, "x"), "4.08");
        assert_eq!((uploads.transfers.len(), uploads.held), (0, 0));
        // Over the limit (64 bytes): 4.13 with Size1 and a Block1 size.
        for num in 0..4 {
            assert_eq!(step(&mut uploads, num, true, &sixteen), "2.31");
        }
        let refused = uploads.receive(key(1), block(4, false), None, b"x", 64, now);
        let Err((reason, reply)) = refused else {
            panic!("block 4 was taken")
        };
        assert_eq!(reason, "too_large");
        let echo = Block {
            num: 4,
            more: false,
            szx: 0,
        };
        assert_eq!((reply.size1, reply.block1), (Some(64), Some(echo)));
        // Without a block, the suggestion is the largest block under the
        // limit, up to 1024 bytes.
        let suggested = |limit| too_large(limit, None, "").block1.map(|b| (b.num, b.szx));
        assert_eq!(suggested(16384), Some((0, 6)));
        assert_eq!(suggested(100), Some((0, 2)));
        assert_eq!((uploads.transfers.len(), uploads.held), (0, 0));
        // Announced too large by Size1: refused at once.
        let refused = uploads.receive(
            key(1),
            block(0, true),
            Some(65),
            sixteen.as_bytes(),
            64,
            now,
        );
        assert_eq!(code(refused), "4.13");
        // A middle block of the wrong size, and the reserved SZX.
        assert_eq!(step(&mut uploads, 0, true, "short"), "4.00");
        let reserved = Block {
            num: 0,
            more: true,
            szx: 7,
        };
        assert_eq!(
            code(uploads.receive(key(1), reserved, None, b"", 64, now)),
            "4.00"
        );
    }

    #[test]
    fn transfers_are_per_client_and_expire() {
        let mut uploads = Uploads::default();
        let now = Instant::now();
        let sixteen = [b'a'; 16];
        for port in [1, 2] {
            let got = uploads.receive(key(port), block(0, true), None, &sixteen, 64, now);
            assert_eq!(code(got), "2.31");
        }
        assert_eq!(uploads.transfers.len(), 2);
        uploads.expire(now + UPLOAD_LIFETIME / 2);
        assert_eq!(uploads.transfers.len(), 2);
        uploads.expire(now + UPLOAD_LIFETIME);
        assert_eq!((uploads.transfers.len(), uploads.held), (0, 0));
    }

    #[test]
    fn the_budget_bounds_what_is_held() {
        let mut uploads = Uploads::default();
        let now = Instant::now();
        let big = Block {
            num: 0,
            more: true,
            szx: 6,
        };
        let kilobyte = [0u8; 1024];
        let fill = UPLOAD_BUDGET_BYTES / 1024;
        for port in 0..fill {
            let got = uploads.receive(key(port as u16), big, None, &kilobyte, 4096, now);
            assert_eq!(code(got), "2.31");
        }
        let over = uploads.receive(key(u16::MAX), big, None, &kilobyte, 4096, now);
        assert_eq!(code(over), "5.03");
        // Once the stale ones expire, there is room again.
        let later = now + UPLOAD_LIFETIME;
        let got = uploads.receive(key(u16::MAX), big, None, &kilobyte, 4096, later);
        assert_eq!(code(got), "2.31");
        assert_eq!(uploads.held, 1024);
    }
}
