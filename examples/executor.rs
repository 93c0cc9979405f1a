//! An executor built on `Membership`: joins the registry, logs every change
//! of its membership state, and deregisters on Ctrl-C or SIGTERM.
//!
//! ```sh
//! cargo run --example executor -- --endpoint http://127.0.0.1:10240 \
//!     --name worker --address 127.0.0.1:9000 --label zone=a
//! ```
//!
//! `--id-file PATH` keeps the current id in a file (rewritten on every
//! change), for scripts such as `scripts/restart-soak.sh`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use executor_registry::client::{DEFAULT_ENDPOINT, Membership, MembershipOptions, MembershipState};

/// An example executor that only keeps its membership.
#[derive(Debug, Parser)]
struct Args {
    /// Registry endpoints (repeat or comma-separate), tried in turn.
    #[arg(
        long = "endpoint",
        env = "EXECUTOR_REGISTRY_ENDPOINT",
        default_value = DEFAULT_ENDPOINT,
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Prefix of the id.
    #[arg(long, default_value = "example")]
    name: String,
    /// Where this executor would serve.
    #[arg(long, default_value = "127.0.0.1:9000")]
    address: String,
    /// `key=value` label (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Keep the current id in this file.
    #[arg(long)]
    id_file: Option<PathBuf>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Writes `id` to `path` atomically (a reader never sees half an id).
fn write_id(path: &Path, id: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n")).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// Resolves at Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut options = MembershipOptions::new(&args.endpoints, &args.name, &args.address);
    options.labels = args.labels.into_iter().collect();

    let stop = stop_signal();
    tokio::pin!(stop);
    let membership = tokio::select! {
        joined = Membership::join(options) => joined.context("cannot join the registry")?,
        () = &mut stop => return Ok(()),
    };
    let mut state = membership.state();
    let initial = state.borrow_and_update().clone();
    tracing::info!(state = ?initial, "joined");
    if let (Some(path), Some(id)) = (&args.id_file, initial.id()) {
        write_id(path, id)?;
    }

    loop {
        tokio::select! {
            () = &mut stop => break,
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = state.borrow_and_update().clone();
                match &now {
                    MembershipState::Lost => tracing::warn!("lost: the registry no longer holds this executor"),
                    other => tracing::info!(state = ?other, "membership changed"),
                }
                if let (Some(path), Some(id)) = (&args.id_file, now.id()) {
                    write_id(path, id)?;
                }
            }
        }
    }
    tracing::info!("stopping: deregistering");
    membership.shutdown().await.context("cannot deregister")?;
    tracing::info!("deregistered; bye");
    Ok(())
}
