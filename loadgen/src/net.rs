//! Where devices connect to and from: the broker's and gateway's addresses,
//! the loopback source addresses connections are spread over, and the
//! descriptor limit that one socket per device needs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// Connections per source address before another address is used: below the
/// ~28,000 ports of Linux's default ephemeral range.
pub const CONNECTIONS_PER_ADDRESS: usize = 20_000;

/// An MQTT broker, from `mqtt://host:port` (port 1883 when left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttTarget {
    pub url: String,
    pub address: SocketAddr,
}

impl std::str::FromStr for MqttTarget {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| format!("{url:?} is not an mqtt://host:port URL"))?;
        let rest = rest.trim_end_matches('/');
        let with_port = if rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            rest.to_owned()
        } else {
            format!("{rest}:1883")
        };
        let address = resolve(&with_port)?;
        Ok(MqttTarget {
            url: url.to_owned(),
            address,
        })
    }
}

/// `host:port` to its first address.
pub fn resolve(host_port: &str) -> Result<SocketAddr, String> {
    host_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host_port} has no address"))
}

/// The source addresses for `connections` sockets to `target`: the given
/// ones, or none (the system chooses) when one address is enough, or on
/// loopback 127.0.0.1, 127.0.0.2, ... as many as needed (all of 127/8 is
/// local on Linux).
pub fn source_addresses(
    given: &[IpAddr],
    connections: usize,
    target: IpAddr,
) -> Result<Vec<IpAddr>, String> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let needed = connections.div_ceil(CONNECTIONS_PER_ADDRESS);
    if needed <= 1 {
        return Ok(Vec::new());
    }
    if !target.is_loopback() || target.is_ipv6() {
        return Err(format!(
            "{connections} connections to {target} need {needed} source addresses \
             ({CONNECTIONS_PER_ADDRESS} each): give them with --source-addrs"
        ));
    }
    Ok((1..=needed)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, (i / 256) as u8, (i % 256) as u8)))
        .collect())
}

/// The source address of device `index`'s socket, if any is chosen.
pub fn source_for(addresses: &[IpAddr], index: usize) -> Option<IpAddr> {
    (!addresses.is_empty()).then(|| addresses[index % addresses.len()])
}

/// Raises the soft descriptor limit as far as the hard one allows, and
/// fails when that is below `needed`.
pub fn ensure_descriptors(needed: u64) -> Result<(), String> {
    let limit = rlimit::increase_nofile_limit(needed)
        .map_err(|e| format!("cannot raise the descriptor limit: {e}"))?;
    if limit < needed {
        return Err(format!(
            "one socket per device needs {needed} file descriptors, the limit is {limit}: \
             raise it (ulimit -n {needed}) or simulate fewer devices"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_urls_parse_with_a_default_port() {
        let target: MqttTarget = "mqtt://127.0.0.1:15402".parse().unwrap();
        assert_eq!(target.address, "127.0.0.1:15402".parse().unwrap());
        let target: MqttTarget = "mqtt://127.0.0.1".parse().unwrap();
        assert_eq!(target.address.port(), 1883);
        assert!("http://x:1".parse::<MqttTarget>().is_err());
    }

    #[test]
    fn loopback_connections_spread_over_as_many_addresses_as_needed() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(source_addresses(&[], 10_000, loopback).unwrap().is_empty());
        let spread = source_addresses(&[], 100_000, loopback).unwrap();
        assert_eq!(spread.len(), 5);
        assert_eq!(spread[0].to_string(), "127.0.0.1");
        assert_eq!(spread[4].to_string(), "127.0.0.5");
        assert_eq!(source_for(&spread, 7), Some(spread[2]));
        let remote: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(source_addresses(&[], 100_000, remote).is_err());
    }
}
