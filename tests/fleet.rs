//! The fleet (SPEC section 10) as users run it: a real `redis-server`, three (sometimes four)
//! real `rollgate run` processes naming the same store and fleet name, mock upstreams in this
//! process. Each test checks what an operator relies on: a decision made on one replica is
//! applied by every replica within a second and recorded once under one id; a replica that
//! starts later never routes to a quarantined version; a store that goes away costs no
//! request and no decision; junk in the store crashes nothing; concurrent commands end in one
//! order everywhere.
//!
//! Without `redis-server` installed these tests fail (they do not skip): `.ci/run` installs
//! it. The tests run one fleet at a time ([`SERIAL`]): three debug-build replicas per test on
//! a 2-core CI machine already keep it busy, and the timing claims (applied within 1 s) are
//! about rollgate, not about a machine running two fleets at once. When a test fails, the
//! replicas' logs are printed (see [`Fleet`]'s `Drop`).

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// One fleet at a time in this file (a tokio mutex: no poisoning when a test fails).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long after a decision every replica must have swapped (SPEC section 10).
const APPLY_BOUND: Duration = Duration::from_secs(1);

/// Manual decisions only: no statistical rule has the evidence it needs, ever.
const NO_AUTO: &str = "{interval: 100ms, min_requests: 1000000}";

/// The path every request of these tests uses (route `chat` matches `/`).
const CHAT: &str = "/v1/chat/completions";

