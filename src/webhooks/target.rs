//! SSRF protection: a webhook may only reach public addresses unless the
//! configuration says otherwise.
//!
//! The check runs twice: when a job is submitted (so a bad URL is a 4xx at
//! once) and again at connect time inside the HTTP client's resolver, so a
//! name that later resolves to a private address (DNS rebinding) is refused
//! too.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use url::Url;

#[derive(Clone, Debug, Default)]
pub struct TargetPolicy {
    pub allow_private: bool,
    pub allowed_networks: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("webhook url `{url}` is not a valid URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("webhook url must use http or https, not `{0}`")]
    Scheme(String),
    #[error("webhook url must not carry a user name or password")]
    Credentials,
    #[error("webhook host `{host}` could not be resolved: {reason}")]
    Unresolvable { host: String, reason: String },
    #[error("webhook host `{host}` resolves to {addr}, a {class} address; only public targets are allowed (set webhooks.allow_private_targets or webhooks.allowed_networks to permit it)")]
    NotPublic {
        host: String,
        addr: IpAddr,
        class: &'static str,
    },
}

impl TargetPolicy {
    /// Why `addr` is refused, or `None` when it may be reached.
    pub fn refusal(&self, addr: IpAddr) -> Option<&'static str> {
        let class = non_public_class(addr)?;
        if self.allow_private || self.allowed_networks.iter().any(|n| n.contains(&addr)) {
            return None;
        }
        Some(class)
    }
}

