//! An HTTP proxy in front of the stack's Kinesis emulator that answers as
//! Kinesis does once a closed shard has aged out of the retention period:
//! ListShards no longer lists it, and GetShardIterator on it answers
//! ResourceNotFoundException. Everything else passes through unchanged, to
//! the real emulator. No emulator can age a shard out in a test's time (the
//! shortest retention is 24 hours), so this rewrites the two answers that
//! change, and only those.
//!
//! HTTP/1.1 with Content-Length bodies (what the AWS SDK sends) and
//! Content-Length or chunked answers (what emulators send); one upstream
//! connection per client connection. Runs on the calling test's runtime.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The proxy; dropping it stops accepting (open connections end with their client).
#[derive(Debug)]
pub struct RetentionProxy {
    address: SocketAddr,
    expired: Arc<Mutex<HashSet<String>>>,
    acceptor: JoinHandle<()>,
}

impl RetentionProxy {
    /// Starts a proxy to `upstream_url` (`http://host:port`) on 127.0.0.1.
    pub async fn start(upstream_url: &str) -> RetentionProxy {
        let upstream = upstream_url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("an http:// URL, not {upstream_url}"))
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy listens on 127.0.0.1");
        let address = listener.local_addr().expect("a bound address");
        let expired = Arc::new(Mutex::new(HashSet::new()));
        let shared = expired.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let expired = shared.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve(client, &upstream, &expired).await {
                        eprintln!("retention proxy: connection ended: {error}");
                    }
                });
            }
        });
        RetentionProxy {
            address,
            expired,
            acceptor,
        }
    }

    /// The URL to give a Kinesis client instead of the emulator's.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// From now on, `shard_id` answers as a shard past the retention period.
    pub fn expire(&self, shard_id: &str) {
        self.expired
            .lock()
            .expect("the lock")
            .insert(shard_id.to_string());
    }
}

impl Drop for RetentionProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// One HTTP message: its head (start line and headers, without the blank
/// line) and its whole body.
struct Message {
    head: String,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }

    /// The message with `body`, framed by Content-Length.
    fn to_bytes(&self, body: &[u8]) -> Vec<u8> {
        let mut head: Vec<&str> = self
            .head
            .lines()
            .filter(|line| {
                let key = line.split(':').next().unwrap_or("").trim();
                !key.eq_ignore_ascii_case("content-length")
                    && !key.eq_ignore_ascii_case("transfer-encoding")
            })
            .collect();
        let length = format!("Content-Length: {}", body.len());
        head.push(&length);
        let mut bytes = format!("{}\r\n\r\n", head.join("\r\n")).into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

async fn serve(
    client: TcpStream,
    upstream: &str,
    expired: &Mutex<HashSet<String>>,
) -> std::io::Result<()> {
    let (client_read, mut client_write) = client.into_split();
    let mut client_read = BufReader::new(client_read);
    let mut server: Option<(BufReader<tokio::net::tcp::OwnedReadHalf>, _)> = None;
    while let Some(request) = read_message(&mut client_read).await? {
        let target = request.header("x-amz-target").unwrap_or("").to_string();
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let is_expired = |shard: &str| expired.lock().expect("the lock").contains(shard);
        if target.ends_with(".GetShardIterator") && body["ShardId"].as_str().is_some_and(is_expired)
        {
            let answer = serde_json::json!({
                "__type": "ResourceNotFoundException",
                "message": format!("Shard {} does not exist (past the retention period)", body["ShardId"]),
            })
            .to_string();
            let head = Message {
                head: "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: ResourceNotFoundException".into(),
                body: Vec::new(),
            };
            client_write
                .write_all(&head.to_bytes(answer.as_bytes()))
                .await?;
            continue;
        }
        if server.is_none() {
            let (read, write) = TcpStream::connect(upstream).await?.into_split();
            server = Some((BufReader::new(read), write));
        }
        let (server_read, server_write) = server.as_mut().expect("connected");
        server_write
            .write_all(&request.to_bytes(&request.body))
            .await?;
        let Some(response) = read_message(server_read).await? else {
            return Ok(());
        };
        let mut answer = response.body.clone();
        if target.ends_with(".ListShards") && response.head.contains(" 200 ") {
            let mut listing: serde_json::Value =
                serde_json::from_slice(&response.body).unwrap_or_default();
            if let Some(shards) = listing["Shards"].as_array_mut() {
                shards.retain(|shard| !shard["ShardId"].as_str().is_some_and(is_expired));
                answer = listing.to_string().into_bytes();
            }
        }
        client_write.write_all(&response.to_bytes(&answer)).await?;
    }
    Ok(())
}

/// Reads one message; None at a clean end of the connection.
async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<Message>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push_str(&line);
    }
    let head = head.trim_end().replace("\r\n", "\n").replace('\n', "\r\n");
    let mut message = Message {
        head,
        body: Vec::new(),
    };
    if message
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| std::io::Error::other(format!("a chunk size: {e}")))?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
            message.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = message.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|e| std::io::Error::other(format!("a content length: {e}")))?;
        message.body = vec![0; length];
        reader.read_exact(&mut message.body).await?;
    }
    Ok(Some(message))
}