/// A redis-server and the replicas of one fleet. Dropped while a test panics, it prints each
/// replica's log tail, so a failure in CI comes with its evidence.
struct Fleet {
    redis: RedisServer,
    yaml: String,
    r: Vec<Replica>,
    client: TestClient,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for r in &self.r {
            let text = r.stderr_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- replica {} (last {} log lines) ---\n{}",
                r.name(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// The config of every replica of a test: `body` holds `versions:` and `routes:`.
fn fleet_yaml(redis: &RedisServer, name: &str, pool: bool, evaluator: &str, body: &str) -> String {
    format!(
        "drain_timeout: 1s\n\
         evaluator: {evaluator}\n\
         fleet: {{store: \"{}\", name: {name}, pool: {pool}}}\n\
         {body}",
        redis.url()
    )
}

/// `stable` (the baseline) and `canary` at 50/50 on route `chat`: a leak to the canary shows
/// in a handful of requests.
fn two_versions(stable: &TestUpstream, canary: &TestUpstream) -> String {
    format!(
        "versions:\n  \
           stable: {{endpoints: [\"{}\"]}}\n  \
           canary: {{endpoints: [\"{}\"]}}\n\
         routes:\n  \
           - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 50, canary: 50}}}}\n",
        stable.http_url(),
        canary.http_url()
    )
}

impl Fleet {
    /// Starts redis and replicas r1, r2, r3 (at once: they race to seed the empty store) and
    /// waits until each sees the store and all three replicas.
    async fn start(name: &str, pool: bool, evaluator: &str, body: &str) -> Fleet {
        let redis = RedisServer::start().await;
        let yaml = fleet_yaml(&redis, name, pool, evaluator, body);
        let (a, b, c) = tokio::join!(
            Replica::start("r1", &yaml),
            Replica::start("r2", &yaml),
            Replica::start("r3", &yaml)
        );
        let fleet = Fleet {
            redis,
            yaml,
            r: vec![a, b, c],
            client: TestClient::http1(),
        };
        fleet.wait_formed(3).await;
        fleet
    }

    /// Until every replica's status shows the store up and `n` live replicas.
    async fn wait_formed(&self, n: usize) {
        assert_eventually!(
            self.statuses().await.iter().all(|s| {
                s["fleet"]["store_up"] == true
                    && s["fleet"]["replicas"].as_array().map(Vec::len) == Some(n)
            }),
            Duration::from_secs(10),
            "the fleet did not form: {:#?}",
            self.statuses().await
        );
    }

    /// Starts one more replica from the same config, fresh state_dir; returns its index.
    async fn add(&mut self, name: &str) -> usize {
        let r = Replica::start(name, &self.yaml).await;
        self.r.push(r);
        self.r.len() - 1
    }

    async fn status(&self, i: usize) -> Value {
        let r = self
            .client
            .get(&self.r[i].admin_url("/api/v1/status"))
            .await;
        assert_eq!(r.status, 200, "{}: status: {}", self.r[i].name(), r.text());
        r.json()
    }

    /// Every replica's status, fetched concurrently, in replica order.
    async fn statuses(&self) -> Vec<Value> {
        self.statuses_of(&(0..self.r.len()).collect::<Vec<_>>())
            .await
    }

    async fn statuses_of(&self, which: &[usize]) -> Vec<Value> {
        let mut set = tokio::task::JoinSet::new();
        for (k, &i) in which.iter().enumerate() {
            let url = self.r[i].admin_url("/api/v1/status");
            let name = self.r[i].name().to_string();
            let client = self.client.clone();
            set.spawn(async move {
                let r = client.get(&url).await;
                assert_eq!(r.status, 200, "{name}: status: {}", r.text());
                (k, r.json())
            });
        }
        let mut out = vec![Value::Null; which.len()];
        while let Some(j) = set.join_next().await {
            let (k, v) = j.expect("status task");
            out[k] = v;
        }
        out
    }

    /// A JSON POST on replica `i`'s admin API; must answer 200; the record.
    async fn post_ok(&self, i: usize, path: &str, body: Value) -> Value {
        let r = self.r[i].admin_post(path, &body.to_string()).await;
        assert_eq!(
            r.status,
            200,
            "{}: POST {path} {body}: {}",
            self.r[i].name(),
            r.text()
        );
        r.json()
    }

    /// The data-plane URLs of replicas `which`.
    fn urls(&self, which: &[usize]) -> Vec<String> {
        which.iter().map(|&i| self.r[i].url(CHAT)).collect()
    }

    fn all(&self) -> Vec<usize> {
        (0..self.r.len()).collect()
    }

    /// Waits until `cond` holds on every replica of `which`; how long each took.
    async fn until_each(
        &self,
        which: &[usize],
        within: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut took: Vec<Option<Duration>> = vec![None; which.len()];
        loop {
            let pending: Vec<usize> = (0..which.len()).filter(|&k| took[k].is_none()).collect();
            if pending.is_empty() {
                return took.into_iter().map(Option::unwrap).collect();
            }
            let idx: Vec<usize> = pending.iter().map(|&k| which[k]).collect();
            let statuses = self.statuses_of(&idx).await;
            let now = t0.elapsed();
            for (&k, s) in pending.iter().zip(&statuses) {
                if cond(s) {
                    took[k] = Some(now);
                }
            }
            if took.iter().any(Option::is_none) && t0.elapsed() > within {
                let names: Vec<&str> = pending.iter().map(|&k| self.r[which[k]].name()).collect();
                panic!("{what}: not on {names:?} within {within:?}: {statuses:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every record of replica `i`'s audit log, oldest first. Read while the replica may be
    /// appending: a last line not yet complete is left for the next read.
    fn audit(&self, i: usize) -> Vec<Value> {
        let path = self.r[i].state_dir().join("audit.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::with_capacity(lines.len());
        for (n, line) in lines.iter().enumerate() {
            match serde_json::from_str(line) {
                Ok(v) => out.push(v),
                Err(_) if n + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => panic!("{}: audit line {}: {e}: {line}", path.display(), n + 1),
            }
        }
        out
    }

    /// `kind` records of replica `i`'s audit log.
    fn records(&self, i: usize, kind: &str) -> Vec<Value> {
        self.audit(i)
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    /// One decision, one id: every replica of `which` holds exactly one `kind` record
    /// matching `pred`, all with the same `id`, each naming itself as `replica` and `origin`
    /// (when given) as `origin_replica`. Returns the id. A replica swaps its table before it
    /// writes the record (swap, persist, record): the records are waited for, briefly.
    async fn one_record_each(
        &self,
        which: &[usize],
        kind: &str,
        origin: Option<&str>,
        pred: impl Fn(&Value) -> bool,
    ) -> String {
        assert_eventually!(
            which
                .iter()
                .all(|&i| self.records(i, kind).iter().any(&pred)),
            Duration::from_secs(2),
            "a {kind} record missing on some replica of {:?}: {:#?}",
            which.iter().map(|&i| self.r[i].name()).collect::<Vec<_>>(),
            which.iter().map(|&i| self.audit(i)).collect::<Vec<_>>()
        );
        let mut id: Option<String> = None;
        for &i in which {
            let name = self.r[i].name();
            let found: Vec<Value> = self
                .records(i, kind)
                .into_iter()
                .filter(|r| pred(r))
                .collect();
            assert_eq!(
                found.len(),
                1,
                "{name}: expected exactly one {kind} record, got {found:#?}\nall records: {:#?}",
                self.audit(i)
            );
            let rec = &found[0];
            let this = rec["id"].as_str().expect("record id").to_string();
            assert_eq!(rec["replica"], name, "{name}: {rec:#}");
            if let Some(o) = origin {
                assert_eq!(rec["origin_replica"], o, "{name}: {rec:#}");
            }
            match &id {
                None => id = Some(this),
                Some(first) => assert_eq!(
                    &this, first,
                    "{name}: the {kind} record has another id than the first replica's"
                ),
            }
        }
        id.expect("at least one replica")
    }
}

fn quarantined(s: &Value, version: &str) -> bool {
    s["versions"].as_array().is_some_and(|vs| {
        vs.iter()
            .any(|v| v["name"] == version && v["quarantined"] == true)
    })
}

fn route<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no route {name} in {s:#}"))
}

/// The effective weights of `route_name` in a status.
fn weights(s: &Value, route_name: &str) -> BTreeMap<String, u64> {
    route(s, route_name)["weights"]
        .as_object()
        .expect("weights")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("weight")))
        .collect()
}

fn w(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// `n` requests spread evenly over `urls`, 8 at a time. Every one must answer 200; returns
/// how many each version answered (`x-rollgate-version`).
async fn spread(urls: &[String], n: usize) -> BTreeMap<String, usize> {
    let mut set = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let urls = urls.to_vec();
        set.spawn(async move {
            let client = TestClient::http1();
            let mut seen = Vec::new();
            for i in (worker..n).step_by(8) {
                let url = &urls[i % urls.len()];
                let r = client
                    .send(
                        request(http::Method::POST, url)
                            .header("content-type", "application/json")
                            .body(full(r#"{"model":"m"}"#))
                            .unwrap(),
                    )
                    .await;
                assert_eq!(r.status, 200, "{url}: {}", r.text());
                seen.push(r.version().unwrap_or("none").to_string());
            }
            seen
        });
    }
    let mut counts = BTreeMap::new();
    while let Some(j) = set.join_next().await {
        for v in j.expect("request task") {
            *counts.entry(v).or_insert(0) += 1;
        }
    }
    counts
}

/// Case 1: a manual rollback on r1 is applied by r2 and r3 within a second of the POST's
/// answer; no request through any replica reaches the version afterwards; each audit log
/// holds exactly one `rollback` record of it, under one id, with its own `replica` and
/// `origin_replica` r1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_rollback_on_one_replica_is_applied_by_all_within_a_second_under_one_id() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let f = Fleet::start(
        "manual-rollback",
        true,
        NO_AUTO,
        &two_versions(&stable, &canary),
    )
    .await;
    // Traffic reaches the canary through every replica before.
    for i in 0..3 {
        let seen = spread(&f.urls(&[i]), 40).await;
        assert!(
            seen.get("canary").copied().unwrap_or(0) > 0,
            "{}: {seen:?}",
            f.r[i].name()
        );
    }

    let rec = f
        .post_ok(
            0,
            "/api/v1/rollback",
            json!({"route": "chat", "version": "canary", "reason": "bad answers", "operator": "alice"}),
        )
        .await;
    let answered = Instant::now();
    let took = f
        .until_each(&[1, 2], Duration::from_secs(5), "canary quarantined", |s| {
            quarantined(s, "canary")
        })
        .await;
    let since_answer = answered.elapsed();
    eprintln!("rollback applied on r2, r3 after {took:?} (all checked by {since_answer:?})");
    for (name, t) in ["r2", "r3"].iter().zip(&took) {
        assert!(
            *t < APPLY_BOUND,
            "{name} applied the rollback {t:?} after r1 answered (bound {APPLY_BOUND:?})"
        );
    }
    assert!(
        quarantined(&f.status(0).await, "canary"),
        "r1 answered before it swapped"
    );
    assert_eq!(rec["kind"], "rollback", "{rec:#}");
    assert_eq!(rec["origin_replica"], "r1", "{rec:#}");

    // Nothing reaches the canary through any replica any more.
    let before = canary.request_count();
    let seen = spread(&f.urls(&f.all()), 300).await;
    assert_eq!(seen, BTreeMap::from([("stable".to_string(), 300)]));
    assert_eq!(
        canary.request_count(),
        before,
        "a request reached the canary"
    );

    let id = f
        .one_record_each(&f.all(), "rollback", Some("r1"), |r| {
            r["from_version"] == "canary"
        })
        .await;
    assert_eq!(rec["id"], id.as_str(), "r1's answer is its record");
    assert!(id.starts_with("rb-cmd-"), "a fleet-wide id: {id}");
    for i in 0..3 {
        let r = &f.records(i, "rollback")[0];
        assert_eq!(r["initiated_by"], "alice", "{r:#}");
        assert_eq!(r["reason"], "bad answers", "{r:#}");
        assert_eq!(r["trigger"], "manual", "{r:#}");
    }
}

/// Case 2: a replica that (re)starts after the rollback takes the fleet's state before it
/// serves: its first requests right after `/readyz` all go to the baseline. Three ways: r2
/// was down during the rollback and comes back on its stale state_dir; r4 is new; r3 comes
/// back with an empty state_dir (a pod on an emptyDir, rescheduled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_after_a_rollback_never_routes_to_the_version() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let mut f = Fleet::start(
        "late-joiner",
        true,
        NO_AUTO,
        &two_versions(&stable, &canary),
    )
    .await;
    f.r[1].kill();
    f.post_ok(0, "/api/v1/rollback", json!({"version": "canary"}))
        .await;
    f.until_each(&[0, 2], APPLY_BOUND, "canary quarantined", |s| {
        quarantined(s, "canary")
    })
    .await;
    let canary_before = canary.request_count();

    // r2: stale state_dir (no quarantine in it), a fleet cursor behind the store.
    f.r[1].restart().await;
    let first = spread(&f.urls(&[1]), 100).await;
    assert_eq!(
        first,
        BTreeMap::from([("stable".to_string(), 100)]),
        "r2, restarted on its stale state, served the canary"
    );
    // It caught up from the fleet's log: the decision's own record, under its id.
    f.one_record_each(&[0, 1, 2], "rollback", Some("r1"), |r| {
        r["from_version"] == "canary"
    })
    .await;

    // r4: a new replica, nothing on disk.
    let r4 = f.add("r4").await;
    let first = spread(&f.urls(&[r4]), 100).await;
    assert_eq!(
        first,
        BTreeMap::from([("stable".to_string(), 100)]),
        "a new replica served the canary"
    );

    // r3: restarted with its state_dir wiped.
    f.r[2].kill();
    let dir = f.r[2].state_dir().to_path_buf();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    f.r[2].restart().await;
    let first = spread(&f.urls(&[2]), 100).await;
    assert_eq!(
        first,
        BTreeMap::from([("stable".to_string(), 100)]),
        "r3, restarted with an empty state_dir, served the canary"
    );

    assert_eq!(
        canary.request_count(),
        canary_before,
        "a request reached the canary"
    );
    for s in f.statuses().await {
        assert!(quarantined(&s, "canary"), "{s:#}");
        assert_eq!(weights(&s, "chat"), w(&[("stable", 100), ("canary", 0)]));
    }
}

/// Case 3: the store goes away. Every replica keeps answering (no failed request) and shows
/// `store_up: false`; a rollback made on r2 meanwhile applies on r2 at once; when an empty
/// Redis comes back (a restarted Redis without persistence) the rollback reaches r1 and r3,
/// and what the fleet had decided before the outage (a weight override, a pause) holds on
/// every replica. Afterwards the fleet works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_replicas_serve_and_decide_and_publish_when_it_is_back() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let extra = TestUpstream::start("extra").await;
    let body = format!(
        "versions:\n  \
           stable: {{endpoints: [\"{}\"]}}\n  \
           canary: {{endpoints: [\"{}\"]}}\n  \
           extra: {{endpoints: [\"{}\"]}}\n\
         routes:\n  \
           - {{name: side, match: {{path_prefix: /side/}}, baseline: stable, split: {{stable: 100}}}}\n  \
           - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 50, canary: 25, extra: 25}}}}\n",
        stable.http_url(),
        canary.http_url(),
        extra.http_url()
    );
    let f = Fleet::start("store-down", true, NO_AUTO, &body).await;

    // Decided before the outage, on two different replicas.
    f.post_ok(
        0,
        "/api/v1/weights",
        json!({"route": "chat", "weights": {"stable": 20, "canary": 40, "extra": 40}}),
    )
    .await;
    f.post_ok(2, "/api/v1/pause", json!({"route": "side", "paused": true}))
        .await;
    let before = |s: &Value| {
        weights(s, "chat") == w(&[("stable", 20), ("canary", 40), ("extra", 40)])
            && route(s, "side")["state"] == "paused"
    };
    f.until_each(&f.all(), APPLY_BOUND, "weights and pause", before)
        .await;

    let loads: Vec<Load> = f
        .all()
        .iter()
        .map(|&i| Load::start(f.r[i].url(CHAT), 2))
        .collect();
    f.redis.stop();
    f.until_each(&f.all(), Duration::from_secs(5), "store_up false", |s| {
        s["fleet"]["store_up"] == false
    })
    .await;
    assert_eq!(f.r[0].metric("rollgate_fleet_store_up", &[]).await, 0.0);

    let t = Instant::now();
    let rec = f
        .post_ok(
            1,
            "/api/v1/rollback",
            json!({"route": "chat", "version": "canary", "reason": "outage test"}),
        )
        .await;
    let answered_in = t.elapsed();
    assert!(
        answered_in < APPLY_BOUND,
        "r2 took {answered_in:?} to answer with the store down"
    );
    assert!(
        quarantined(&f.status(1).await, "canary"),
        "r2 answered before it swapped"
    );
    assert_eq!(rec["origin_replica"], "r2", "{rec:#}");
    assert!(
        rec["fleet_seq"].is_null(),
        "not in the fleet's order yet: {rec:#}"
    );
    let s = f.status(1).await;
    assert_eq!(s["fleet"]["pending"], 1, "r2 queued its decision: {s:#}");
    // The others keep their state: they cannot know yet.
    for i in [0, 2] {
        assert!(!quarantined(&f.status(i).await, "canary"));
    }
    // Serving on for a moment without the store.
    let served = stable.request_count();
    assert_eventually!(
        stable.request_count() > served + 200,
        Duration::from_secs(10)
    );

    f.redis.start_again().await;
    let took = f
        .until_each(
            &[0, 2],
            Duration::from_secs(10),
            "canary quarantined",
            |s| quarantined(s, "canary"),
        )
        .await;
    eprintln!("the queued rollback reached r1, r3 {took:?} after the store came back");
    for (i, load) in loads.into_iter().enumerate() {
        let (sent, failed) = load.stop().await;
        assert_eq!(
            failed,
            0,
            "{}: {failed} of {sent} requests failed while the store was away",
            f.r[i].name()
        );
        assert!(sent > 50, "{}: only {sent} requests", f.r[i].name());
    }

    f.wait_formed(3).await;
    let after = |s: &Value| {
        quarantined(s, "canary")
            && weights(s, "chat") == w(&[("stable", 60), ("canary", 0), ("extra", 40)])
            && route(s, "side")["state"] == "paused"
            && s["fleet"]["pending"] == 0
    };
    f.until_each(
        &f.all(),
        Duration::from_secs(5),
        "state after the outage",
        after,
    )
    .await;
    assert!(
        !f.redis.keys("rollgate:*").await.is_empty(),
        "the store was not reseeded"
    );

    // One rollback record per replica, nowhere two.
    for i in 0..3 {
        let n = f
            .records(i, "rollback")
            .iter()
            .filter(|r| r["from_version"] == "canary")
            .count();
        assert!(n <= 1, "{}: {n} rollback records", f.r[i].name());
    }
    let rb = f.records(1, "rollback");
    assert_eq!(rb.len(), 1, "r2: {rb:#?}");
    assert_eq!(rb[0]["id"], rec["id"]);
    // Whether r1 and r3 also hold r2's record under its id depends on who reseeded the
    // store first: see the next test.

    // The fleet works again: a resume on r3 reaches everyone, recorded once each.
    let resumed = f
        .post_ok(2, "/api/v1/resume", json!({"version": "canary"}))
        .await;
    f.until_each(&f.all(), APPLY_BOUND, "canary resumed", |s| {
        !quarantined(s, "canary")
            && weights(s, "chat") == w(&[("stable", 20), ("canary", 40), ("extra", 40)])
    })
    .await;
    let id = f
        .one_record_each(&f.all(), "resume", Some("r3"), |r| r["version"] == "canary")
        .await;
    assert_eq!(resumed["id"], id.as_str());
}

/// Case 3, the record: a decision made on r2 while the store was away is one decision with
/// one id once the store is back, whichever replica reseeds the empty store first: r1 and r3
/// hold a `rollback` record under r2's id (not only a `fleet_sync` saying the quarantine
/// appeared). Three outages: r2 reseeds first (the others held with SIGSTOP until it has),
/// then r1 does, then whoever wins the race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_made_while_the_store_was_away_keeps_its_id_on_every_replica() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let f = Fleet::start(
        "outage-record",
        true,
        NO_AUTO,
        &two_versions(&stable, &canary),
    )
    .await;
    let epoch = "rollgate:{outage-record}:epoch";
    for (outage, first) in [Some(1), Some(0), None].into_iter().enumerate() {
        f.redis.stop();
        f.until_each(&f.all(), Duration::from_secs(5), "store_up false", |s| {
            s["fleet"]["store_up"] == false
        })
        .await;
        let rec = f
            .post_ok(1, "/api/v1/rollback", json!({"version": "canary"}))
            .await;
        let others: Vec<&Replica> = match first {
            Some(k) => (0..3).filter(|&i| i != k).map(|i| &f.r[i]).collect(),
            None => Vec::new(),
        };
        let held = Paused::new(&others);
        f.redis.start_again().await;
        if let Some(k) = first {
            assert_eventually!(
                !f.redis.cmd(&["GET", epoch]).await.is_null(),
                Duration::from_secs(5),
                "{} did not seed the store",
                f.r[k].name()
            );
            if k == 1 {
                f.until_each(&[1], Duration::from_secs(5), "r2 published", |s| {
                    s["fleet"]["pending"] == 0
                })
                .await;
            }
        }
        drop(held);
        f.until_each(
            &f.all(),
            Duration::from_secs(10),
            "canary quarantined",
            |s| quarantined(s, "canary") && s["fleet"]["pending"] == 0,
        )
        .await;
        let how: Vec<Vec<String>> = (0..3)
            .map(|i| {
                f.audit(i)
                    .iter()
                    .filter(|r| r["kind"] == "rollback" || r["kind"] == "fleet_sync")
                    .map(|r| format!("{} {} added {}", r["kind"], r["id"], r["added"]))
                    .collect()
            })
            .collect();
        eprintln!("outage {outage}: {how:#?}");
        f.one_record_each(&f.all(), "rollback", Some("r2"), |r| r["id"] == rec["id"])
            .await;
        f.post_ok(1, "/api/v1/resume", json!({"version": "canary"}))
            .await;
        f.until_each(&f.all(), APPLY_BOUND, "canary resumed", |s| {
            !quarantined(s, "canary")
        })
        .await;
    }
}

/// Case 4: a canary failing 8 % of requests against a clean baseline, with the load spread
/// evenly over three pooling replicas: rolled back everywhere, one decision (one `rollback`
/// record per replica, one shared id), and then no replica sends it a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_spread_over_the_fleet_is_rolled_back_once_everywhere() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Reply::FailFraction(0.08));
    // Latency rules off: sub-millisecond latencies on a loaded test machine are noise.
    let f = Fleet::start(
        "pooled",
        true,
        "{interval: 100ms, window: 30s, min_requests: 50, rules: {latency_p99_ratio: null, latency_p99_max: null}}",
        &two_versions(&stable, &canary),
    )
    .await;
    let leaders: Vec<usize> = f
        .statuses()
        .await
        .iter()
        .enumerate()
        .filter(|(_, s)| s["fleet"]["leader"] == true)
        .map(|(i, _)| i)
        .collect();
    assert!(leaders.len() <= 1, "two evaluator leases: {leaders:?}");

    let loads: Vec<Load> = f
        .all()
        .iter()
        .map(|&i| Load::start(f.r[i].url(CHAT), 2))
        .collect();
    let t = Instant::now();
    f.until_each(
        &f.all(),
        Duration::from_secs(20),
        "canary quarantined",
        |s| quarantined(s, "canary"),
    )
    .await;
    eprintln!(
        "rolled back everywhere {:?} after the load began",
        t.elapsed()
    );
    let at_rollback = canary.request_count();
    let served = stable.request_count();
    assert_eventually!(
        stable.request_count() > served + 300,
        Duration::from_secs(10)
    );
    for load in loads {
        load.stop().await;
    }
    // In-flight requests at the swap may still land.
    assert!(
        canary.request_count() <= at_rollback + 6,
        "the canary still gets traffic: {} after {at_rollback}",
        canary.request_count()
    );

    let id = f
        .one_record_each(&f.all(), "rollback", None, |r| {
            r["from_version"] == "canary"
        })
        .await;
    let rec = &f.records(0, "rollback")[0];
    assert_eq!(rec["automatic"], true, "{rec:#}");
    let origin = rec["origin_replica"].as_str().unwrap().to_string();
    for i in 0..3 {
        assert_eq!(
            f.records(i, "rollback")[0]["origin_replica"],
            origin.as_str()
        );
    }
    eprintln!("one decision {id} by {origin}: {}", rec["reason"]);
    // Pooled: the decision weighed more canary answers than the deciding replica saw itself.
    let own = rec["metrics"]["candidate"]["requests"].as_u64().unwrap();
    let pooled = rec["evidence"]["requests"].as_u64().unwrap();
    eprintln!("evidence on {pooled} canary answers, {own} of them through {origin}");
    assert_eq!(rec["evidence"]["pooled"], true, "{rec:#}");
    assert!(
        pooled as f64 > 1.5 * own as f64,
        "the decision was not made on the fleet's pooled counts: {rec:#}"
    );
}

/// Case 4, without pooling: every replica judges its own third of the traffic and they trip
/// at about the same time; the claim in the store makes it one decision all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_tripping_at_once_on_their_own_counts_make_one_decision() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let f = Fleet::start(
        "unpooled",
        false,
        "{interval: 100ms, window: 30s, min_requests: 30, rules: {latency_p99_ratio: null, latency_p99_max: null}}",
        &two_versions(&stable, &canary),
    )
    .await;
    // Each replica gathers evidence on a clean canary first, then it turns bad for all at
    // once: the three evaluators cross the line within a few ticks of each other.
    let loads: Vec<Load> = f
        .all()
        .iter()
        .map(|&i| Load::start(f.r[i].url(CHAT), 2))
        .collect();
    assert_eventually!(canary.request_count() >= 600, Duration::from_secs(10));
    canary.set(Reply::FailFraction(0.3));
    f.until_each(
        &f.all(),
        Duration::from_secs(15),
        "canary quarantined",
        |s| quarantined(s, "canary"),
    )
    .await;
    for load in loads {
        load.stop().await;
    }
    let id = f
        .one_record_each(&f.all(), "rollback", None, |r| {
            r["from_version"] == "canary"
        })
        .await;
    let origins: Vec<String> = (0..3)
        .map(|i| f.records(i, "rollback")[0]["origin_replica"].to_string())
        .collect();
    eprintln!("one decision {id}, origins {origins:?}");
    assert_eq!(
        f.records(0, "rollback")[0]["evidence"]["pooled"],
        false,
        "{:#}",
        f.records(0, "rollback")[0]
    );
}

