//! Micro-benchmarks of the request path's two hot decisions: which version serves a
//! request (`select`), and recording its outcome (`record`).
//!
//! Run: `cargo bench --bench micro` (HTML-free; criterion prints per-bench times).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rollgate::routing::select::{self, Candidate};
use rollgate::telemetry::recorder::PairStats;
use rollgate::telemetry::Class;

struct M {
    weight: u32,
    seed: u64,
}

impl Candidate for M {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn seed(&self) -> u64 {
        self.seed
    }
}

fn members(weights: &[u32]) -> Vec<M> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| M {
            weight: *w,
            seed: select::name_seed(&format!("v{i}")),
        })
        .collect()
}

fn bench_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    g.throughput(Throughput::Elements(1));
    let two = members(&[95, 5]);
    let four = members(&[70, 20, 10, 0]);
    let key = b"user-4f9c2a7e-1b3d-4a55-9e0f-3c2b1a0d9e8f";
    g.bench_function("rendezvous_2_versions", |b| {
        b.iter(|| select::rendezvous(black_box(&two), black_box(key)))
    });
    g.bench_function("rendezvous_4_versions", |b| {
        b.iter(|| select::rendezvous(black_box(&four), black_box(key)))
    });
    let cumulative = [70u32, 90, 100, 100];
    g.bench_function("weighted_random_4_versions", |b| {
        b.iter(|| select::weighted(black_box(&cumulative), fastrand::u32(0..100)))
    });
    g.finish();
}

fn bench_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    let stats = PairStats::new(Arc::from("chat"), "v2.5".into(), 8, Duration::from_secs(30));
    let ttfb = Some(Duration::from_micros(1800));
    let total = Duration::from_millis(42);
    g.bench_function("success_with_latencies", |b| {
        b.iter(|| {
            stats.record(
                black_box(Class::Success),
                black_box(200),
                black_box(ttfb),
                black_box(total),
            )
        })
    });
    g.bench_function("client_abort", |b| {
        b.iter(|| {
            stats.record(
                black_box(Class::ClientAbort),
                black_box(0),
                None,
                black_box(total),
            )
        })
    });
    // Two threads recording into the same (route, version), as two worker threads would.
    g.bench_function("success_two_threads", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters / 2 {
                            stats.record(Class::Success, 200, ttfb, total);
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_select, bench_record);
criterion_main!(benches);
