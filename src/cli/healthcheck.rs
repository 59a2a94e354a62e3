//! `vqclip healthcheck`: the container's HEALTHCHECK. The slim images have no curl,
//! so the binary asks its own server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use vqclip::config::{Config, Overrides};

#[derive(clap::Args)]
pub struct HealthcheckArgs {
    /// The URL to ask; default: /healthz on the configured server.bind.
    #[arg(long)]
    url: Option<String>,
    /// A TOML file layered over the defaults, as for `serve`.
    #[arg(long, env = "VQCLIP_CONFIG")]
    config: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5.0)]
    timeout_seconds: f64,
}

/// The address to dial for a listen address: a wildcard listens on loopback too.
fn dial(bind: SocketAddr) -> SocketAddr {
    let ip = match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bind.port())
}

pub fn run(args: HealthcheckArgs) -> anyhow::Result<()> {
    let url = match args.url {
        Some(url) => url,
        None => {
            let config = Config::load(args.config.as_deref(), &Overrides::default())?;
            format!("http://{}/healthz", dial(config.server.bind))
        }
    };
    if !(args.timeout_seconds.is_finite() && args.timeout_seconds > 0.0) {
        bail!("--timeout-seconds must be a positive number of seconds");
    }
    let timeout = Duration::from_secs_f64(args.timeout_seconds);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let status = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        let response = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("{url} did not answer"))?;
        anyhow::Ok(response.status())
    })?;
    if !status.is_success() {
        bail!("{url} answered {status}");
    }
    println!("{url}: {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_binds_are_dialled_on_loopback() {
        let d = |s: &str| dial(s.parse().unwrap()).to_string();
        assert_eq!(d("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(d("[::]:9000"), "[::1]:9000");
        assert_eq!(d("10.1.2.3:80"), "10.1.2.3:80");
    }
}