/// Case 5: junk over every key rollgate keeps in the store (wrong types, garbage strings,
/// garbage log entries, a snapshot "x y") crashes nothing: every replica keeps answering,
/// status answers, and a manual rollback on one replica still reaches the others once the
/// fleet has reseeded the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_the_store_crashes_nothing_and_the_fleet_heals() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let extra = TestUpstream::start("extra").await;
    let mut f = Fleet::start(
        "junk",
        true,
        NO_AUTO,
        &three_versions(&stable, &canary, &extra),
    )
    .await;
    // Some of everything in the store: log entries, a snapshot, a rollback claim, counts.
    f.post_ok(0, "/api/v1/rollback", json!({"version": "extra"}))
        .await;
    f.until_each(&f.all(), APPLY_BOUND, "extra quarantined", |s| {
        quarantined(s, "extra")
    })
    .await;
    spread(&f.urls(&f.all()), 60).await;
    let prefix = "rollgate:{junk}:";
    let keys = f.redis.keys("rollgate:*").await;
    for k in [
        "epoch",
        "seq",
        "log",
        "snapshot",
        "seen",
        "leader",
        "claim:extra",
    ] {
        assert!(
            keys.contains(&format!("{prefix}{k}")),
            "no {k} among {keys:?}"
        );
    }

    // Answers and status on every replica, a burst of requests over all of them.
    async fn still_serving(f: &mut Fleet, what: &str) {
        for r in f.r.iter_mut() {
            assert!(r.is_running(), "{} exited after {what}", r.name());
        }
        let seen = spread(&f.urls(&f.all()), 60).await;
        assert_eq!(seen.get("extra"), None, "after {what}: {seen:?}");
        for s in f.statuses().await {
            assert!(quarantined(&s, "extra"), "after {what}: {s:#}");
        }
    }

    // 1. Garbage of the right types: log entries that are no command, a snapshot that is
    //    none, a heartbeat and counts that are no numbers.
    let seq: u64 = f
        .redis
        .cmd(&["GET", &format!("{prefix}seq")])
        .await
        .as_text()
        .unwrap()
        .parse()
        .unwrap();
    // In one transaction, as a writer that speaks the protocol would: log entries and the
    // sequence that covers them (entries beyond the sequence are foreign: a reseed).
    let log = format!("{prefix}log");
    let ids: Vec<String> = (1..=4).map(|k| format!("{}-1", seq + k)).collect();
    let seq_key = format!("{prefix}seq");
    let last = (seq + 4).to_string();
    let snapshot_key = format!("{prefix}snapshot");
    let seen_key = format!("{prefix}seen");
    let counts_key = format!("{prefix}counts");
    let launch = r#"{"origin":"evil","cmd":{"id":"cmd-1","action":"launch"}}"#;
    let nope = r#"{"origin":"evil","cmd":{"id":"cmd-2","issued_ms":1,"operator":"x","reason":null,"action":"rollback","route":null,"version":"nope","trigger":"manual"}}"#;
    let replies = f
        .redis
        .pipeline(&[
            &["MULTI"],
            &["XADD", &log, &ids[0], "c", "garbage{"],
            &["XADD", &log, &ids[1], "x", "y"],
            &["XADD", &log, &ids[2], "c", launch],
            &["XADD", &log, &ids[3], "c", nope],
            &["SET", &seq_key, &last],
            &["SET", &snapshot_key, "x y"],
            &["HSET", &seen_key, "ghost", "not-a-time"],
            &["HSET", &counts_key, "r1", "garbage"],
            &["HSET", &counts_key, "ghost", "{\"boot\":\"x\"}"],
            &["EXEC"],
        ])
        .await;
    let exec = replies.last().unwrap();
    assert!(
        exec.as_array()
            .is_some_and(|a| a.iter().all(|r| !matches!(r, RespValue::Error(_)))),
        "{replies:?}"
    );
    f.redis
        .cmd(&["PUBLISH", &format!("{prefix}wake"), "junk"])
        .await;
    // Every replica reads past the garbage (its cursor reaches the store's seq).
    f.until_each(
        &f.all(),
        Duration::from_secs(5),
        "cursor past the garbage",
        |s| s["fleet"]["seq"].as_u64() >= Some(seq + 4),
    )
    .await;
    still_serving(&mut f, "garbage entries").await;

    // 2. Every key overwritten with a value of the wrong type, all at once (MULTI/EXEC: no
    //    replica reseeds half-way through).
    let keys = f.redis.keys("rollgate:*").await;
    assert!(keys.len() >= 6, "{keys:?}");
    let mut types = Vec::new();
    for k in &keys {
        types.push(f.redis.cmd(&["TYPE", k]).await.as_text().unwrap());
    }
    let mut tx: Vec<Vec<&str>> = vec![vec!["MULTI"]];
    for (n, (k, ty)) in keys.iter().zip(&types).enumerate() {
        tx.push(vec!["DEL", k]);
        tx.push(match (ty.as_str(), n % 2) {
            ("string", 0) => vec!["HSET", k, "junk", "1"],
            ("string", _) => vec!["LPUSH", k, "junk"],
            ("stream", _) => vec!["LPUSH", k, "junk", "x y"],
            _ => vec!["SET", k, "junk"],
        });
    }
    tx.push(vec!["EXEC"]);
    let tx: Vec<&[&str]> = tx.iter().map(Vec::as_slice).collect();
    let replies = f.redis.pipeline(&tx).await;
    let exec = replies.last().unwrap();
    assert!(
        exec.as_array()
            .is_some_and(|a| a.iter().all(|r| !matches!(r, RespValue::Error(_)))),
        "{replies:?}"
    );
    f.redis
        .cmd(&["PUBLISH", &format!("{prefix}wake"), "x y"])
        .await;
    // Reseeded: the epoch is a string again and every replica sees the store.
    assert_eventually!(
        f.redis.cmd(&["TYPE", &format!("{prefix}epoch")]).await
            == RespValue::Simple("string".into()),
        Duration::from_secs(5),
        "the store was not reseeded: {:?}",
        f.redis.keys("rollgate:*").await
    );
    f.wait_formed(3).await;
    still_serving(&mut f, "wrong types").await;

    // The fleet still decides as one: a rollback on r3 reaches r1 and r2.
    f.post_ok(2, "/api/v1/rollback", json!({"version": "canary"}))
        .await;
    f.until_each(&[0, 1], APPLY_BOUND, "canary quarantined", |s| {
        quarantined(s, "canary")
    })
    .await;
    f.one_record_each(&f.all(), "rollback", Some("r3"), |r| {
        r["from_version"] == "canary"
    })
    .await;
    still_serving(&mut f, "the rollback").await;
    for r in &f.r {
        let log = r.stderr_text();
        assert!(!log.contains("panicked"), "{}: {log}", r.name());
    }
}

