//! Config rename to new table serving: the latency a user sees between `mv new.yaml
//! rollgate.yaml` (what an editor's save and a ConfigMap `..data` swap both amount to) and
//! the data plane routing with the new table.
//!
//! A real rollgate (`app::start`, its notify watcher, debounce, validation and swap) on
//! loopback; the bench renames a new file over the config and polls the live routing table
//! every 100 µs until the new generation is there. Prints p50 / p99 / max over the runs.
//!
//! `cargo bench --bench reload` runs 50 renames; under `cargo test` a smoke run of 3.

use std::time::{Duration, Instant};

use rollgate::app::{self, Listeners};
use rollgate::config::Config;

fn config_text(dir: &std::path::Path, marker: u32) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nstate_dir: {state}\n\
         versions:\n  v1:\n    endpoints: [http://127.0.0.1:9]\n    set_headers: {{x-marker: \"{marker}\"}}\n\
         routes:\n  - {{name: r, match: {{path_prefix: /}}, baseline: v1, split: {{v1: 100}}}}\n\
         evaluator: {{rules: {{health_failures: null}}}}\n",
        state = dir.join("state").display(),
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let runs = if full { 50 } else { 3 };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rollgate.yaml");
    std::fs::write(&path, config_text(dir.path(), 0)).expect("write config");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let latencies = runtime.block_on(async {
        let config = Config::load(&path).expect("valid config");
        let listeners = Listeners {
            data: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            health: None,
        };
        let running = app::start(config, listeners).await.expect("start");
        // Let the watcher settle before the first measured change.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut out = Vec::with_capacity(runs);
        for marker in 1..=runs as u32 {
            let before = running.store.load().generation;
            let staged = dir.path().join(".rollgate.yaml.new");
            std::fs::write(&staged, config_text(dir.path(), marker)).unwrap();
            let t0 = Instant::now();
            std::fs::rename(&staged, &path).unwrap();
            loop {
                if running.store.load().generation > before {
                    out.push(t0.elapsed());
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "reload not applied in 5 s"
                );
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            // Quiet gap so each rename is measured on its own, not coalesced by the debounce.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.shutdown().await;
        out
    });
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "config rename -> new table serving, {} renames: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        pct(0.5),
        pct(0.99),
        ms[ms.len() - 1]
    );
}
