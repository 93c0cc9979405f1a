//! Does counting slow a heartbeat? The same in-process heartbeat, in the
//! same run, on a registry reporting to the Prometheus adapter (a local
//! recorder, as `serve` installs globally) and on one reporting nowhere.
//!
//! `cargo bench --bench metrics_overhead`; compare the two medians.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a benchmark measures real time"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use executor_registry::metrics::{Metrics, builder};
use executor_registry::registry::MemoryStore;
use executor_registry::registry::{NoopObserver, Observer, Registration, Registry, RegistryConfig};

const FLEET: usize = 100_000;

fn fleet(
    runtime: &tokio::runtime::Runtime,
    observer: Arc<dyn Observer>,
) -> (Registry, Vec<String>) {
    runtime.block_on(async {
        let (registry, task) = Registry::start(
            RegistryConfig::default(),
            Box::new(MemoryStore::new()),
            observer,
        )
        .expect("in-memory store");
        std::mem::forget(task); // runs until the process ends
        let mut ids = Vec::with_capacity(FLEET);
        for chunk in 0..FLEET / 1_000 {
            let calls: Vec<_> = (0..1_000)
                .map(|i| {
                    let registry = registry.clone();
                    tokio::spawn(async move {
                        let registration = Registration {
                            name: "bench".into(),
                            address: format!("10.0.{}.{}:9000", chunk % 250, i % 250),
                            labels: vec![("zone".into(), "a".into()), ("gpu".into(), "no".into())],
                            owner: None,
                        };
                        registry
                            .register(registration)
                            .await
                            .expect("register")
                            .id()
                            .to_string()
                    })
                })
                .collect();
            for call in calls {
                ids.push(call.await.expect("join"));
            }
        }
        for id in &ids {
            registry
                .heartbeat(id, Some(Duration::from_secs(600)))
                .expect("first heartbeat");
        }
        (registry, ids)
    })
}

fn heartbeat_with_and_without_metrics(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let recorder = builder().expect("buckets").build_recorder();
    let metrics: Arc<dyn Observer> = Arc::new(Metrics::new(&recorder));
    let (off, off_ids) = fleet(&runtime, Arc::new(NoopObserver));
    let (on, on_ids) = fleet(&runtime, metrics);

    let mut group = c.benchmark_group("heartbeat_100k");
    group.measurement_time(Duration::from_secs(5));
    let mut i = 0usize;
    group.bench_function("metrics_off", |b| {
        b.iter(|| {
            i = (i + 7919) % FLEET;
            black_box(off.heartbeat(&off_ids[i], None)).expect("alive")
        })
    });
    let mut i = 0usize;
    group.bench_function("metrics_on", |b| {
        b.iter(|| {
            i = (i + 7919) % FLEET;
            black_box(on.heartbeat(&on_ids[i], None)).expect("alive")
        })
    });
    group.finish();
}

criterion_group!(benches, heartbeat_with_and_without_metrics);
criterion_main!(benches);