/// `stable` 50, `canary` 25, `extra` 25 on route `chat`.
fn three_versions(stable: &TestUpstream, canary: &TestUpstream, extra: &TestUpstream) -> String {
    format!(
        "versions:\n  \
           stable: {{endpoints: [\"{}\"]}}\n  \
           canary: {{endpoints: [\"{}\"]}}\n  \
           extra: {{endpoints: [\"{}\"]}}\n\
         routes:\n  \
           - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 50, canary: 25, extra: 25}}}}\n",
        stable.http_url(),
        canary.http_url(),
        extra.http_url()
    )
}

/// Case 5, one key at a time: a snapshot that is no snapshot (the right type, garbage
/// inside) must not let a replica that joins meanwhile serve a version the fleet rolled
/// back: it takes the quarantines some other way (the log, a repaired snapshot) before it
/// serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_joining_while_the_snapshot_is_garbage_still_takes_the_quarantines() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let extra = TestUpstream::start("extra").await;
    let mut f = Fleet::start(
        "garbage-snapshot",
        true,
        NO_AUTO,
        &three_versions(&stable, &canary, &extra),
    )
    .await;
    f.post_ok(0, "/api/v1/rollback", json!({"version": "extra"}))
        .await;
    f.until_each(&f.all(), APPLY_BOUND, "extra quarantined", |s| {
        quarantined(s, "extra")
    })
    .await;
    let snapshot = "rollgate:{garbage-snapshot}:snapshot";
    assert_eq!(
        f.redis.cmd(&["SET", snapshot, "x y"]).await,
        RespValue::ok()
    );
    let r4 = f.add("r4").await;
    let first = spread(&f.urls(&[r4]), 100).await;
    assert_eq!(
        first.get("extra"),
        None,
        "r4 joined while the snapshot was garbage and served the rolled-back version: {first:?}"
    );
    assert!(quarantined(&f.status(r4).await, "extra"));
}

