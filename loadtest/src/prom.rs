//! Reading the registry's Prometheus text exposition (`/metrics`).
//!
//! A plain HTTP/1.0 GET over a TCP stream: the load test needs two gauges,
//! not an HTTP client.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The figures the load test reads from the server.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerSample {
    /// `process_resident_memory_bytes`.
    pub rss_bytes: f64,
    /// `registry_executors`, summed over statuses.
    pub executors: f64,
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: f64,
}

/// Fetches `url` (`http://host:port/path`) and reads a [`ServerSample`].
pub async fn sample(url: &str) -> anyhow::Result<ServerSample> {
    let text = fetch(url).await?;
    Ok(ServerSample {
        rss_bytes: sum(&text, "process_resident_memory_bytes")
            .context("no process_resident_memory_bytes in /metrics")?,
        executors: sum(&text, "registry_executors").unwrap_or(0.0),
        cpu_seconds: sum(&text, "process_cpu_seconds_total").unwrap_or(0.0),
    })
}

/// The body of an HTTP GET of `url`.
pub async fn fetch(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("metrics URL {url:?} must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let request = async {
        let mut conn = TcpStream::connect(authority).await?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .with_context(|| format!("GET {url} timed out"))?
        .with_context(|| format!("GET {url}"))?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET {url}: malformed HTTP response");
    };
    let code = head.split_whitespace().nth(1);
    if !head.starts_with("HTTP/1.") || code != Some("200") {
        bail!("GET {url}: {}", head.lines().next().unwrap_or_default());
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sum of every sample of metric `name` (any labels), or None if absent.
pub fn sum(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None // a longer name with this prefix
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP registry_executors live\n\
        # TYPE registry_executors gauge\n\
        registry_executors{status=\"initing\"} 3\n\
        registry_executors{status=\"running\"} 7\n\
        registry_executors_other 100\n\
        process_resident_memory_bytes 1.5e7\n";

    #[test]
    fn sums_samples_over_labels() {
        assert_eq!(sum(TEXT, "registry_executors"), Some(10.0));
        assert_eq!(
            sum(TEXT, "process_resident_memory_bytes"),
            Some(15_000_000.0)
        );
        assert_eq!(sum(TEXT, "absent"), None);
    }

    #[test]
    fn dechunks_a_chunked_body() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
