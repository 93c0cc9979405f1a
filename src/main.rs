//! `executor-registry`: the registry server (`serve`) and the operator CLI
//! (`ctl`, in [`ctl`]).

mod ctl;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use executor_registry::config::{ServeArgs, StoreKind};
use executor_registry::registry::Registry;
use executor_registry::server;
use executor_registry::store::{MembershipStore, MemoryStore, SqliteStore};

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
    let store: Box<dyn MembershipStore> = match args.store_kind()? {
        StoreKind::Memory => Box::new(MemoryStore::volatile()),
        StoreKind::Sqlite => Box::new(SqliteStore::open(&args.data_dir).with_context(|| {
            format!(
                "cannot open the store in {} (--data-dir)",
                args.data_dir.display()
            )
        })?),
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let metrics = executor_registry::metrics::install_with_tls(
        args.metrics_listen,
        security.metrics_tls.clone(),
    )
    .await
    .with_context(|| {
        format!(
            "cannot serve metrics on {} (--metrics-listen)",
            args.metrics_listen
        )
    })?;
    let (registry, task) = Registry::start(config, store, metrics.clone())
        .context("cannot load the membership store")?;
    let tls = match (&security.grpc.tls, &security.grpc.auth) {
        (None, _) => "off",
        (Some(_), server::Auth::Mutual { .. }) => "mutual",
        (Some(_), _) => "on",
    };
    let admin_token = matches!(security.grpc.auth, server::Auth::Token(_));
    tracing::info!(listen = %listener.local_addr()?, metrics = %args.metrics_listen, tls, admin_token, metrics_tls = security.metrics_tls.is_some(), "executor-registry serving");
    let options = server::ServeOptions {
        grace: args.shutdown_grace,
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