/// Replica processes held with SIGSTOP while this lives (a replica whose heartbeat is late:
/// a CPU-throttled or paused pod), SIGCONT when it is dropped, also when the test fails.
struct Paused(Vec<u32>);

impl Paused {
    fn new(replicas: &[&Replica]) -> Paused {
        let pids: Vec<u32> = replicas
            .iter()
            .map(|r| r.pid().expect("a running replica"))
            .collect();
        for pid in &pids {
            let ok = std::process::Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -STOP {pid}");
        }
        Paused(pids)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

/// Case 5, one key at a time: a snapshot of the wrong type next to an intact `epoch`. A
/// replica that joins meanwhile still takes the fleet's quarantines before it serves, and the
/// key is repaired (the module docs: a key of the wrong type makes the replica reseed). The
/// other replicas are held (SIGSTOP) while r4 joins, so r4 is the first to find the damage,
/// every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_the_wrong_type_next_to_an_intact_epoch_is_repaired() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let extra = TestUpstream::start("extra").await;
    let mut f = Fleet::start(
        "wrong-snapshot",
        true,
        NO_AUTO,
        &three_versions(&stable, &canary, &extra),
    )
    .await;
    f.post_ok(0, "/api/v1/rollback", json!({"version": "extra"}))
        .await;
    f.until_each(&f.all(), APPLY_BOUND, "extra quarantined", |s| {
        quarantined(s, "extra")
    })
    .await;
    let held = Paused::new(&[&f.r[0], &f.r[1], &f.r[2]]);
    let snapshot = "rollgate:{wrong-snapshot}:snapshot";
    f.redis
        .pipeline(&[
            &["MULTI"],
            &["DEL", snapshot],
            &["HSET", snapshot, "junk", "1"],
            &["EXEC"],
        ])
        .await;
    let r4 = f.add("r4").await;
    let first = spread(&f.urls(&[r4]), 100).await;
    drop(held);
    assert_eq!(
        first.get("extra"),
        None,
        "r4 joined while the snapshot had the wrong type and served the rolled-back version: \
         {first:?}"
    );
    assert_eventually!(
        f.redis.cmd(&["TYPE", snapshot]).await == RespValue::Simple("string".into()),
        Duration::from_secs(5),
        "the snapshot was not repaired; r1 logged:\n{}",
        f.r[0]
            .stderr_text()
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // One fleet again: every replica, r4 included, holds the quarantine.
    f.until_each(&f.all(), Duration::from_secs(5), "extra quarantined", |s| {
        quarantined(s, "extra")
    })
    .await;
    for r in f.r.iter_mut() {
        assert!(r.is_running(), "{} exited", r.name());
    }
}

/// Case 5, one key at a time: a sequence of the wrong type next to an intact `epoch` does
/// not split the fleet: a rollback made afterwards still reaches every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_of_the_wrong_type_next_to_an_intact_epoch_does_not_split_the_fleet() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let f = Fleet::start("wrong-seq", true, NO_AUTO, &two_versions(&stable, &canary)).await;
    let seq = "rollgate:{wrong-seq}:seq";
    f.redis
        .pipeline(&[
            &["MULTI"],
            &["DEL", seq],
            &["HSET", seq, "junk", "1"],
            &["EXEC"],
        ])
        .await;
    let t = Instant::now();
    let rec = f
        .post_ok(1, "/api/v1/rollback", json!({"version": "canary"}))
        .await;
    f.until_each(
        &f.all(),
        Duration::from_secs(5),
        "canary quarantined",
        |s| quarantined(s, "canary"),
    )
    .await;
    eprintln!(
        "a rollback over a damaged seq reached every replica in {:?}",
        t.elapsed()
    );
    // r2 applied it at once and queued it; the others learn of it after a reseed, by the
    // command or with the snapshot (whether they then hold its record under its id is the
    // outage test's question): never twice.
    assert_eq!(f.records(1, "rollback").len(), 1, "{:#?}", f.audit(1));
    assert_eq!(f.records(1, "rollback")[0]["id"], rec["id"]);
    for i in [0, 2] {
        assert!(f.records(i, "rollback").len() <= 1, "{:#?}", f.audit(i));
    }
    f.wait_formed(3).await;
}

/// Case 5, one key at a time: a `leader` key nobody renews (a stray value without expiry)
/// must not stop the pooled fleet's automatic decisions: a failing canary is still rolled
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_leader_key_does_not_stop_automatic_rollbacks() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let f = Fleet::start(
        "stray-leader",
        true,
        "{interval: 100ms, window: 30s, min_requests: 30, rules: {latency_p99_ratio: null, latency_p99_max: null}}",
        &two_versions(&stable, &canary),
    )
    .await;
    assert_eq!(
        f.redis
            .cmd(&["SET", "rollgate:{stray-leader}:leader", "ghost"])
            .await,
        RespValue::ok()
    );
    canary.set(Reply::FailFraction(0.3));
    let loads: Vec<Load> = f
        .all()
        .iter()
        .map(|&i| Load::start(f.r[i].url(CHAT), 2))
        .collect();
    let t = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(15),
        f.until_each(
            &f.all(),
            Duration::from_secs(60),
            "canary quarantined",
            |s| quarantined(s, "canary"),
        ),
    )
    .await;
    for load in loads {
        load.stop().await;
    }
    let leaders: Vec<bool> = f
        .statuses()
        .await
        .iter()
        .map(|s| s["fleet"]["leader"] == true)
        .collect();
    assert!(
        outcome.is_ok(),
        "a canary failing 30 % was not rolled back in {:?} with a stray leader key \
         (replicas leading: {leaders:?}; the key holds {:?})",
        t.elapsed(),
        f.redis
            .cmd(&["GET", "rollgate:{stray-leader}:leader"])
            .await
    );
}

