//! `executor-registry`: the registry server (`serve`) and the operator CLI
//! (`ctl`, in [`ctl`]).

mod ctl;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use executor_registry::config::{SecuritySetup, ServeArgs, StoreKind};
use executor_registry::registry::Registry;
use executor_registry::registry::{IDLE_AFTER, MembershipStore, MemoryStore};
use executor_registry::replica::ReplicaOptions;
use executor_registry::server;
use executor_registry::store::SqliteStore;

/// Membership and liveness registry for a fleet of executors.
#[derive(Debug, Parser)]
#[command(name = "executor-registry", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the registry server.
    Serve(Box<ServeArgs>),
    /// Inspect and manage a running registry (list, get, count, watch, deregister, guard).
    Ctl(ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        // The CLI prints to stdout for scripts: no log subscriber.
        Command::Ctl(args) => return ctl::run(args),
        Command::Serve(args) => args,
    };
    executor_registry::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(*args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.validate()?;
    let security = args.security()?;
    let store: Box<dyn MembershipStore> = match &args.store {
        StoreKind::Etcd(endpoints) => {
            let endpoints = endpoints.clone();
            return serve_replica(args, config, endpoints, security).await;
        }
        StoreKind::Memory => Box::new(MemoryStore::volatile()),
        StoreKind::Sqlite => Box::new(SqliteStore::open(&args.data_dir).with_context(|| {
            format!(
                "cannot open the store in {} (--data-dir)",
                args.data_dir.display()
            )
        })?),
    };
    let (listener, metrics) = listen(&args, security.metrics_tls.clone(), true).await?;
    let (registry, task) = Registry::start(config, store, metrics.clone())
        .context("cannot load the membership store")?;
    // Once the load's rows are freed and the store, idle, has shrunk the
    // page cache it loaded through: once, so no trim ever holds the
    // allocator's locks while the fleet heartbeats.
    tokio::spawn(async {
        tokio::time::sleep(AFTER_THE_LOAD).await;
        let _ = tokio::task::spawn_blocking(give_back_freed_memory).await;
    });
    let (tls, admin_token) = describe(&security.grpc);
    tracing::info!(listen = %listener.local_addr()?, metrics = %args.metrics_listen, tls, admin_token, metrics_tls = security.metrics_tls.is_some(), "executor-registry serving");
    let options = server::ServeOptions {
        grace: *args.shutdown_grace,
        limits: args.limits(),
    };
    let stopped = server::serve_secure(
        listener,
        registry,
        shutdown_signal(),
        options,
        security.grpc,
    )
    .await?;
    tracing::info!(?stopped, "gRPC server stopped; flushing the store");
    task.stop().await;
    metrics.flush();
    tracing::info!("bye");
    Ok(())
}

/// For the start-up log: TLS on the listener (`off`, `on`, `mutual`), and
/// whether the admin token guards it.
fn describe(security: &server::Security) -> (&'static str, bool) {
    let tls = match (&security.tls, &security.auth) {
        (None, _) => "off",
        (Some(_), server::Auth::Mutual { .. }) => "mutual",
        (Some(_), _) => "on",
    };
    (tls, matches!(security.auth, server::Auth::Token(_)))
}

/// Binds the gRPC listener and serves `/metrics` (over TLS with `metrics_tls`).
async fn listen(
    args: &ServeArgs,
    metrics_tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    leads: bool,
) -> anyhow::Result<(
    TcpListener,
    std::sync::Arc<executor_registry::metrics::Metrics>,
)> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let metrics =
        executor_registry::metrics::install_with_tls(args.metrics_listen, metrics_tls, leads)
            .await
            .with_context(|| {
                format!(
                    "cannot serve metrics on {} (--metrics-listen)",
                    args.metrics_listen
                )
            })?;
    Ok((listener, metrics))
}

/// When to give back what the load freed: after the store's idle shrink
/// of its page cache (`IDLE_AFTER` after its last work).
const AFTER_THE_LOAD: Duration = IDLE_AFTER.saturating_mul(3);

/// Returns memory the allocator holds free to the OS. After the load, the
/// store's rows (every executor, read before any became an entry) are
/// freed, but glibc keeps freed memory in its arenas, between the entries
/// allocated meanwhile: without this a registry restarted with 1M
/// executors holds about a quarter more memory than the one that
/// registered them, for good.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_back_freed_memory() {
    // SAFETY: malloc_trim takes no pointer and only releases free pages of
    // the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back_freed_memory() {}

/// One replica on etcd: campaigns, leads or forwards to the leader.
async fn serve_replica(
    args: ServeArgs,
    config: executor_registry::registry::RegistryConfig,
    endpoints: Vec<String>,
    security: SecuritySetup,
) -> anyhow::Result<()> {
    // Not the leader until elected (a single process leads from the start).
    let (listener, metrics) = listen(&args, security.metrics_tls.clone(), false).await?;
    let advertise = args.advertise_address.clone().unwrap_or_else(|| {
        listener
            .local_addr()
            .map_or_else(|_| args.listen.to_string(), |a| a.to_string())
    });
    let options = ReplicaOptions {
        endpoints,
        etcd_tls: security.etcd_tls.clone(),
        forwarding: security.forwarding.clone(),
        prefix: args.etcd_prefix.clone(),
        // etcd leases count whole seconds.
        lease: Duration::from_secs(args.leader_lease.as_secs_f64().ceil() as u64),
        advertise: advertise.clone(),
        config,
        limits: args.limits(),
    };
    let (front, replica) = executor_registry::replica::start(options, metrics.clone())
        .await
        .context("cannot start the replica (--store)")?;
    let (tls, admin_token) = describe(&security.grpc);
    tracing::info!(listen = %listener.local_addr()?, %advertise, metrics = %args.metrics_listen, tls, admin_token, metrics_tls = security.metrics_tls.is_some(), etcd_tls = security.etcd_tls.is_some(), "executor-registry replica serving");
    // At shutdown the server cancels this: the replica steps down, which
    // ends the streams it serves, so the server can drain.
    let streams_stop = CancellationToken::new();
    tokio::spawn({
        let streams_stop = streams_stop.clone();
        let replica_stop = replica.stop_token();
        async move {
            streams_stop.cancelled().await;
            replica_stop.cancel();
        }
    });
    let admin = executor_registry::replica::front::AdminFront(front.clone());
    let serving = server::Serving {
        streams_stop,
        grace: *args.shutdown_grace,
        max_concurrent_streams: Some(executor_registry::replica::MAX_FORWARDED_STREAMS),
        security: security.grpc,
        observer: metrics.clone(),
    };
    let stopped = server::serve_service(listener, front, admin, shutdown_signal(), serving).await?;
    tracing::info!(?stopped, "gRPC server stopped; stepping down");
    replica.stop().await;
    metrics.flush();
    tracing::info!("bye");
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
