//! A scheduler's view of the fleet built on `FleetView`: prints the live
//! executors and which of them can be given work (RUNNING), then every
//! change, until Ctrl-C.
//!
//! ```sh
//! cargo run --example scheduler -- http://127.0.0.1:10240
//! ```

use anyhow::Context;
use executor_registry::client::{DEFAULT_ENDPOINT, FleetChange, FleetView};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut endpoints: Vec<String> = std::env::args().skip(1).collect();
    if endpoints.is_empty() {
        endpoints.push(DEFAULT_ENDPOINT.to_owned());
    }
    let mut fleet = FleetView::connect(endpoints)
        .await
        .context("cannot watch the registry")?;
    let members = fleet.members();
    println!(
        "{} executors ({} schedulable) at revision {}",
        members.len(),
        members.running_len(),
        members.revision()
    );
    for member in members.iter() {
        println!(
            "  {} {} {:?} {:?}",
            member.id, member.address, member.status, member.labels
        );
    }
    loop {
        let change = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            change = fleet.next_change() => match change {
                Some(change) => change,
                None => break,
            },
        };
        let via = if change.is_resync() { " (resync)" } else { "" };
        let revision = change.revision();
        match change {
            FleetChange::Online { member, .. } => {
                println!(
                    "{revision} online  {} {} {:?} {:?}{via}",
                    member.id, member.address, member.status, member.labels
                );
            }
            FleetChange::Running { member, .. } => {
                println!("{revision} running {} {}{via}", member.id, member.address);
            }
            FleetChange::Offline { id, reason, .. } => {
                println!("{revision} offline {id} {reason:?}{via}");
            }
        }
        // What a scheduler places work on: RUNNING executors only.
        let now = fleet.members();
        println!(
            "  now {} executors, {} schedulable (resumed {}, resynced {})",
            now.len(),
            now.running_len(),
            fleet.resumes(),
            fleet.resyncs()
        );
    }
    Ok(())
}