/// Case 6: promote, resume, weights (and reset), pause, a drill fault and the steps of a
/// progressive rollout made on one replica apply on all, each recorded once per replica
/// under one id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_decision_propagates_with_one_id() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let base = TestUpstream::start("base").await;
    let next = TestUpstream::start("next").await;
    let body = format!(
        "versions:\n  \
           stable: {{endpoints: [\"{}\"]}}\n  \
           canary: {{endpoints: [\"{}\"]}}\n  \
           base: {{endpoints: [\"{}\"]}}\n  \
           next: {{endpoints: [\"{}\"]}}\n\
         routes:\n  \
           - {{name: roll, match: {{path_prefix: /roll/}}, baseline: base, split: {{base: 95, next: 5}}, rollout: {{steps: [10, 50, 100], hold: 1s}}}}\n  \
           - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 90, canary: 10}}}}\n",
        stable.http_url(),
        canary.http_url(),
        base.http_url(),
        next.http_url()
    );
    let f = Fleet::start(
        "every-kind",
        true,
        "{interval: 100ms, window: 30s, min_requests: 10, rules: {latency_p99_ratio: null, latency_p99_max: null}}",
        &body,
    )
    .await;
    let all = f.all();

    /// Applies `body` at `path` on replica `on`, waits until `cond` holds everywhere, and
    /// checks the record: one per replica, one id, origin `on`.
    async fn step(
        f: &Fleet,
        on: usize,
        path: &str,
        body: Value,
        kind: &str,
        cond: impl Fn(&Value) -> bool,
    ) {
        let rec = f.post_ok(on, path, body.clone()).await;
        assert_eq!(rec["kind"], kind, "{rec:#}");
        let took = f
            .until_each(&f.all(), APPLY_BOUND, &format!("{path} {body}"), cond)
            .await;
        eprintln!("{kind} from {}: applied after {took:?}", f.r[on].name());
        let origin = f.r[on].name().to_string();
        let id = rec["id"].as_str().unwrap().to_string();
        let id2 = f
            .one_record_each(&f.all(), kind, Some(&origin), |r| r["id"] == id.as_str())
            .await;
        assert_eq!(id, id2);
    }

    step(
        &f,
        0,
        "/api/v1/weights",
        json!({"route": "chat", "weights": {"stable": 70, "canary": 30}}),
        "weights",
        |s| weights(s, "chat") == w(&[("stable", 70), ("canary", 30)]),
    )
    .await;
    step(
        &f,
        1,
        "/api/v1/pause",
        json!({"route": "chat", "paused": true}),
        "pause",
        |s| route(s, "chat")["state"] == "paused",
    )
    .await;
    step(
        &f,
        2,
        "/api/v1/pause",
        json!({"route": "chat", "paused": false}),
        "pause",
        |s| route(s, "chat")["state"] != "paused",
    )
    .await;
    step(
        &f,
        0,
        "/api/v1/weights",
        json!({"route": "chat", "reset": true}),
        "weights",
        |s| weights(s, "chat") == w(&[("stable", 90), ("canary", 10)]),
    )
    .await;
    step(
        &f,
        1,
        "/api/v1/rollback",
        json!({"version": "canary"}),
        "rollback",
        |s| quarantined(s, "canary") && weights(s, "chat") == w(&[("stable", 100), ("canary", 0)]),
    )
    .await;
    step(
        &f,
        2,
        "/api/v1/resume",
        json!({"version": "canary"}),
        "resume",
        |s| !quarantined(s, "canary") && weights(s, "chat") == w(&[("stable", 90), ("canary", 10)]),
    )
    .await;
    step(
        &f,
        0,
        "/api/v1/promote",
        json!({"route": "chat", "version": "canary"}),
        "promote",
        |s| {
            route(s, "chat")["baseline"] == "canary"
                && weights(s, "chat") == w(&[("stable", 0), ("canary", 100)])
        },
    )
    .await;
    // A drill fault has nothing to show in status: its record is the evidence.
    let fault = f
        .post_ok(
            1,
            "/api/v1/faults",
            json!({"version": "stable", "error_rate": 0.0, "latency": "1ms", "duration": "1s"}),
        )
        .await;
    let fault_id = fault["id"].as_str().unwrap().to_string();
    assert_eventually!(
        (0..3).all(|i| f
            .records(i, "fault")
            .iter()
            .any(|r| r["id"] == fault_id.as_str())),
        APPLY_BOUND
    );
    f.one_record_each(&all, "fault", Some("r2"), |r| r["id"] == fault_id.as_str())
        .await;

    // The rollout: step 0 (10 %) was taken at start-up by the lease holder; with traffic
    // spread over the fleet it steps to 50 %, then promotes, the same on every replica.
    f.until_each(&all, APPLY_BOUND, "rollout at 10 %", |s| {
        weights(s, "roll") == w(&[("base", 90), ("next", 10)])
    })
    .await;
    let loads: Vec<Load> = all
        .iter()
        .map(|&i| Load::start(f.r[i].url("/roll/v1/chat/completions"), 2))
        .collect();
    // Polled often enough to see each step on all three at once.
    f.until_each(&all, Duration::from_secs(10), "rollout at 50 %", |s| {
        weights(s, "roll") == w(&[("base", 50), ("next", 50)])
    })
    .await;
    f.until_each(&all, Duration::from_secs(10), "rollout promoted", |s| {
        route(s, "roll")["baseline"] == "next"
            && weights(s, "roll") == w(&[("base", 0), ("next", 100)])
    })
    .await;
    for load in loads {
        let (sent, failed) = load.stop().await;
        assert_eq!(failed, 0, "{failed} of {sent} failed");
    }
    // Step 0 was decided while the replicas were starting: one that joined after it took
    // it with the fleet's snapshot (a `fleet_sync` record), not as a `rollout_step` record.
    // Every decision made after the fleet formed is recorded once everywhere, one id.
    let step_ids = |i: usize, step: u64| -> Vec<String> {
        f.records(i, "rollout_step")
            .iter()
            .filter(|r| r["route"] == "roll" && r["step"] == step)
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let mut step0_ids = Vec::new();
    for i in 0..3 {
        let step0 = step_ids(i, 0);
        step0_ids.extend(step0.clone());
        let synced = !f.records(i, "fleet_sync").is_empty();
        assert!(
            step0.len() == 1 || (step0.is_empty() && synced),
            "{}: step 0 neither recorded once nor taken with the snapshot: {:#?}",
            f.r[i].name(),
            f.audit(i)
        );
    }
    step0_ids.dedup();
    assert_eq!(
        step0_ids.len(),
        1,
        "step 0 under several ids: {step0_ids:?}"
    );
    f.one_record_each(&all, "rollout_step", None, |r| {
        r["route"] == "roll" && r["step"] == 1 && r["weight"] == 50
    })
    .await;
    f.one_record_each(&all, "promote", None, |r| {
        r["route"] == "roll" && r["automatic"] == true
    })
    .await;
}

