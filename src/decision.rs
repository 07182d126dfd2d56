//! The one owner of runtime state: every change of what the routing table serves is a typed
//! [`Command`], applied here and nowhere else.
//!
//! Who issues commands: the evaluator (automatic rollbacks, rollout steps and promotes), the
//! admin API (manual rollback, promote, resume, weights, pause, faults), the reloader (a new
//! config file, [`Controller::reload`]) and the health checker (a recompile when endpoint
//! health flips, [`Controller::health_changed`]). A command received from another replica
//! would take exactly the same path: [`Controller::apply`] does not know or care who made it.
//!
//! # Invariants
//!
//! 1. **One order.** Commands are applied one at a time under one lock (`decisions`, a
//!    tokio mutex held across the persist and audit I/O on purpose: the persisted state and
//!    the audit log must follow the order of the swaps). The request path never takes it.
//! 2. **Validated against the current state.** A command is checked under that lock against
//!    the table and runtime state *as they are now*, not as they were when it was made. An
//!    automatic decision carries what it assumed ([`Expect`]): the baseline, the candidate's
//!    incarnation, the rollout step. If a manual promote, a pause or a reload landed in
//!    between, the command is refused as [`Refused::Stale`] and changes nothing.
//! 3. **Swap, persist, record, in that order, before anyone hears back.** The table swap is
//!    one `ArcSwap::store`; the runtime state is persisted (temp, fsync, rename); the audit
//!    record is appended and fsync'd. Only then does the caller get the record, and only
//!    then do drain and alerts begin, in a tracked follow-up task that writes a second
//!    record naming the first (`rollback_completed`, `rollback_id`). A SIGTERM right after
//!    a rollback therefore finds the quarantine on disk *and* its record; shutdown waits
//!    for the follow-ups ([`Controller::finish`]) so the alert goes out too.
//! 4. **Failures are evidence.** A persist failure does not undo a rollback (serving the bad
//!    version again would be worse); it is written into the record (`persist_error`) and
//!    sent as a critical alert, never only logged.
//! 5. **The file is the source of truth** (SPEC §5). A weight override or promoted baseline
//!    remembers the file's split and baseline it was made against ([`RouteBasis`]); a reload
//!    that changes either drops the route's overrides and names them in its record.
//!    A completed rollout remembers its plan, so the former baseline is never rolled out
//!    again until the file gives the route a new plan.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Config, RouteConfig, Severity, VersionName};
use crate::control::alerts::Alerts;
use crate::control::audit::Audit;
use crate::control::state;
use crate::evaluator::rules::Trigger;
use crate::routing::store::{Store, Swap};
use crate::routing::table::{LastCommand, RolloutProgress, Route, RouteBasis, RuntimeState, Table};
use crate::telemetry::prom::labels;

/// Bounds of a fault command (the admin API's, checked again on every replica).
const FAULT_LATENCY_MAX_MS: u64 = 60_000;
const FAULT_DURATION_MAX_MS: u64 = 3_600_000;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One change of runtime state, as made by its issuer. Serializable, with an id, so a
/// stream of them can be replicated and replayed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command (`cmd-` and 64 random bits in hex).
    pub id: String,
    /// When it was issued (Unix ms).
    pub issued_ms: u64,
    /// Who asked: `None` for rollgate's own decisions.
    pub operator: Option<String>,
    pub reason: Option<String>,
    #[serde(flatten)]
    pub action: Action,
}

/// What a command does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Quarantine `version`: weight 0 on every route.
    Rollback {
        route: Option<String>,
        version: VersionName,
        trigger: Trigger,
        /// What the evaluator measured, for the record (`metrics`, `evidence`).
        #[serde(default)]
        evidence: Value,
        #[serde(default)]
        expect: Option<Expect>,
    },
    /// `version` becomes the route's baseline at 100.
    Promote {
        route: String,
        version: VersionName,
        /// For a rollout's promote: the step it completes.
        #[serde(default)]
        expect_step: Option<usize>,
    },
    /// Lift `version`'s quarantine.
    Resume { version: VersionName },
    /// Replace the route's split at runtime (`reset`: back to the file's).
    Weights {
        route: String,
        #[serde(default)]
        weights: BTreeMap<VersionName, u32>,
        #[serde(default)]
        reset: bool,
    },
    /// Freeze or unfreeze automatic decisions for a route.
    Pause { route: String, paused: bool },
    /// A progressive rollout moves `version` to `steps[step]`.
    RolloutStep {
        route: String,
        version: VersionName,
        step: usize,
        weight: u32,
        /// The step in force when the decision was made (None: not started).
        expect_step: Option<usize>,
    },
    /// Inject a drill fault into `version`'s requests.
    Fault {
        version: VersionName,
        error_rate: f64,
        latency_ms: u64,
        duration_ms: u64,
    },
}

/// What an automatic decision assumed; checked again under the lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expect {
    /// The route's baseline when the candidate was judged.
    pub baseline: VersionName,
    /// The candidate's statistics incarnation that was judged.
    pub incarnation: u64,
    /// The fingerprints (candidate, baseline) the evidence is about: a reload that brings a
    /// new bundle in between makes the verdict stale, never a quarantine of the new bundle.
    #[serde(default)]
    pub fingerprints: Option<(String, String)>,
}

impl Command {
    /// A new command with a fresh id.
    pub fn new(action: Action, operator: Option<String>, reason: Option<String>) -> Self {
        Command {
            id: format!("cmd-{:016x}", fastrand::u64(..)),
            issued_ms: unix_ms(),
            operator,
            reason,
            action,
        }
    }

    fn automatic(&self) -> bool {
        self.operator.is_none()
    }
}

/// Why a command changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The state the decision assumed is gone (a promote, pause or reload came first).
    #[error("stale decision: {0}")]
    Stale(String),
    #[error("{0}")]
    Failed(String),
}

/// A validated command, ready to apply: the next runtime state and its record.
struct Plan {
    kind: &'static str,
    next: RuntimeState,
    fields: Map<String, Value>,
    rollback: Option<RollbackPlan>,
}

struct RollbackPlan {
    route: String,
    version: VersionName,
    to_version: String,
    trigger: Trigger,
}

/// A config file that swapped in: the generation now serving, and its audit record or why
/// none could be written.
#[derive(Debug)]
pub struct Reloaded {
    pub generation: u64,
    pub record: Result<Value, Unwritten>,
}

