//! rollgate: a streaming reverse proxy that splits traffic across model versions,
//! measures every version in-line, and rolls a bad one back by swapping its routing table.
//!
//! # Layout
//!
//! Modules follow the flow of a request and the flow of a decision:
//!
//! - [`config`]: `file.rs` holds the raw serde structs (unknown keys are errors),
//!   `validate.rs` turns them into a validated [`config::Config`]; `check`, startup and
//!   reload all run the same pipeline.
//! - [`routing`]: `table.rs` is the immutable compiled routing table, `select.rs` the
//!   pin / sticky (weighted rendezvous) / weighted-random choice, `store.rs` the
//!   `ArcSwap` that publishes a new table with a new generation in one swap.
//! - [`proxy`]: `server.rs` accepts connections (HTTP/1.1 + h2c, optional TLS),
//!   `service.rs` routes, forwards, retries and records one request, `client.rs` holds the
//!   upstream connection pools, `body.rs` the streaming bodies, `headers.rs` header hygiene.
//! - [`telemetry`]: `recorder.rs` keeps per (route, version) counters and windowed
//!   histograms on the request path, `prom.rs` renders them as Prometheus metrics.
//! - [`evaluator`]: the tick task feeding each candidate's observations to change
//!   detectors (`detector.rs`: mixture Shiryaev-Roberts e-detectors, a false-alarm *rate*
//!   per 24 h and a delay that does not grow with uptime), the pure `rules::decide`, active
//!   health checks, and progressive rollouts that need evidence to advance.
//! - [`decision`]: the one owner of runtime state. Every change (rollback, promote,
//!   resume, weights, pause, rollout step, fault, reload, health flip) is a typed,
//!   serializable command validated against the current state under one lock, then
//!   swapped, persisted and recorded, in that order; its invariants are in its docs.
//! - [`control`]: the admin listener (`/healthz`, `/readyz`, `/metrics`, `/api/v1/*`),
//!   its browser safety, the audit log, alerts, reload.
//! - [`app`]: binds listeners, spawns tasks, drains on shutdown.
//! - [`mock`]: `rollgate mock-model`, a small OpenAI-compatible model server with runtime
//!   fault and score knobs, for the demo, the tests and first steps.

pub mod app;
pub mod cli;
pub mod config;
pub mod control;
pub mod decision;
pub mod demo;
pub mod drill;
pub mod evaluator;
pub mod fleet;
pub mod load;
pub mod mock;
pub mod proxy;
pub mod routing;
pub mod telemetry;
