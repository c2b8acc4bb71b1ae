//! A TCP proxy that can be cut and restored: the network between a process
//! and a real service failing for real, not a mock of the service.
//!
//! [`TcpProxy::cut`] resets every open connection both ways (RST to the
//! client and to the service, so the client sees "connection reset" and the
//! service ends the session, rolling back its transaction) and closes the
//! listening socket, so that new connections are refused; it keeps the port
//! bound meanwhile, so no other listener takes it. [`TcpProxy::restore`]
//! listens again on the same port. [`TcpProxy::blackhole_at`] makes one
//! connection go silent at a chosen message, both ways, without closing
//! it: a peer that vanished, as neither end can tell. [`TcpProxy::stall`]
//! holds every byte, both ways, on every connection, until
//! [`TcpProxy::resume`]: a server that stopped answering for a while (a
//! storage hiccup, a long pause), connections kept open. The proxy runs
//! on the calling test's tokio runtime; dropping it closes everything.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long [`TcpProxy::restore`] keeps trying to listen on its address again.
const REBIND_WITHIN: Duration = Duration::from_secs(10);

/// A proxy from an address of its own on 127.0.0.1 to `upstream`.
#[derive(Debug)]
pub struct TcpProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop while the proxy is up; it owns the listening socket.
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// While cut: the port, bound but not listening (connections are
    /// refused), so that no other test's listener takes it meanwhile.
    holder: Mutex<Option<TcpSocket>>,
}

#[derive(Debug)]
struct Shared {
    /// Where connections go (host:port).
    upstream: String,
    /// Bumped by every cut: connections accepted before it are reset.
    generation: watch::Sender<u64>,
    /// Connections accepted, over the proxy's life.
    accepted: AtomicU64,
    /// Connections reset by a cut.
    reset: AtomicU64,
    /// Connections open now.
    open: AtomicU64,
    /// The armed blackhole, taken by the first connection that matches it.
    trap: Mutex<Option<Blackhole>>,
    /// Connections gone silent.
    blackholed: AtomicU64,
    /// While true, no byte is passed on either way.
    stalled: watch::Sender<bool>,
    /// Client bytes that stall the proxy when they come (not passed on).
    stall_trap: Mutex<Option<Vec<u8>>>,
}

/// Where a connection goes silent: at the first client bytes holding
/// `marker`, either before they reach the server or just after.
#[derive(Debug, Clone)]
struct Blackhole {
    marker: Vec<u8>,
    forward_marker: bool,
}

impl TcpProxy {
    /// Starts a proxy to `upstream` (host:port) on 127.0.0.1, port chosen by the system.
    pub async fn start(upstream: &str) -> TcpProxy {
        Self::start_at("127.0.0.1:0".parse().expect("an address"), upstream).await
    }