/// Parses and checks a webhook URL, resolving its host. Returns the parsed URL.
pub async fn check_target(raw: &str, policy: &TargetPolicy) -> Result<Url, TargetError> {
    let url = Url::parse(raw).map_err(|e| TargetError::BadUrl {
        url: raw.to_owned(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::Scheme(url.scheme().to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Credentials);
    }
    let host = url.host_str().ok_or_else(|| TargetError::BadUrl {
        url: raw.to_owned(),
        reason: "it has no host".into(),
    })?;
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs = resolve(host, port).await?;
    for addr in addrs {
        if let Some(class) = policy.refusal(addr.ip()) {
            return Err(TargetError::NotPublic {
                host: host.to_owned(),
                addr: addr.ip(),
                class,
            });
        }
    }
    Ok(url)
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, TargetError> {
    // `Url` keeps IPv6 literals bracketed; lookup_host wants them bare.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| TargetError::Unresolvable {
            host: host.to_owned(),
            reason: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TargetError::Unresolvable {
            host: host.to_owned(),
            reason: "no addresses".into(),
        });
    }
    Ok(addrs)
}

/// The HTTP client's resolver: resolves as usual, then refuses names with a
/// non-public address.
pub(crate) struct GuardedResolver {
    pub(crate) policy: TargetPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve(&host, 0).await?;
            for a in &addrs {
                if let Some(class) = policy.refusal(a.ip()) {
                    return Err(Box::new(TargetError::NotPublic {
                        host: host.clone(),
                        addr: a.ip(),
                        class,
                    })
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl GuardedResolver {
    pub(crate) fn shared(policy: TargetPolicy) -> Arc<Self> {
        Arc::new(Self { policy })
    }
}

/// IP literals in a URL never reach the resolver, so the sender checks them here.
pub(crate) fn literal_refusal(url: &Url, policy: &TargetPolicy) -> Option<TargetError> {
    let host = url.host()?;
    let ip = match host {
        url::Host::Ipv4(v4) => IpAddr::V4(v4),
        url::Host::Ipv6(v6) => IpAddr::V6(v6),
        url::Host::Domain(_) => return None,
    };
    policy.refusal(ip).map(|class| TargetError::NotPublic {
        host: ip.to_string(),
        addr: ip,
        class,
    })
}

fn v4_special() -> &'static [(IpNet, &'static str)] {
    static NETS: OnceLock<Vec<(IpNet, &'static str)>> = OnceLock::new();
    NETS.get_or_init(|| {
        [
            ("0.0.0.0/8", "unspecified"),
            ("10.0.0.0/8", "private"),
            ("100.64.0.0/10", "shared (carrier-grade NAT)"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.0.0/16", "link-local"),
            ("172.16.0.0/12", "private"),
            ("192.0.0.0/24", "IETF protocol"),
            ("192.0.2.0/24", "documentation"),
            ("192.168.0.0/16", "private"),
            ("198.18.0.0/15", "benchmarking"),
            ("198.51.100.0/24", "documentation"),
            ("203.0.113.0/24", "documentation"),
            ("224.0.0.0/4", "multicast"),
            ("240.0.0.0/4", "reserved"),
        ]
        .into_iter()
        .map(|(n, c)| (n.parse().expect("static CIDR"), c))
        .collect()
    })
}

fn v6_special() -> &'static [(IpNet, &'static str)] {
    static NETS: OnceLock<Vec<(IpNet, &'static str)>> = OnceLock::new();
    NETS.get_or_init(|| {
        [
            ("::/128", "unspecified"),
            ("::1/128", "loopback"),
            ("100::/64", "discard"),
            ("2001:db8::/32", "documentation"),
            ("fc00::/7", "unique-local"),
            ("fe80::/10", "link-local"),
            ("fec0::/10", "site-local"),
            ("ff00::/8", "multicast"),
        ]
        .into_iter()
        .map(|(n, c)| (n.parse().expect("static CIDR"), c))
        .collect()
    })
}

/// The kind of non-public address `addr` is, or `None` for a public one.
fn non_public_class(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => {
            // IPv4-mapped, IPv4-compatible and NAT64 addresses reach an IPv4
            // host, so they are judged by that host.
            if let Some(v4) = embedded_v4(v6) {
                return v4_class(v4);
            }
            v6_special()
                .iter()
                .find(|(n, _)| n.contains(&IpAddr::V6(v6)))
                .map(|(_, c)| *c)
        }
    }
}

fn v4_class(v4: Ipv4Addr) -> Option<&'static str> {
    if v4.is_broadcast() {
        return Some("broadcast");
    }
    v4_special()
        .iter()
        .find(|(n, _)| n.contains(&IpAddr::V4(v4)))
        .map(|(_, c)| *c)
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // NAT64 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low);
    }
    // Deprecated IPv4-compatible ::a.b.c.d (but not :: and ::1 themselves).
    if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
        return Some(low);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny_all() -> TargetPolicy {
        TargetPolicy::default()
    }

    #[test]
    fn classifies_addresses() {
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::7f00:1",
        ];
        for a in refused {
            let ip: IpAddr = a.parse().unwrap();
            assert!(deny_all().refusal(ip).is_some(), "{a} should be refused");
        }
        for a in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(deny_all().refusal(ip), None, "{a} should be allowed");
        }
    }

    #[test]
    fn allowed_networks_and_the_switch_open_exactly_what_they_say() {
        let p = TargetPolicy {
            allow_private: false,
            allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert_eq!(p.refusal("127.0.0.1".parse().unwrap()), None);
        assert!(p.refusal("10.0.0.1".parse().unwrap()).is_some());
        assert!(p.refusal("::1".parse().unwrap()).is_some());
        let open = TargetPolicy {
            allow_private: true,
            allowed_networks: vec![],
        };
        assert_eq!(open.refusal("10.0.0.1".parse().unwrap()), None);
    }

    #[tokio::test]
    async fn check_target_refuses_bad_urls() {
        let p = deny_all();
        assert!(matches!(
            check_target("ftp://example.com/x", &p).await,
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            check_target("not a url", &p).await,
            Err(TargetError::BadUrl { .. })
        ));
        assert!(matches!(
            check_target("http://u:p@93.184.216.34/", &p).await,
            Err(TargetError::Credentials)
        ));
        assert!(matches!(
            check_target("http://127.0.0.1:9/hook", &p).await,
            Err(TargetError::NotPublic {
                class: "loopback",
                ..
            })
        ));
        assert!(matches!(
            check_target("http://[::1]/hook", &p).await,
            Err(TargetError::NotPublic {
                class: "loopback",
                ..
            })
        ));
        // `localhost` resolves through the system resolver, to loopback.
        assert!(matches!(
            check_target("http://localhost:9/hook", &p).await,
            Err(TargetError::NotPublic { .. })
        ));
        assert!(check_target("https://93.184.216.34/hook", &p).await.is_ok());
    }
}
