//! `--metrics-addr`: `/metrics` in Prometheus text (the counters of
//! `metrics`, and the process's own `process_*` as `ingest` serves them)
//! while loadgen runs, and one last scrape after the run, so that the final
//! counts reach Prometheus before the process exits.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::sync::{oneshot, watch};

use crate::metrics as m;

/// How often histogram samples are folded in between scrapes (so they do
/// not pile up when nothing scrapes).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// How long the server may take to finish the last answer after the wait.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// A running `/metrics` endpoint.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    /// Scrapes begun so far: one that begins after the run saw the final counts.
    scrapes: watch::Receiver<u64>,
    /// Stops the server, after the answer in progress.
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    upkeep: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Installs the process-wide recorder and binds `addr` now, so that a
    /// taken port fails at the start; serves until `finish`.
    pub async fn start(addr: SocketAddr) -> Result<Endpoint, String> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(m::ACK_LATENCY_SECONDS.to_owned()),
                m::ACK_LATENCY_BUCKETS,
            )
            .map_err(|e| e.to_string())?
            .install_recorder()
            .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
        m::register();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
        let (count, scrapes) = watch::channel(0u64);
        // The process's own CPU, memory and descriptors, read from /proc at
        // each scrape (ingest::observe does the same).
        let process = metrics_process::Collector::default();
        process.describe();
        let render = handle.clone();
        let app = Router::new().route(
            "/metrics",
            get(move || {
                count.send_modify(|n| *n += 1);
                process.collect();
                std::future::ready(render.render())
            }),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                eprintln!("loadgen: the metrics endpoint on {addr} stopped: {error}");
            }
        });
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
        Ok(Endpoint {
            addr,
            scrapes,
            stop,
            server,
            upkeep,
        })
    }

    /// Call when the counts are final: waits up to `wait` for a scrape that
    /// begins now or later, lets its answer go out, and stops serving.
    /// Returns whether such a scrape came.
    pub async fn finish(mut self, wait: Duration) -> bool {
        self.scrapes.mark_unchanged();
        let scraped = if wait.is_zero() {
            false
        } else {
            eprintln!(
                "loadgen: waiting up to {} s for a last scrape of http://{}/metrics",
                wait.as_secs_f64(),
                self.addr
            );
            matches!(
                tokio::time::timeout(wait, self.scrapes.changed()).await,
                Ok(Ok(()))
            )
        };
        if !scraped && !wait.is_zero() {
            eprintln!(
                "loadgen: nothing scraped /metrics within {} s: a scraper may lack the final counts",
                wait.as_secs_f64()
            );
        }
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(CLOSE_WITHIN, &mut self.server).await;
        self.server.abort();
        self.upkeep.abort();
        scraped
    }
}