/// An audit record that could not be written: the error, and the fields it would have had
/// (they go out with the `audit_failed` alert and the answer instead).
#[derive(Debug)]
pub struct Unwritten {
    pub error: std::io::Error,
    pub fields: Map<String, Value>,
}

/// Applies every change of runtime state. See the module docs for its invariants.
pub struct Controller {
    pub store: Arc<Store>,
    pub audit: Arc<Audit>,
    pub alerts: Alerts,
    pub state_dir: PathBuf,
    decisions: tokio::sync::Mutex<()>,
    /// Drain-and-alert tasks still running; awaited on shutdown. Control path only.
    followups: Mutex<Vec<JoinHandle<()>>>,
    /// The evaluator's latest evidence, for status and the status page.
    view: arc_swap::ArcSwap<crate::evaluator::View>,
    /// Set when this replica is part of a fleet (SPEC section 10).
    fleet: std::sync::OnceLock<Arc<crate::fleet::Fleet>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

/// The identity of a rollout plan as the file gives it: rollout block, split and baseline.
/// A completed plan is not run again; a changed one is a new rollout.
pub fn rollout_plan(rc: &RouteConfig) -> Option<String> {
    let r = rc.rollout.as_ref()?;
    let text = format!("{:?}|{:?}|{:?}|{}", r.steps, r.hold, rc.split, rc.baseline);
    Some(format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    ))
}

/// The file's split and baseline of `rc`, as overrides remember them.
fn basis_of(rc: &RouteConfig) -> RouteBasis {
    RouteBasis {
        split: rc.split.iter().map(|(n, w)| (n.clone(), w.0)).collect(),
        baseline: rc.baseline.clone(),
    }
}

/// Weight overrides for `route` that replace its split: every version of the split at 0,
/// then `given`.
pub fn override_split(
    route: &Route,
    given: impl IntoIterator<Item = (VersionName, u32)>,
) -> BTreeMap<VersionName, u32> {
    let mut w: BTreeMap<VersionName, u32> = route
        .config
        .split
        .iter()
        .map(|(n, _)| (n.clone(), 0))
        .collect();
    w.extend(given);
    w
}

/// Weight overrides giving `candidate` `weight` and `baseline` the rest; every other
/// version of the route's split gets 0.
pub fn split_weights(
    route: &Route,
    candidate: &VersionName,
    weight: u32,
    baseline: &VersionName,
) -> BTreeMap<VersionName, u32> {
    let weight = weight.min(100);
    override_split(
        route,
        [
            (baseline.clone(), 100 - weight),
            (candidate.clone(), weight),
        ],
    )
}

/// Drops runtime state the new `config` makes void, returning what was dropped:
///
/// - routes and versions it no longer has (a quarantine of an absent version is *kept*:
///   the version may come back with the same bundle, SPEC §1);
/// - quarantines whose version changed fingerprint;
/// - overrides (weights, promoted baseline, rollout progress) of a route whose split or
///   baseline the file changed: the file wins (SPEC §5).
pub fn prune(state: &mut RuntimeState, config: &Config) -> Vec<String> {
    let mut dropped = Vec::new();
    state.quarantined.retain(|v, fingerprint| {
        let keep = config
            .version(v.as_str())
            .is_none_or(|vc| &vc.fingerprint == fingerprint);
        if !keep {
            tracing::info!(version = %v, "quarantine lifted: the version changed its fingerprint");
            dropped.push(format!("quarantine of {v} (new fingerprint)"));
        }
        keep
    });
    let route = |name: &str| config.routes.iter().find(|r| &*r.name == name);
    let route_has = |name: &str, v: &VersionName| {
        route(name).is_some_and(|r| r.split.iter().any(|(n, _)| n == v))
    };
    // The file wins over overrides made against a split or baseline it no longer says.
    let changed: Vec<String> = state
        .basis
        .iter()
        .filter(|(r, basis)| route(r).is_none_or(|rc| basis_of(rc) != **basis))
        .map(|(r, _)| r.clone())
        .collect();
    for r in changed {
        state.basis.remove(&r);
        if let Some(w) = state.weight_overrides.remove(&r) {
            dropped.push(format!("weights of route {r} ({w:?})"));
        }
        if let Some(b) = state.baselines.remove(&r) {
            dropped.push(format!("baseline {b} of route {r}"));
        }
        if let Some(p) = state.rollouts.remove(&r) {
            dropped.push(format!(
                "rollout of {} on route {r} at step {}",
                p.version, p.step
            ));
        }
    }
    let before = (
        state.baselines.len(),
        state.rollouts.len(),
        state.weight_overrides.len(),
    );
    state.baselines.retain(|r, v| route_has(r, v));
    state.rollouts.retain(|r, p| {
        route_has(r, &p.version) && route(r).and_then(rollout_plan) == Some(p.plan.clone())
    });
    state
        .weight_overrides
        .retain(|r, w| route(r).is_some() && w.keys().all(|v| route_has(r, v)));
    if before
        != (
            state.baselines.len(),
            state.rollouts.len(),
            state.weight_overrides.len(),
        )
    {
        dropped.push("overrides naming routes or versions the file no longer has".into());
    }
    state.paused.retain(|r| route(r).is_some());
    state.basis.retain(|r, _| route(r).is_some());
    state.rollouts_done.retain(|r, _| route(r).is_some());
    for rc in config.routes.iter() {
        let name = rc.name.to_string();
        // State files from before overrides remembered their basis: the file as it is now.
        let overridden =
            state.weight_overrides.contains_key(&name) || state.baselines.contains_key(&name);
        if overridden && !state.basis.contains_key(&name) {
            state.basis.insert(name.clone(), basis_of(rc));
        }
        // A promoted baseline with no rollout in progress is a finished rollout (state files
        // from before plans were remembered): never roll the former baseline out again.
        if let Some(plan) = rollout_plan(rc) {
            let promoted = state
                .baselines
                .get(&name)
                .is_some_and(|b| b != &rc.baseline);
            if promoted && !state.rollouts.contains_key(&name) {
                state.rollouts_done.entry(name).or_insert(plan);
            }
        }
    }
    dropped
}

/// The fleet's fields of a command's record: this replica, the one that decided, and the
/// command's place in the fleet's order (absent while the store was unreachable).
fn fleet_fields(f: &mut Map<String, Value>, via: Option<&crate::fleet::Via>) {
    if let Some(v) = via {
        f.insert("replica".into(), json!(v.replica));
        f.insert("origin_replica".into(), json!(v.origin));
        f.insert("fleet_seq".into(), json!(v.seq));
    }
}