    /// Starts a proxy to `upstream` (host:port) listening on `address`.
    pub async fn start_at(address: SocketAddr, upstream: &str) -> TcpProxy {
        let listener = listen(address)
            .unwrap_or_else(|error| panic!("the proxy cannot listen on {address}: {error}"));
        let address = listener.local_addr().expect("a bound address");
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            generation: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            open: AtomicU64::new(0),
            trap: Mutex::new(None),
            blackholed: AtomicU64::new(0),
            stalled: watch::Sender::new(false),
            stall_trap: Mutex::new(None),
        });
        let acceptor = tokio::spawn(accept(listener, shared.clone()));
        TcpProxy {
            address,
            shared,
            acceptor: Mutex::new(Some(acceptor)),
            holder: Mutex::new(None),
        }
    }

    /// The proxy's own address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `url` (scheme://[user[:password]@]host:port/...) with its host and
    /// port replaced by the proxy's.
    pub fn url_via(&self, url: &str) -> String {
        let (start, end) = host_port_span(url);
        format!("{}{}{}", &url[..start], self.address, &url[end..])
    }

    /// Resets every open connection both ways and refuses new ones, until
    /// [`restore`](Self::restore). Returns once the listening socket is
    /// closed and no connection is open.
    pub async fn cut(&self) {
        let acceptor = self.acceptor.lock().expect("not poisoned").take();
        if let Some(acceptor) = acceptor {
            acceptor.abort();
            // The listening socket is closed when the aborted task is dropped.
            let _ = acceptor.await;
        }
        let deadline = Instant::now() + REBIND_WITHIN;
        let holder = loop {
            match bind(self.address) {
                Ok(holder) => break holder,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "the proxy cannot hold {} while cut: {error}",
                        self.address
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        *self.holder.lock().expect("not poisoned") = Some(holder);
        self.shared
            .generation
            .send_modify(|generation| *generation += 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.open.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "the proxy's connections did not close within 10 s of the cut"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Listens on the same address again and forwards new connections.
    pub async fn restore(&self) {
        let deadline = Instant::now() + REBIND_WITHIN;
        let held = self.holder.lock().expect("not poisoned").take();
        let listener = match held {
            // The usual way: the port was held since the cut.
            Some(holder) => holder
                .listen(1024)
                .unwrap_or_else(|error| panic!("the proxy cannot listen again: {error}")),
            None => loop {
                match listen(self.address) {
                    Ok(listener) => break listener,
                    Err(error) => {
                        assert!(
                            Instant::now() < deadline,
                            "the proxy cannot listen on {} again: {error}",
                            self.address
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
        };
        let acceptor = tokio::spawn(accept(listener, self.shared.clone()));
        let previous = self
            .acceptor
            .lock()
            .expect("not poisoned")
            .replace(acceptor);
        assert!(previous.is_none(), "restore() of a proxy that was not cut");
    }

    /// Arms a blackhole for the next connection whose client sends bytes
    /// holding `marker` (e.g. a PostgreSQL `COMMIT`): from then on nothing
    /// more passes between that client and the server, either way, and
    /// neither is told. With `forward_marker` the server still gets the
    /// bytes that matched (a COMMIT the server carries out and the client
    /// never hears about); without, they are lost too (a COMMIT that never
    /// reached the server). Other connections are not touched.
    pub fn blackhole_at(&self, marker: &[u8], forward_marker: bool) {
        *self.shared.trap.lock().expect("not poisoned") = Some(Blackhole {
            marker: marker.to_vec(),
            forward_marker,
        });
    }

    /// Holds every byte, both ways, on every connection (new ones too)
    /// until [`resume`](Self::resume); nothing is closed.
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Stalls the proxy, as [`stall`](Self::stall), when the next client
    /// bytes holding `marker` come (e.g. a `COPY` inside a transaction, so
    /// the server waits idle in it); they are held too.
    pub fn stall_at(&self, marker: &[u8]) {
        *self.shared.stall_trap.lock().expect("not poisoned") = Some(marker.to_vec());
    }

    /// Whether the proxy is stalled now.
    pub fn is_stalled(&self) -> bool {
        *self.shared.stalled.borrow()
    }

    /// Passes bytes on again after [`stall`](Self::stall).
    pub fn resume(&self) {
        self.shared.stalled.send_replace(false);
    }

    /// Connections gone silent by [`blackhole_at`](Self::blackhole_at) so far.
    pub fn blackholed(&self) -> u64 {
        self.shared.blackholed.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections reset by cuts so far.
    pub fn reset(&self) -> u64 {
        self.shared.reset.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(acceptor) = self.acceptor.get_mut().ok().and_then(Option::take) {
            acceptor.abort();
        }
        // Like a cut: every open connection is reset.
        self.shared
            .generation
            .send_modify(|generation| *generation += 1);
    }
}

/// A listening socket on `address`, reusable at once after it is closed.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    bind(address)?.listen(1024)
}

/// A socket bound to `address`, not listening yet. Linux gives a port that
/// one holds to no other `bind(0)` while free ports remain.
fn bind(address: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    Ok(socket)
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors and the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let born = *shared.generation.borrow();
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(relay(client, born, shared.clone()));
    }
}

/// Copies both ways until either side closes or a cut comes.
async fn relay(mut client: TcpStream, born: u64, shared: Arc<Shared>) {
    let _open = OpenGuard(shared.clone());
    let mut server = tokio::select! {
        connected = TcpStream::connect(&shared.upstream) => match connected {
            Ok(server) => server,
            Err(_) => return reset(&shared, &[&client]),
        },
        () = cut_since(&shared, born) => return reset(&shared, &[&client]),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let silent = AtomicBool::new(false);
    let was_cut = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        tokio::select! {
            // One side closed or failed: the relay ends, closing both.
            () = client_to_server(&mut client_read, &mut server_write, &shared, &silent) => false,
            () = server_to_client(&mut server_read, &mut client_write, &shared, &silent) => false,
            () = cut_since(&shared, born) => true,
        }
    };
    if was_cut {
        reset(&shared, &[&client, &server]);
    }
}

/// Copies the client's bytes to the server, watching for an armed blackhole;
/// once silent, reads and drops them.
async fn client_to_server(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    shared: &Shared,
    silent: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.load(Ordering::SeqCst) {
            continue;
        }
        let bytes = &buf[..n];
        let trapped = {
            let mut trap = shared.trap.lock().expect("not poisoned");
            let hit = trap
                .as_ref()
                .filter(|t| {
                    bytes
                        .windows(t.marker.len())
                        .any(|w| w == t.marker.as_slice())
                })
                .cloned();
            if hit.is_some() {
                *trap = None;
            }
            hit
        };
        if let Some(trap) = &trapped {
            if trap.forward_marker && to.write_all(bytes).await.is_err() {
                return;
            }
            silent.store(true, Ordering::SeqCst);
            shared.blackholed.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        {
            let mut trap = shared.stall_trap.lock().expect("not poisoned");
            let hit = trap
                .as_ref()
                .is_some_and(|marker| bytes.windows(marker.len()).any(|w| w == marker.as_slice()));
            if hit {
                *trap = None;
                shared.stalled.send_replace(true);
            }
        }
        flowing(shared).await;
        if to.write_all(bytes).await.is_err() {
            return;
        }
    }
}

/// Copies the server's bytes to the client until the connection goes silent;
/// then reads and drops them.
async fn server_to_client(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    shared: &Shared,
    silent: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) if silent.load(Ordering::SeqCst) => {
                // The server gave up on the silent client: the client must
                // not hear even that. Stay open until it closes.
                std::future::pending::<()>().await;
                return;
            }
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.load(Ordering::SeqCst) {
            continue;
        }
        flowing(shared).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Returns once the proxy is not stalled.
async fn flowing(shared: &Shared) {
    let mut stalled = shared.stalled.subscribe();
    // The sender lives in `shared`, so this cannot fail.
    let _ = stalled.wait_for(|stalled| !*stalled).await;
}

/// Returns once a cut came after generation `born`.
async fn cut_since(shared: &Shared, born: u64) {
    let mut generation = shared.generation.subscribe();
    // The sender lives in `shared`, so this cannot fail.
    let _ = generation.wait_for(|now| *now != born).await;
}

/// Makes the coming close of `streams` a reset (RST), not an orderly FIN.
fn reset(shared: &Shared, streams: &[&TcpStream]) {
    for stream in streams {
        let _ = stream.set_zero_linger();
    }
    shared.reset.fetch_add(1, Ordering::SeqCst);
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where host:port is in `url`: after `scheme://` and any `user:password@`,
/// up to the next `/` or `?`.
fn host_port_span(url: &str) -> (usize, usize) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[after_scheme..]
        .find(['/', '?'])
        .map_or(url.len(), |i| after_scheme + i);
    let start = url[after_scheme..authority_end]
        .rfind('@')
        .map_or(after_scheme, |at| after_scheme + at + 1);
    (start, authority_end)
}

/// The host:port of `url`.
pub fn host_port(url: &str) -> String {
    let (start, end) = host_port_span(url);
    url[start..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_host_and_port_in_urls() {
        let cases = [
            ("postgres://u:p@127.0.0.1:15400/db", "127.0.0.1:15400"),
            ("postgres://u@h:1/db?sslmode=disable", "h:1"),
            ("postgres://h:2", "h:2"),
            ("postgres://u:p@ss@h:3/db", "h:3"),
        ];
        for (url, expected) in cases {
            assert_eq!(host_port(url), expected, "{url}");
        }
    }
}
