//! The in-process cost of the registry's hot and warm paths at fleet scale.
//!
//! - `heartbeat/{1k,1M}`: one heartbeat (random id of the fleet, TTL 30 s),
//!   on a fleet of 1k or 1,000,000 registered executors with two labels each,
//!   while the membership loop runs on a 2-worker tokio runtime (entries pop
//!   from the timing wheel and are re-armed, as in production).
//! - `register_one/{1k,1M}`: latency of one registration awaited alone
//!   (command → loop turn → store commit → insert, snapshot publish → reply);
//!   at 1M it includes publishing a snapshot of a 1M-member `imbl::OrdMap`.
//! - `register_batch_1024/{1k,1M}`: 1,024 registrations in flight at once;
//!   throughput in registrations per second.
//! - `read_1M/{schedulable_zone_eq,list_all}`: the scheduler's read
//!   (`schedulable` with one EQ selector, 1/8 of the fleet) and `list(None,
//!   &[])` at 1M.
//!
//! Registrations made by the register benches are deregistered (untimed)
//! after each batch, so the fleet size stays what the name says.
//!
//! Run: `cargo bench --bench heartbeat`.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a benchmark measures real time"
)]

mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use executor_registry::registry::Registration;
use support::{Fleet, HEARTBEAT_TTL, KeepAlive, XorShift, address, labels, report, selector};

const FLEET_SMALL: usize = 1_000;
const FLEET_LARGE: usize = 1_000_000;
/// Registrations in flight at once in the batch bench.
const BATCH: usize = 1_024;

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
        .configure_from_args();

    support::report_machine("start");
    for (label, n) in [("1k", FLEET_SMALL), ("1M", FLEET_LARGE)] {
        let fleet = Fleet::start(n);
        report(
            &format!("register {label} executors concurrently (4096 in flight)"),
            format!(
                "{:.2?} = {:.0}/s",
                fleet.registration_time,
                n as f64 / fleet.registration_time.as_secs_f64()
            ),
        );
        bench_heartbeat(&mut c, &fleet, label);
        bench_register(&mut c, &fleet, label);
        if n == FLEET_LARGE {
            bench_reads(&mut c, &fleet);
        }
        check_alive(&fleet);
    }
    support::report_machine("end");
    c.final_summary();
}

fn bench_heartbeat(c: &mut Criterion, fleet: &Fleet, label: &str) {
    fleet.refresh();
    let mut group = c.benchmark_group("heartbeat");
    group.throughput(Throughput::Elements(1));
    let ids = &fleet.ids;
    let registry = &fleet.registry;
    let mut rng = XorShift::new(7);
    group.bench_function(label, |b| {
        b.iter(|| {
            let id = &ids[rng.below(ids.len())];
            black_box(registry.heartbeat(black_box(id), HEARTBEAT_TTL)).is_ok()
        })
    });
    group.finish();
}

fn bench_register(c: &mut Criterion, fleet: &Fleet, label: &str) {
    fleet.refresh();
    let registry = &fleet.registry;
    let mut next = fleet.ids.len();

    let mut keep = KeepAlive::new();
    let mut group = c.benchmark_group("register_one");
    group.throughput(Throughput::Elements(1));
    group.bench_function(label, |b| {
        b.iter_custom(|iters| {
            keep.maybe(|| fleet.refresh());
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                next += 1;
                let registration = Registration {
                    name: "exec".into(),
                    address: address(next),
                    labels: labels(next),
                    owner: None,
                };
                let (entry, elapsed) = fleet.rt.block_on(async {
                    let started = Instant::now();
                    let entry = registry.register(registration).await;
                    (entry, started.elapsed())
                });
                timed += elapsed;
                let id = entry
                    .expect("registration succeeds")
                    .id()
                    .as_str()
                    .to_owned();
                fleet
                    .rt
                    .block_on(registry.deregister(&id))
                    .expect("deregistration succeeds");
            }
            timed
        })
    });
    group.finish();

    fleet.refresh();
    let mut group = c.benchmark_group("register_batch_1024");
    group.throughput(Throughput::Elements(1));
    group.bench_function(label, |b| {
        b.iter_custom(|iters| {
            keep.maybe(|| fleet.refresh());
            let mut timed = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let n = left.min(BATCH);
                let started = Instant::now();
                let ids = fleet.register(n, next);
                timed += started.elapsed();
                next += n;
                left -= n;
                fleet.deregister(ids);
            }
            timed
        })
    });
    group.finish();
}

fn bench_reads(c: &mut Criterion, fleet: &Fleet) {
    fleet.refresh();
    let registry = &fleet.registry;
    let selectors = [selector()];
    report(
        "schedulable(zone=zone-3) at 1M returns",
        registry.schedulable(&selectors).len(),
    );
    report(
        "list(None, []) at 1M returns",
        registry.list(None, &[]).0.len(),
    );
    let mut group = c.benchmark_group("read_1M");
    group.sampling_mode(criterion::SamplingMode::Flat);
    let mut keep = KeepAlive::new();
    group.bench_function("schedulable_zone_eq", |b| {
        b.iter_custom(|iters| {
            keep.maybe(|| fleet.refresh());
            let started = Instant::now();
            for _ in 0..iters {
                black_box(registry.schedulable(black_box(&selectors)).len());
            }
            started.elapsed()
        })
    });
    group.bench_function("list_all", |b| {
        b.iter_custom(|iters| {
            keep.maybe(|| fleet.refresh());
            let started = Instant::now();
            for _ in 0..iters {
                black_box(registry.list(None, black_box(&[])).0.len());
            }
            started.elapsed()
        })
    });
    group.finish();
}

/// After the benches, every executor of the fleet must still be alive: the
/// numbers above were measured on the fleet size they claim.
fn check_alive(fleet: &Fleet) {
    let failed = fleet
        .ids
        .iter()
        .filter(|id| fleet.registry.heartbeat(id, HEARTBEAT_TTL).is_err())
        .count();
    report(
        &format!(
            "fleet {} after the benches: failed heartbeats",
            fleet.ids.len()
        ),
        failed,
    );
    report("live count", fleet.registry.count(None));
}