fn err_kind(kind: std::io::ErrorKind, e: impl std::fmt::Display) -> Refused {
    match kind {
        std::io::ErrorKind::NotFound => Refused::NotFound(e.to_string()),
        _ => Refused::Failed(e.to_string()),
    }
}

fn route_of<'t>(table: &'t Table, name: &str) -> Result<&'t Route, Refused> {
    table
        .routes
        .iter()
        .find(|r| &*r.name == name)
        .ok_or_else(|| Refused::NotFound(format!("no route {name:?}")))
}

impl Controller {
    pub fn new(store: Arc<Store>, audit: Arc<Audit>, alerts: Alerts, state_dir: PathBuf) -> Self {
        Controller {
            store,
            audit,
            alerts,
            state_dir,
            decisions: tokio::sync::Mutex::new(()),
            followups: Mutex::new(Vec::new()),
            view: Default::default(),
            fleet: std::sync::OnceLock::new(),
        }
    }

    /// Joins this controller to a fleet: from now on commands go through it.
    pub fn set_fleet(&self, fleet: Arc<crate::fleet::Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// The fleet this replica belongs to, if any.
    pub fn fleet(&self) -> Option<&Arc<crate::fleet::Fleet>> {
        self.fleet.get()
    }

    /// Whether this replica's evaluator turns evidence into automatic decisions now (in a
    /// pooling fleet with the store up, only the lease holder does).
    pub fn decides(&self, comparison: Option<&str>) -> bool {
        self.fleet.get().is_none_or(|f| f.decides(comparison))
    }

    /// A rollback from the fleet of a bundle this replica does not serve (the version is
    /// absent, or here it is another bundle): its quarantine is kept with that bundle's
    /// fingerprint, for when it arrives, and recorded like any rollback.
    pub async fn quarantine_absent(
        &self,
        cmd: &Command,
        version: &VersionName,
        fingerprint: &str,
        via: &crate::fleet::Via,
    ) -> Result<Value, Refused> {
        let serial = self.decisions.lock().await;
        let mut next = self.store.runtime_state();
        if next.quarantined.contains_key(version) {
            return Err(Refused::Conflict(format!(
                "version {version} is already rolled back here"
            )));
        }
        next.quarantined
            .insert(version.clone(), fingerprint.to_string());
        let swap = self
            .store
            .update(None, move |s| *s = next)
            .map_err(|e| err_kind(e.kind(), format!("compiling the new table failed: {e}")))?;
        let mut f = Map::new();
        f.insert("automatic".into(), json!(cmd.automatic()));
        f.insert("initiated_by".into(), json!(cmd.operator));
        f.insert("reason".into(), json!(cmd.reason));
        if let Action::Rollback { trigger, .. } = &cmd.action {
            f.insert("trigger".into(), json!(trigger.as_str()));
        }
        f.insert("from_version".into(), json!(version.as_str()));
        f.insert("fingerprint".into(), json!(fingerprint));
        f.insert(
            "detail".into(),
            json!("this replica does not serve this bundle of the version: its quarantine holds for when it does"),
        );
        f.insert("command_id".into(), json!(cmd.id));
        f.insert("generation_before".into(), json!(swap.generation_before));
        f.insert("generation_after".into(), json!(swap.generation_after));
        fleet_fields(&mut f, Some(via));
        if let Err(e) = self.persist().await {
            f.insert("persist_error".into(), json!(e.to_string()));
        }
        let record = self.record_as("rollback", f, Some(&cmd.id)).await;
        drop(serial);
        record.map_err(|e| {
            Refused::Failed(format!("the rollback's record could not be written: {e}"))
        })
    }

    /// Checks `cmd` against the current state without applying it.
    pub fn check(&self, cmd: &Command) -> Result<(), Refused> {
        let table = self.store.load();
        if let Action::Fault { version, .. } = &cmd.action {
            return table
                .version(version)
                .map(|_| ())
                .ok_or_else(|| Refused::NotFound(format!("no version {version}")));
        }
        self.plan(cmd, &table, &self.store.runtime_state(), false)
            .map(|_| ())
    }

    /// Takes `state` (the fleet's) as the runtime state: pruned against this replica's
    /// file, swapped, persisted, and recorded as `fleet_sync` with what changed. Nothing is
    /// recorded when nothing changed.
    pub async fn adopt(
        &self,
        mut state: RuntimeState,
        mut fields: Map<String, Value>,
    ) -> std::io::Result<()> {
        let serial = self.decisions.lock().await;
        let config = self.store.config();
        let current = self.store.runtime_state();
        state.last_command = current.last_command.clone();
        let dropped = prune(&mut state, &config);
        if state == current {
            return Ok(());
        }
        let diff = |a: &RuntimeState, b: &RuntimeState| -> Value {
            json!({
                "quarantined": a.quarantined.keys().filter(|v| !b.quarantined.contains_key(*v)).map(|v| v.as_str()).collect::<Vec<_>>(),
            })
        };
        fields.insert("added".into(), diff(&state, &current));
        fields.insert("lifted".into(), diff(&current, &state));
        if !dropped.is_empty() {
            fields.insert("overrides_dropped".into(), json!(dropped));
        }
        let newly: Vec<VersionName> = state
            .quarantined
            .keys()
            .filter(|v| !current.quarantined.contains_key(*v))
            .cloned()
            .collect();
        let next = state;
        let swap = self.store.update(None, move |s| *s = next)?;
        // As after a rollback: judged afresh if resumed, never on the requests of before.
        let table = self.store.load();
        for m in table.routes.iter().flat_map(|r| r.members.iter()) {
            if newly.contains(&table.versions[m.version].name) {
                m.stats.new_incarnation();
            }
        }
        if let Err(e) = self.persist().await {
            tracing::error!(error = %e, "persisting the runtime state failed; it holds until restart");
            fields.insert("persist_error".into(), json!(e.to_string()));
        }
        fields.insert("generation_before".into(), json!(swap.generation_before));
        fields.insert("generation_after".into(), json!(swap.generation_after));
        tracing::warn!(?fields, "took the fleet's runtime state");
        self.record("fleet_sync", fields).await?;
        drop(serial);
        Ok(())
    }

    /// The evaluator's latest evidence per candidate and rollout.
    pub fn view(&self) -> Arc<crate::evaluator::View> {
        self.view.load_full()
    }

    pub(crate) fn set_view(&self, view: crate::evaluator::View) {
        self.view.store(Arc::new(view));
    }

    async fn persist(&self) -> std::io::Result<Duration> {
        let t = Instant::now();
        let snapshot = self.store.runtime_state();
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || state::save(&dir, &snapshot))
            .await
            .map_err(std::io::Error::other)??;
        Ok(t.elapsed())
    }