/// Case 7, busy replicas: commands published back to back through every replica's admin
/// API while their heartbeats run. A heartbeat that read the store's sequence just before
/// the replica applied newer commands must not be taken for a store that lost its data: no
/// replica takes
/// the snapshot again (no `fleet_sync` record after the fleet formed), none goes back to an
/// older state, none applies a command twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_publishing_back_to_back_never_mistake_their_progress_for_a_wiped_store() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let f = Fleet::start("busy", true, NO_AUTO, &two_versions(&stable, &canary)).await;
    let synced_before: Vec<usize> = (0..3).map(|i| f.records(i, "fleet_sync").len()).collect();
    let t = Instant::now();
    // Each replica sends bursts of three at once, so commands land in the store between a
    // replica's heartbeat and its next read of the log.
    let busy = |i: usize| {
        let f = &f;
        async move {
            let mut n = 0u64;
            while t.elapsed() < Duration::from_secs(3) {
                let body = |k: u64| {
                    let weight = 1 + (n + k + 33 * i as u64) % 99;
                    json!({"route": "chat", "weights": {"stable": 100 - weight, "canary": weight}})
                };
                tokio::join!(
                    f.post_ok(i, "/api/v1/weights", body(0)),
                    f.post_ok(i, "/api/v1/weights", body(1)),
                    f.post_ok(i, "/api/v1/weights", body(2))
                );
                n += 3;
            }
            n
        }
    };
    let (a, b, c) = tokio::join!(busy(0), busy(1), busy(2));
    let n = a + b + c;
    let n = n as usize;
    let counts = || -> Vec<usize> { (0..3).map(|i| f.records(i, "weights").len()).collect() };
    let missing = || -> Vec<String> {
        let ids = |i: usize| -> std::collections::BTreeSet<String> {
            f.records(i, "weights")
                .iter()
                .map(|r| r["command_id"].as_str().unwrap().to_string())
                .collect()
        };
        let all: std::collections::BTreeSet<String> = (0..3).flat_map(ids).collect();
        (0..3)
            .flat_map(|i| {
                let have = ids(i);
                let log = f.r[i].stderr_text();
                all.iter()
                    .filter(|c| !have.contains(*c))
                    .map(|c| {
                        let lines: Vec<&str> =
                            log.lines().filter(|l| l.contains(c.as_str())).collect();
                        format!("{} lacks {c}; its log about it: {lines:?}", f.r[i].name())
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eventually!(
        counts().iter().all(|&c| c >= n),
        Duration::from_secs(5),
        "{n} commands answered, weights records per replica: {:?}; {:#?}",
        counts(),
        missing()
    );
    for (i, &before) in synced_before.iter().enumerate() {
        let synced: Vec<Value> = f.records(i, "fleet_sync")[before..].to_vec();
        assert!(
            synced.is_empty(),
            "{} took the fleet's snapshot again in the middle of {n} commands: {synced:#?}",
            f.r[i].name()
        );
        let ids: Vec<String> = f
            .records(i, "weights")
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ids.len(),
            "{}: a command applied twice",
            f.r[i].name()
        );
        assert_eq!(ids.len(), n, "{}", f.r[i].name());
    }
    eprintln!("{n} commands ({a}, {b}, {c} from r1, r2, r3) in 3 s");
}

/// Case 7: replicas issuing conflicting weights at the same moment: every replica applies
/// them in one order, so all three end with the same effective weights, and their audit logs
/// list the same records in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_weights_end_identical_everywhere() {
    let _serial = SERIAL.lock().await;
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let f = Fleet::start("order", true, NO_AUTO, &two_versions(&stable, &canary)).await;
    let all = f.all();
    let rounds = 30u64;
    for round in 0..rounds {
        let a = json!({"route": "chat", "weights": {"stable": 100 - round, "canary": round + 1}});
        let b = json!({"route": "chat", "weights": {"stable": round + 1, "canary": 100 - round}});
        let c = json!({"route": "chat", "weights": {"stable": 50, "canary": 50 + round}});
        let (ra, rb, rc) = tokio::join!(
            f.post_ok(0, "/api/v1/weights", a.clone()),
            f.post_ok(1, "/api/v1/weights", b.clone()),
            f.post_ok(2, "/api/v1/weights", c.clone())
        );
        for r in [&ra, &rb, &rc] {
            assert_eq!(r["kind"], "weights", "{r:#}");
        }
        let candidates: Vec<BTreeMap<String, u64>> = [&a, &b, &c]
            .iter()
            .map(|x| {
                x["weights"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                    .collect()
            })
            .collect();
        // Each replica applies all three; they agree once all three are applied.
        let want = 3 * (round as usize + 1);
        let counts = || -> Vec<usize> { (0..3).map(|i| f.records(i, "weights").len()).collect() };
        let t = Instant::now();
        assert_eventually!(
            counts().iter().all(|&n| n == want),
            Duration::from_secs(10),
            "round {round}: not every replica applied the three commands: {:?} of {want}\n{:#?}",
            counts(),
            (0..3)
                .map(|i| f
                    .records(i, "weights")
                    .iter()
                    .map(|r| format!(
                        "{} seq {} fleet_seq {} origin {} gen {}",
                        r["id"],
                        r["seq"],
                        r["fleet_seq"],
                        r["origin_replica"],
                        r["generation_after"]
                    ))
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        assert!(
            t.elapsed() < APPLY_BOUND,
            "round {round}: applied everywhere only {:?} after the answers",
            t.elapsed()
        );
        let statuses = f.statuses().await;
        let first = weights(&statuses[0], "chat");
        for (i, s) in statuses.iter().enumerate() {
            assert_eq!(
                weights(s, "chat"),
                first,
                "round {round}: {} disagrees with r1",
                f.r[i].name()
            );
        }
        assert!(
            candidates.contains(&first),
            "round {round}: {first:?} is none of the commands {candidates:?}"
        );
    }
    // One order: the same ids in the same order, with increasing fleet_seq, everywhere; each
    // replica's own generations only grow.
    let order = |i: usize| -> Vec<String> {
        f.records(i, "weights")
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(order(0), order(1), "r1 and r2 applied in different orders");
    assert_eq!(order(0), order(2), "r1 and r3 applied in different orders");
    for i in all {
        let recs = f.records(i, "weights");
        for pair in recs.windows(2) {
            assert!(
                pair[0]["fleet_seq"].as_u64() < pair[1]["fleet_seq"].as_u64(),
                "{}: fleet_seq not increasing: {:#?}",
                f.r[i].name(),
                pair
            );
            assert!(
                pair[0]["generation_after"].as_u64() < pair[1]["generation_after"].as_u64(),
                "{}: generation not increasing: {:#?}",
                f.r[i].name(),
                pair
            );
        }
    }
}
