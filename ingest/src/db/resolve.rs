//! Finding the database host through Consul DNS.
//!
//! A host ending in `.consul` (e.g. `master.tsdb.service.consul`) is looked
//! up at the configured Consul DNS address for every new connection, with no
//! cache, so an answer is never used past its TTL (Consul's default is 0).
//! An SRV record gives the port; without one, the A record and the URL's port.
//! Other hosts are left to the system resolver, as libpq would.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// Whether `host` is a name for Consul to answer.
pub fn is_consul_name(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host == "consul" || host.ends_with(".consul")
}

/// A failed lookup, in words naming the name and the server.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {name} through the Consul DNS at {server}: {reason}")]
pub struct ResolveError {
    pub name: String,
    pub server: SocketAddr,
    pub reason: String,
}

/// Where to connect: the address, and the port (from SRV, else `default_port`).
pub async fn resolve(
    name: &str,
    server: SocketAddr,
    default_port: u16,
) -> Result<(IpAddr, u16), ResolveError> {
    let error = |reason: String| ResolveError {
        name: name.to_string(),
        server,
        reason,
    };
    let mut server_config = NameServerConfig::udp_and_tcp(server.ip());
    for connection in &mut server_config.connections {
        connection.port = server.port();
    }
    let mut options = ResolverOpts::default();
    options.cache_size = 0;
    // Consul's DNS is a local agent: an answer takes milliseconds.
    options.timeout = Duration::from_secs(1);
    options.attempts = 2;
    let resolver = Resolver::builder_with_config(
        ResolverConfig::from_parts(None, Vec::new(), vec![server_config]),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
    .map_err(|e| error(e.to_string()))?;
    // Fully qualified, so no search domains are tried.
    let fqdn = format!("{}.", name.trim_end_matches('.'));

    let (target, port) = match resolver.srv_lookup(fqdn.as_str()).await {
        Ok(lookup) => {
            let best = lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::SRV(srv) => Some(srv),
                    _ => None,
                })
                .min_by_key(|srv| (srv.priority, std::cmp::Reverse(srv.weight)));
            match best {
                Some(srv) => (srv.target.to_string(), srv.port),
                None => (fqdn.clone(), default_port),
            }
        }
        // No SRV record (NXDOMAIN or no data): the plain name and the URL's port.
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => (fqdn.clone(), default_port),
        Err(e) => return Err(error(e.to_string())),
    };
    let lookup = resolver.lookup_ip(target.as_str()).await.map_err(|e| {
        if e.is_no_records_found() || e.is_nx_domain() {
            error(format!("no such name ({target} has no address)"))
        } else {
            error(e.to_string())
        }
    })?;
    let ip = lookup
        .iter()
        .next()
        .ok_or_else(|| error(format!("{target} has no address")))?;
    Ok((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consul_names() {
        for (host, consul) in [
            ("master.tsdb.service.consul", true),
            ("master.tsdb.service.consul.", true),
            ("db.example.com", false),
            ("127.0.0.1", false),
            ("consultant.example", false),
        ] {
            assert_eq!(is_consul_name(host), consul, "{host}");
        }
    }
}