    /// Appends an audit record off the async threads.
    pub async fn record(
        &self,
        kind: &'static str,
        fields: Map<String, Value>,
    ) -> std::io::Result<Value> {
        self.record_as(kind, fields, None).await
    }

    /// [`record`](Self::record) with the fleet-wide id of `command_id`, if given.
    async fn record_as(
        &self,
        kind: &'static str,
        fields: Map<String, Value>,
        command_id: Option<&str>,
    ) -> std::io::Result<Value> {
        let audit = self.audit.clone();
        let command_id = command_id.map(str::to_string);
        tokio::task::spawn_blocking(move || audit.append_as(kind, fields, command_id.as_deref()))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Runs `f` in a task of its own, tracked like a follow-up, and answers its result: a
    /// caller that goes away (an admin client that disconnects, which makes hyper drop its
    /// request) neither cancels it half way nor leaves it unwaited for at shutdown
    /// ([`finish`](Self::finish)).
    pub(crate) async fn run_tracked<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.follow_up(async move {
            let _ = tx.send(f.await);
        });
        rx.await
            .map_err(|_| "its task ended without an answer".to_string())
    }

    /// Runs `f` after the current command, tracked so shutdown can wait for it.
    fn follow_up(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.followups.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(f));
    }

    /// Sends an alert in a tracked follow-up task (never on the caller's path).
    fn alert_later(self: &Arc<Self>, severity: Severity, payload: Value) {
        let this = self.clone();
        self.follow_up(async move {
            let hooks = this.store.config().alerts.webhooks.clone();
            this.alerts.send(&hooks, severity, &payload).await;
        });
    }

    /// Waits, up to `timeout`, for follow-ups (drains, alerts, their records) to finish.
    pub async fn finish(&self, timeout: Duration) {
        // Tasks that run on (a command or reload whose caller left) add follow-ups of their
        // own: taken again until none is left.
        let all = async {
            loop {
                let tasks =
                    std::mem::take(&mut *self.followups.lock().unwrap_or_else(|e| e.into_inner()));
                if tasks.is_empty() {
                    break;
                }
                for t in tasks {
                    let _ = t.await;
                }
            }
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!("shutdown: alert or drain follow-ups still running; giving up on them");
        }
    }

    /// Applies `cmd` (see the module docs). Returns the audit record, durable.
    pub async fn apply(self: &Arc<Self>, cmd: Command) -> Result<Value, Refused> {
        self.apply_at(cmd, Instant::now()).await
    }

    /// [`apply`](Self::apply) with the instant the decision began, for trip-to-swap. In a
    /// fleet, the command is published first and applied in the fleet's order.
    ///
    /// The work runs in a task of its own ([`run_tracked`](Self::run_tracked)): a caller
    /// that goes away (an admin client that disconnects) never leaves a change applied but
    /// unrecorded or unpublished, and shutdown waits for it.
    pub async fn apply_at(
        self: &Arc<Self>,
        cmd: Command,
        began: Instant,
    ) -> Result<Value, Refused> {
        let this = self.clone();
        self.run_tracked(async move {
            match this.fleet.get().cloned() {
                Some(f) => f.submit(&this, cmd, began).await,
                None => this.apply_local(cmd, began, None).await,
            }
        })
        .await
        .unwrap_or_else(|e| Err(Refused::Failed(format!("the command's task failed: {e}"))))
    }

    /// Applies `cmd` on this replica (see the module docs). `via`: how it came through the
    /// fleet, if it did; its record then carries the fleet-wide id, `replica`,
    /// `origin_replica` and `fleet_seq`.
    pub async fn apply_local(
        self: &Arc<Self>,
        cmd: Command,
        began: Instant,
        via: Option<&crate::fleet::Via>,
    ) -> Result<Value, Refused> {
        let decide = began.elapsed();
        let serial = self.decisions.lock().await;
        let table = self.store.load();
        let state = self.store.runtime_state();
        if let Action::Fault {
            version,
            error_rate,
            latency_ms,
            duration_ms,
        } = &cmd.action
        {
            // Faults live in the version's counters, not in the table: nothing to swap, but
            // the most harmful thing an operator can do leaves its record like any other.
            let v = table
                .version(version)
                .ok_or_else(|| Refused::NotFound(format!("no version {version}")))?;
            // Checked here too: a command from the fleet's log did not pass this admin API.
            if !(0.0..=1.0).contains(error_rate)
                || *latency_ms > FAULT_LATENCY_MAX_MS
                || *duration_ms > FAULT_DURATION_MAX_MS
            {
                return Err(Refused::Invalid(
                    "a fault's error_rate is 0 to 1, its latency at most 60s, its duration at most 1h".into(),
                ));
            }
            if via.is_some_and(|v| v.replay) {
                return Err(Refused::Conflict(
                    "the fault is already injected here".into(),
                ));
            }
            // A fault lasts from when it was issued, not from when a replica hears of it: a
            // replica that catches up late injects only what is left, or nothing.
            let left = cmd
                .issued_ms
                .saturating_add(*duration_ms)
                .saturating_sub(unix_ms())
                .min(*duration_ms);
            // (A duration of 0 clears the fault: always applied.)
            if left == 0 && *duration_ms > 0 {
                return Err(Refused::Stale("the fault's window has passed".into()));
            }
            let (latency, dur) = (
                Duration::from_millis(*latency_ms),
                Duration::from_millis(left),
            );
            let mut f = Map::new();
            f.insert("automatic".into(), json!(cmd.automatic()));
            f.insert("initiated_by".into(), json!(cmd.operator));
            f.insert("reason".into(), json!(cmd.reason));
            f.insert("version".into(), json!(version.as_str()));
            f.insert("error_rate".into(), json!(error_rate));
            f.insert("latency_ms".into(), json!(latency_ms));
            f.insert("duration_ms".into(), json!(duration_ms));
            f.insert("command_id".into(), json!(cmd.id));
            fleet_fields(&mut f, via);
            v.counters.faults.set(*error_rate, latency, dur);
            tracing::warn!(%version, error_rate, latency_ms, duration_ms, command = %cmd.id, "fault injected");
            let record = self
                .record_as("fault", f, via.map(|_| cmd.id.as_str()))
                .await;
            drop(serial);
            return record.map_err(|e| {
                Refused::Failed(format!(
                    "the fault is injected but its record could not be written: {e}"
                ))
            });
        }
        let remote = via.is_some_and(|v| v.origin != v.replica);
        let mut plan = self.plan(&cmd, &table, &state, remote)?;
        if via.is_some_and(|v| v.replay) {
            let mut next = plan.next.clone();
            next.last_command = state.last_command.clone();
            if next == state {
                return Err(Refused::Conflict("already in effect here".into()));
            }
            plan.fields.insert("replayed".into(), json!(true));
        }
        plan.next.last_command = Some(LastCommand {
            id: cmd.id.clone(),
            kind: plan.kind.to_string(),
            subject: json!({"route": plan.fields.get("route"),
                            "version": plan.fields.get("version").or(plan.fields.get("from_version"))}),
            after_seq: self.audit.last_seq(),
            fleet: via.and_then(|v| Some((v.epoch.clone()?, v.seq?))),
        });
        let in_flight_pairs = plan.rollback.as_ref().map(|rb| {
            table
                .routes
                .iter()
                .flat_map(|r| r.members.iter())
                .filter(|m| table.versions[m.version].name == rb.version)
                .map(|m| m.stats.clone())
                .collect::<Vec<_>>()
        });
        drop(table);
        let next = plan.next;
        let swap = self
            .store
            .update(None, move |s| *s = next)
            .map_err(|e| err_kind(e.kind(), format!("compiling the new table failed: {e}")))?;
        let trip_to_swap = began.elapsed();
        if let (Some(rb), Some(pairs)) = (&plan.rollback, &in_flight_pairs) {
            let m = &self.store.metrics;
            // One decision counts once in the fleet: triggered and trip-to-swap where it was
            // made; completed (a swap) on every replica.
            if !remote {
                m.rollback_triggered
                    .get_or_create(&labels(&[
                        ("route", &rb.route),
                        ("trigger", rb.trigger.as_str()),
                    ]))
                    .inc();
                m.rollback_duration.observe(trip_to_swap.as_secs_f64());
            }
            m.rollback_completed
                .get_or_create(&labels(&[("route", &rb.route)]))
                .inc();
            // Judged afresh if it is ever resumed: never on the requests of before.
            for p in pairs {
                p.new_incarnation();
            }
        }
        let persisted = self.persist().await;
        let mut fields = plan.fields;
        fields.insert("command_id".into(), json!(cmd.id));
        fleet_fields(&mut fields, via);
        fields.insert("generation_before".into(), json!(swap.generation_before));
        fields.insert("generation_after".into(), json!(swap.generation_after));
        if let Err(e) = &persisted {
            tracing::error!(kind = plan.kind, error = %e, "persisting the runtime state failed; it holds until restart");
            fields.insert("persist_error".into(), json!(e.to_string()));
        }
        if let Some(rb) = &plan.rollback {
            fields.insert(
                "trip_to_swap_us".into(),
                json!(trip_to_swap.as_micros() as u64),
            );
            fields.insert(
                "phases".into(),
                json!([
                    {"phase": "decide", "duration_us": decide.as_micros() as u64},
                    {"phase": "swap", "duration_us": (swap.compile + swap.swap).as_micros() as u64},
                    {"phase": "persist", "duration_us": persisted.as_ref().map_or(0, |d| d.as_micros() as u64)},
                ]),
            );
            tracing::warn!(route = %rb.route, version = %rb.version, trigger = rb.trigger.as_str(), trip_to_swap_us = trip_to_swap.as_micros() as u64, generation = swap.generation_after, "rolled back");
        }
        let record = self
            .record_or_alert(
                plan.kind,
                fields,
                via.map(|_| cmd.id.as_str()),
                Some(&cmd.id),
            )
            .await;
        drop(serial);
        let record = match record {
            Ok(r) => r,
            Err(u) => {
                return Err(Refused::Failed(format!(
                    "applied (generation {}) but the audit record could not be written: {}",
                    swap.generation_after, u.error
                )));
            }
        };
        if let Err(e) = &persisted {
            self.alert_later(
                Severity::Critical,
                json!({"kind": "persist_failed", "severity": "critical", "record": record["id"],
                       "error": e.to_string(),
                       "detail": "the change is live but will not survive a restart"}),
            );
        }
        if let (Some(rb), Some(pairs)) = (plan.rollback, in_flight_pairs) {
            self.rollback_followup(rb, pairs, record.clone(), swap, !remote);
        }
        Ok(record)
    }

    /// After a rollback's record: alert at once, then wait for the candidate's in-flight
    /// requests (bounded by `drain_timeout`) and record both results.
    fn rollback_followup(
        self: &Arc<Self>,
        rb: RollbackPlan,
        pairs: Vec<Arc<crate::telemetry::PairStats>>,
        record: Value,
        swap: Swap,
        alert: bool,
    ) {
        let this = self.clone();
        let drained: i64 = pairs.iter().map(|p| p.in_flight().max(0)).sum();
        self.follow_up(async move {
            let config = this.store.config();
            // In a fleet, the replica that decided sends the alert: one decision, one alert.
            let sent = if alert {
                let payload = json!({
                    "kind": "rollback", "severity": "warning", "id": record["id"],
                    "route": rb.route, "version": rb.version.as_str(), "to_version": rb.to_version,
                    "trigger": rb.trigger.as_str(), "reason": record["reason"],
                    "generation": swap.generation_after,
                    "replica": record["replica"],
                });
                this.alerts
                    .send(&config.alerts.webhooks, Severity::Warning, &payload)
                    .await
            } else {
                Vec::new()
            };
            let t = Instant::now();
            while pairs.iter().map(|p| p.in_flight().max(0)).sum::<i64>() > 0
                && t.elapsed() < config.drain_timeout
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut f = Map::new();
            f.insert("rollback_id".into(), record["id"].clone());
            f.insert("route".into(), json!(rb.route));
            f.insert("from_version".into(), json!(rb.version.as_str()));
            f.insert(
                "phases".into(),
                json!([{"phase": "drain", "duration_ms": t.elapsed().as_millis() as u64,
                        "drained_requests": drained}]),
            );
            f.insert(
                "alerts_sent".into(),
                serde_json::to_value(sent).unwrap_or_default(),
            );
            if let Err(e) = this.record("rollback_completed", f).await {
                tracing::error!(error = %e, "writing the rollback_completed record failed");
            }
        });
    }

    /// Validates `cmd` against the current table and state; the next state and its record.
    fn plan(
        &self,
        cmd: &Command,
        table: &Table,
        state: &RuntimeState,
        remote: bool,
    ) -> Result<Plan, Refused> {
        let mut next = state.clone();
        let mut f = Map::new();
        f.insert("automatic".into(), json!(cmd.automatic()));
        f.insert("initiated_by".into(), json!(cmd.operator));
        f.insert("reason".into(), json!(cmd.reason));
        let version_of = |name: &VersionName| {
            table
                .version(name)
                .ok_or_else(|| Refused::NotFound(format!("no version {name}")))
        };
        let baseline_of = |r: &Route| table.versions[r.baseline_member().version].name.clone();
        let in_split = |r: &Route, v: &VersionName| r.config.split.iter().any(|(n, _)| n == v);
        let kind = match &cmd.action {
            Action::Rollback {
                route,
                version,
                trigger,
                evidence,
                expect,
            } => {
                let v = version_of(version)?;
                if v.quarantined {
                    return Err(Refused::Conflict(format!(
                        "version {version} is already rolled back"
                    )));
                }
                let member = |r: &Route| {
                    r.members
                        .iter()
                        .any(|m| &table.versions[m.version].name == version)
                };
                let route = match route {
                    Some(name) => {
                        let r = route_of(table, name)?;
                        if !member(r) {
                            return Err(Refused::Invalid(format!(
                                "version {version} is not part of route {name}"
                            )));
                        }
                        r
                    }
                    // The first route where the version is a candidate, not the baseline.
                    None => table
                        .routes
                        .iter()
                        .filter(|r| member(r))
                        .find(|r| &baseline_of(r) != version)
                        .or_else(|| table.routes.iter().find(|r| member(r)))
                        .ok_or_else(|| {
                            Refused::Invalid(format!("version {version} serves no route"))
                        })?,
                };
                let baseline = baseline_of(route);
                if let Some(e) = expect {
                    if state.paused.contains(&*route.name) {
                        return Err(Refused::Stale(format!("route {} is paused", route.name)));
                    }
                    if e.baseline != baseline {
                        return Err(Refused::Stale(format!(
                            "the baseline of route {} is now {baseline}, not {}",
                            route.name, e.baseline
                        )));
                    }
                    let pair = route
                        .members
                        .iter()
                        .find(|m| &table.versions[m.version].name == version);
                    // Incarnations are this process's own: another replica's says nothing here.
                    if !remote && pair.is_some_and(|m| m.stats.incarnation() != e.incarnation) {
                        return Err(Refused::Stale(format!(
                            "{version} was rolled back and resumed since it was judged"
                        )));
                    }
                    let base_fp = &table.versions[route.baseline_member().version]
                        .config
                        .fingerprint;
                    if let Some((cand, base)) = &e.fingerprints {
                        if cand != &v.config.fingerprint || base != base_fp {
                            return Err(Refused::Stale(format!(
                                "the bundle of {version} or of its baseline changed since it was judged"
                            )));
                        }
                    }
                }
                if &baseline == version {
                    return Err(Refused::Conflict(format!(
                        "version {version} is the baseline of route {}: promote another version first",
                        route.name
                    )));
                }
                next.quarantined
                    .insert(version.clone(), v.config.fingerprint.clone());
                // A rollout of the version ends, and so do the weights its steps set: after a
                // resume the route serves the file's split and the rollout starts over.
                let rolling: Vec<String> = state
                    .rollouts
                    .iter()
                    .filter(|(_, p)| &p.version == version)
                    .map(|(r, _)| r.clone())
                    .collect();
                for r in &rolling {
                    next.rollouts.remove(r);
                    next.weight_overrides.remove(r);
                    if !next.baselines.contains_key(r) {
                        next.basis.remove(r);
                    }
                }
                f.insert("trigger".into(), json!(trigger.as_str()));
                f.insert("route".into(), json!(&*route.name));
                f.insert("from_version".into(), json!(version.as_str()));
                f.insert("to_version".into(), json!(baseline.as_str()));
                if cmd.reason.is_none() {
                    f.insert("reason".into(), json!("manual rollback via the admin API"));
                }
                if let Value::Object(ev) = evidence {
                    for (k, v) in ev {
                        f.insert(k.clone(), v.clone());
                    }
                }
                return Ok(Plan {
                    kind: "rollback",
                    next,
                    fields: f,
                    rollback: Some(RollbackPlan {
                        route: route.name.to_string(),
                        version: version.clone(),
                        to_version: baseline.to_string(),
                        trigger: *trigger,
                    }),
                });
            }
            Action::Promote {
                route,
                version,
                expect_step,
            } => {
                let r = route_of(table, route)?;
                let v = version_of(version)?;
                if !in_split(r, version) {
                    return Err(Refused::Invalid(format!(
                        "version {version} is not part of route {route}"
                    )));
                }
                if v.quarantined {
                    return Err(Refused::Conflict(format!(
                        "version {version} is rolled back: resume it first"
                    )));
                }
                let baseline = baseline_of(r);
                if cmd.automatic() {
                    let progress = state.rollouts.get(route);
                    if state.paused.contains(route)
                        || progress.map(|p| (&p.version, p.step))
                            != expect_step.map(|s| (version, s))
                    {
                        return Err(Refused::Stale(format!(
                            "the rollout of route {route} changed since the promote was decided"
                        )));
                    }
                }
                next.rollouts.remove(route);
                next.baselines.insert(route.clone(), version.clone());
                next.weight_overrides
                    .insert(route.clone(), split_weights(r, version, 100, &baseline));
                next.basis.insert(route.clone(), basis_of(&r.config));
                // A promote completes the route's rollout plan, manual or not: the former
                // baseline is not rolled out again until the file gives a new plan.
                if let Some(plan) = rollout_plan(&r.config) {
                    next.rollouts_done.insert(route.clone(), plan);
                }
                f.insert("route".into(), json!(route));
                f.insert("version".into(), json!(version.as_str()));
                f.insert("from_version".into(), json!(baseline.as_str()));
                "promote"
            }
            Action::Resume { version } => {
                let v = version_of(version)?;
                if !v.quarantined {
                    return Err(Refused::Conflict(format!(
                        "version {version} is not rolled back"
                    )));
                }
                next.quarantined.remove(version);
                f.insert("version".into(), json!(version.as_str()));
                "resume"
            }
            Action::Weights {
                route,
                weights,
                reset,
            } => {
                let r = route_of(table, route)?;
                let rolling = state.rollouts.contains_key(route) && !state.paused.contains(route);
                if *reset {
                    if !weights.is_empty() {
                        return Err(Refused::Invalid(
                            "give either weights or reset: true, not both".into(),
                        ));
                    }
                    next.weight_overrides.remove(route);
                    next.baselines.remove(route);
                    next.basis.remove(route);
                    next.rollouts.remove(route);
                    // Back to the file, rollout plan included: it runs again from its start.
                    next.rollouts_done.remove(route);
                    f.insert("reset".into(), json!(true));
                } else {
                    for name in weights.keys() {
                        if !in_split(r, name) {
                            return Err(Refused::Invalid(format!(
                                "version {name} is not part of route {route}"
                            )));
                        }
                    }
                    if weights.is_empty() || weights.values().all(|w| *w == 0) {
                        return Err(Refused::Invalid(
                            "at least one weight must be positive".into(),
                        ));
                    }
                    if weights.values().any(|w| *w > 1_000_000) {
                        return Err(Refused::Invalid("weights are at most 1000000".into()));
                    }
                    if rolling {
                        return Err(Refused::Conflict(format!(
                            "route {route} is rolling out: pause it first, or its next step would undo this"
                        )));
                    }
                    // On a paused rollout the operator takes over: the rollout ends here,
                    // and its plan does not start again until the file gives a new one.
                    if let Some(p) = next.rollouts.remove(route) {
                        next.rollouts_done.insert(route.clone(), p.plan.clone());
                        f.insert(
                            "rollout_stopped".into(),
                            json!({"version": p.version.as_str(), "step": p.step}),
                        );
                    }
                    // The weights given replace the split: versions not named get 0.
                    let w = override_split(r, weights.iter().map(|(k, v)| (k.clone(), *v)));
                    f.insert(
                        "weights".into(),
                        json!(w
                            .iter()
                            .map(|(k, v)| (k.to_string(), *v))
                            .collect::<BTreeMap<_, _>>()),
                    );
                    next.weight_overrides.insert(route.clone(), w);
                    next.basis.insert(route.clone(), basis_of(&r.config));
                }
                f.insert("route".into(), json!(route));
                f.insert("previous_weights".into(), json!(r.weights(table)));
                "weights"
            }
            Action::Pause { route, paused } => {
                route_of(table, route)?;
                if *paused {
                    next.paused.insert(route.clone());
                } else {
                    next.paused.remove(route);
                }
                f.insert("route".into(), json!(route));
                f.insert("paused".into(), json!(paused));
                "pause"
            }
            Action::RolloutStep {
                route,
                version,
                step,
                weight,
                expect_step,
            } => {
                let r = route_of(table, route)?;
                let v = version_of(version)?;
                let plan = rollout_plan(&r.config).ok_or_else(|| {
                    Refused::Stale(format!("route {route} has no rollout any more"))
                })?;
                let progress = state.rollouts.get(route);
                let current = progress.map(|p| (&p.version, p.step));
                if v.quarantined
                    || state.paused.contains(route)
                    || state.rollouts_done.get(route) == Some(&plan)
                    || current != expect_step.map(|s| (version, s))
                    || &baseline_of(r) == version
                {
                    return Err(Refused::Stale(format!(
                        "the rollout of route {route} changed since step {step} was decided"
                    )));
                }
                let baseline = baseline_of(r);
                next.rollouts.insert(
                    route.clone(),
                    RolloutProgress {
                        version: version.clone(),
                        step: *step,
                        since_ms: unix_ms(),
                        plan,
                    },
                );
                next.weight_overrides
                    .insert(route.clone(), split_weights(r, version, *weight, &baseline));
                next.basis.insert(route.clone(), basis_of(&r.config));
                f.insert("route".into(), json!(route));
                f.insert("version".into(), json!(version.as_str()));
                f.insert("step".into(), json!(step));
                f.insert("weight".into(), json!(weight));
                "rollout_step"
            }
            Action::Fault { .. } => unreachable!("faults are applied before planning"),
        };
        Ok(Plan {
            kind,
            next,
            fields: f,
            rollback: None,
        })
    }

    /// A new config file: prune the runtime state it voids, swap, persist, record. `fields`
    /// are the reload's own (cause, hashes); the record adds the overrides it dropped.
    ///
    /// `Err`: the table did not compile and nothing changed. Once it has swapped, the
    /// answer is `Ok` whatever follows: a record that cannot be written is logged, alerted
    /// ([`record_or_alert`](Self::record_or_alert)) and handed back in
    /// [`Reloaded::record`], never reported as a reload that did not happen.
    pub async fn reload(
        self: &Arc<Self>,
        config: Config,
        mut fields: Map<String, Value>,
    ) -> std::io::Result<Reloaded> {
        let serial = self.decisions.lock().await;
        let mut next = self.store.runtime_state();
        let dropped = prune(&mut next, &config);
        let swap = self.store.update(Some(config), move |s| *s = next)?;
        if let Err(e) = self.persist().await {
            tracing::error!(error = %e, "persisting the runtime state failed; it holds until restart");
            fields.insert("persist_error".into(), json!(e.to_string()));
        }
        if !dropped.is_empty() {
            tracing::warn!(?dropped, "config reload: the file changed what runtime overrides were made against; the file wins");
            fields.insert("overrides_dropped".into(), json!(dropped));
        }
        fields.insert("generation_before".into(), json!(swap.generation_before));
        fields.insert("generation_after".into(), json!(swap.generation_after));
        let record = self
            .record_or_alert("config_reload", fields, None, None)
            .await;
        drop(serial);
        Ok(Reloaded {
            generation: swap.generation_after,
            record,
        })
    }

    /// Appends a decision's record ([`record_as`](Self::record_as): `fleet_id`, the
    /// fleet-wide id if the decision came through the fleet). One that cannot be written is
    /// logged and alerted (`audit_failed`, critical, with the fields it would have had and
    /// the `command_id` if a command made it).
    pub async fn record_or_alert(
        self: &Arc<Self>,
        kind: &'static str,
        fields: Map<String, Value>,
        fleet_id: Option<&str>,
        command_id: Option<&str>,
    ) -> Result<Value, Unwritten> {
        let kept = fields.clone();
        self.record_as(kind, fields, fleet_id).await.map_err(|error| {
            tracing::error!(kind, %error, "writing the audit record failed");
            let mut alert = json!({"kind": "audit_failed", "severity": "critical",
                                   "record_kind": kind, "error": error.to_string(), "record": kept});
            if let Some(id) = command_id {
                alert["command_id"] = json!(id);
            }
            self.alert_later(Severity::Critical, alert);
            Unwritten {
                error,
                fields: kept,
            }
        })
    }

    /// Endpoint health flipped: recompile (degraded routes, fallback, gauges), record each
    /// route that became degraded, and alert off this path.
    pub async fn health_changed(self: &Arc<Self>) {
        let serial = self.decisions.lock().await;
        let before = self.store.load();
        if let Err(e) = self.store.update(None, |_| {}) {
            tracing::error!(error = %e, "recompiling after a health change failed");
            return;
        }
        let after = self.store.load();
        for r in after.routes.iter() {
            let was = before
                .routes
                .iter()
                .find(|b| b.name == r.name)
                .is_some_and(|b| b.degraded);
            if !r.degraded || was {
                continue;
            }
            let baseline = after.versions[r.baseline_member().version].name.to_string();
            tracing::error!(route = %r.name, %baseline, "route degraded: its baseline is unhealthy");
            let mut f = Map::new();
            f.insert("route".into(), json!(r.name.to_string()));
            f.insert("baseline".into(), json!(baseline));
            f.insert(
                "fallback".into(),
                json!(r.config.fallback.as_ref().map(|v| v.to_string())),
            );
            f.insert("generation".into(), json!(after.generation));
            let rec = self.record("degraded", f).await;
            if let Err(e) = &rec {
                tracing::error!(error = %e, "writing the degraded record failed");
            }
            self.alert_later(
                Severity::Critical,
                json!({"kind": "degraded", "severity": "critical", "route": r.name.to_string(),
                       "baseline": baseline, "id": rec.ok().map(|r| r["id"].clone())}),
            );
        }
        drop(serial);
    }

    /// At start-up: if the last command persisted in the state has no audit record (the
    /// process died between persist and record), write a `recovered` record saying so, so
    /// the state on disk is never without its evidence.
    pub async fn reconcile(&self) {
        let Some(last) = self.store.runtime_state().last_command else {
            return;
        };
        let audit = self.audit.clone();
        let id = last.id.clone();
        let after_seq = last.after_seq;
        let found = tokio::task::spawn_blocking(move || {
            // Its record follows the sequence number persisted with it (within the few
            // records other tasks may have written in between). A log that ends before that
            // number was archived or reset, and one whose records after it were rotated
            // away cannot tell: neither is evidence of a missing record.
            if audit.last_seq() < after_seq {
                return Ok(None);
            }
            audit.since_limited(after_seq, 1000).map(|(records, _)| {
                let first = records.first().and_then(crate::control::audit::record_seq);
                if first.is_some_and(|n| n > after_seq + 1) {
                    return None;
                }
                Some(records.iter().any(|r| r["command_id"] == id.as_str()))
            })
        })
        .await;
        if let Ok(Ok(Some(false))) = found {
            tracing::error!(command = %last.id, kind = %last.kind, "the last decision before the restart has no audit record; recording it as recovered");
            let mut f = Map::new();
            f.insert("command_id".into(), json!(last.id));
            f.insert("command_kind".into(), json!(last.kind));
            f.insert("subject".into(), last.subject);
            f.insert(
                "detail".into(),
                json!("this change was applied and persisted, but the process stopped before its audit record was written"),
            );
            if let Err(e) = self.record("recovered", f).await {
                tracing::error!(error = %e, "writing the recovered record failed");
            }
        }
    }

    /// A finished drill's result (from `rollgate drill`): one `drill` record of the fields
    /// the drill reports, nothing a client could use to forge another kind of record.
    pub async fn record_drill(&self, fields: Map<String, Value>) -> std::io::Result<Value> {
        let _serial = self.decisions.lock().await;
        self.record("drill", fields).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(split: &str, baseline: &str) -> Config {
        let yaml = format!(
            "versions:\n  stable: {{endpoints: [\"http://127.0.0.1:1\"]}}\n  next: {{endpoints: [\"http://127.0.0.1:2\"]}}\n\
             routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: {baseline}, split: {split}, rollout: {{steps: [10, 50, 100], hold: 5m}}}}\n"
        );
        Config::from_str(&yaml, std::path::Path::new("t.yaml")).unwrap()
    }

    #[test]
    fn a_promote_from_an_old_state_file_is_a_finished_rollout() {
        let c = config("{stable: 95, next: 5}", "stable");
        let mut s = RuntimeState::default();
        s.baselines.insert("chat".into(), "next".into());
        s.weight_overrides.insert(
            "chat".into(),
            [("stable".into(), 0), ("next".into(), 100)].into(),
        );
        assert!(prune(&mut s, &c).is_empty());
        assert_eq!(
            s.rollouts_done.get("chat"),
            rollout_plan(&c.routes[0]).as_ref()
        );
        assert_eq!(s.basis["chat"].baseline.as_str(), "stable");
        // The same file again (reformatted or not): nothing dropped, still done.
        assert!(prune(&mut s, &config("{stable: 95, next: 5}", "stable")).is_empty());
        assert_eq!(s.baselines["chat"].as_str(), "next");
    }

    #[test]
    fn a_changed_split_drops_the_overrides_and_names_them() {
        let mut s = RuntimeState::default();
        let c = config("{stable: 95, next: 5}", "stable");
        s.baselines.insert("chat".into(), "next".into());
        s.weight_overrides
            .insert("chat".into(), [("next".into(), 100)].into());
        s.basis.insert("chat".into(), basis_of(&c.routes[0]));
        let dropped = prune(&mut s, &config("{stable: 100, next: 0}", "stable"));
        assert_eq!(dropped.len(), 2, "{dropped:?}");
        assert!(s.baselines.is_empty() && s.weight_overrides.is_empty() && s.basis.is_empty());
    }

    #[test]
    fn a_quarantine_of_a_version_briefly_removed_from_the_file_holds() {
        let c = config("{stable: 95, next: 5}", "stable");
        let fp = c.version("next").unwrap().fingerprint.clone();
        let mut s = RuntimeState::default();
        s.quarantined.insert("next".into(), fp);
        let without = Config::from_str(
            "versions:\n  stable: {endpoints: [\"http://127.0.0.1:1\"]}\nroutes:\n  - {name: chat, match: {path_prefix: /}, baseline: stable, split: {stable: 100}}\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        prune(&mut s, &without);
        assert!(s.quarantined.contains_key(&VersionName::from("next")));
        prune(&mut s, &c);
        assert!(
            s.quarantined.contains_key(&VersionName::from("next")),
            "same bundle back: still quarantined"
        );
    }
}
