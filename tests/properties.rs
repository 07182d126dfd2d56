//! Property tests (issue #7, hardening), on the public API:
//!
//! - Config: arbitrary and mutated texts never panic the parser or the validator, and every
//!   error locates its problems; generated valid configs validate, keep the invariants
//!   validation promises, read the same from YAML and TOML, and round-trip through their
//!   effective document; a generated config with one defect is rejected at that defect's
//!   line and key.
//! - Version choice: every version with weight above 0 is reachable by the weighted choice
//!   and by sticky keys; weighted rendezvous hashing moves a key only toward a version that
//!   gained relative weight; the weighted random split converges to the weights; a rollback
//!   moves exactly the quarantined share to the baseline; a pin never routes outside its
//!   route, through the primitives and through the real request handler.
//! - The fuzz targets' seed corpora (`fuzz/corpus/<target>/*`) run through the same harness
//!   functions as `cargo fuzz`, on stable.
//!
//! Case counts are kept small so the file runs in a few seconds; raise them with
//! `PROPTEST_CASES=N` for a longer search.

mod fuzz_harness;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;
use rollgate::config::{Config, PinQuarantined, PinUnknown, VersionName};
use rollgate::routing::select::{self, Candidate, PinOutcome};
use rollgate::routing::table::Table;

use fuzz_harness::{
    check_config_text, compile, normalized, Expected, FuzzRequest, RouteOutcome, FUZZ_DIR,
};

/// `cases` cases, overridable with `PROPTEST_CASES`, and no regression files written.
fn cases(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn origin(ext: &str) -> PathBuf {
    Path::new(FUZZ_DIR).join(format!("rollgate.{ext}"))
}

// =======================================================================================
// Generated configs
// =======================================================================================

#[derive(Debug, Clone)]
struct GenVersion {
    name: String,
    endpoints: Vec<String>,
    set_header: Option<(String, String)>,
    bundle: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
enum GenSticky {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone)]
struct GenRoute {
    name: String,
    baseline: usize,
    /// `(version index, weight)`, version indices unique.
    split: Vec<(usize, u32)>,
    path_prefix: Option<String>,
    host: Option<String>,
    models: Vec<String>,
    sticky: Option<GenSticky>,
    fallback: Option<usize>,
    rollout: Option<Vec<u32>>,
    connect_ms: Option<u32>,
    max_body_kib: Option<u32>,
}

#[derive(Debug, Clone)]
struct GenConfig {
    versions: Vec<GenVersion>,
    routes: Vec<GenRoute>,
    pin_quarantined: PinQuarantined,
    pin_unknown: PinUnknown,
    interval_ms: Option<u32>,
    window_s: Option<u32>,
    confidence: Option<f64>,
}

/// A rendered config with the line of each interesting key (1-based), for located errors.
struct Rendered {
    text: String,
    lines: BTreeMap<String, u64>,
}

impl Rendered {
    fn new() -> Self {
        Rendered {
            text: String::new(),
            lines: BTreeMap::new(),
        }
    }
    fn line(&mut self, key: Option<String>, s: &str) {
        let n = self.text.matches('\n').count() as u64 + 1;
        if let Some(k) = key {
            self.lines.insert(k, n);
        }
        self.text.push_str(s);
        self.text.push('\n');
    }
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn pin_q(p: PinQuarantined) -> &'static str {
    match p {
        PinQuarantined::Baseline => "baseline",
        PinQuarantined::Honor => "honor",
        PinQuarantined::Reject => "reject",
    }
}

fn pin_u(p: PinUnknown) -> &'static str {
    match p {
        PinUnknown::Reject => "reject",
        PinUnknown::Ignore => "ignore",
    }
}

impl GenConfig {
    fn vname(&self, i: usize) -> &str {
        &self.versions[i].name
    }

    /// Block-style YAML, every string double-quoted.
    fn yaml(&self) -> Rendered {
        let mut r = Rendered::new();
        r.line(None, "listen: \"127.0.0.1:0\"");
        r.line(None, "admin: {listen: \"127.0.0.1:0\"}");
        r.line(
            None,
            &format!(
                "pin: {{quarantined: {}, unknown: {}}}",
                pin_q(self.pin_quarantined),
                pin_u(self.pin_unknown)
            ),
        );
        r.line(None, "evaluator:");
        r.line(None, "  min_requests: 1000000");
        if let Some(i) = self.interval_ms {
            r.line(None, &format!("  interval: \"{i}ms\""));
        }
        if let Some(w) = self.window_s {
            r.line(None, &format!("  window: \"{w}s\""));
        }
        if let Some(c) = self.confidence {
            r.line(None, &format!("  confidence: {c}"));
        }
        r.line(None, "versions:");
        for v in &self.versions {
            let key = format!("versions.{}", v.name);
            r.line(Some(key.clone()), &format!("  {}:", q(&v.name)));
            let eps: Vec<String> = v.endpoints.iter().map(|e| q(e)).collect();
            r.line(
                Some(format!("{key}.endpoints")),
                &format!("    endpoints: [{}]", eps.join(", ")),
            );
            if let Some((h, val)) = &v.set_header {
                r.line(None, &format!("    set_headers: {{{}: {}}}", q(h), q(val)));
            }
            if !v.bundle.is_empty() {
                let b: Vec<String> = v
                    .bundle
                    .iter()
                    .map(|(k, val)| format!("{}: {}", q(k), q(val)))
                    .collect();
                r.line(None, &format!("    bundle: {{{}}}", b.join(", ")));
            }
        }
        r.line(None, "routes:");
        for (i, rt) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            r.line(
                Some(format!("{key}.name")),
                &format!("  - name: {}", q(&rt.name)),
            );
            let mut m = Vec::new();
            if let Some(p) = &rt.path_prefix {
                m.push(format!("path_prefix: {}", q(p)));
            }
            if let Some(h) = &rt.host {
                m.push(format!("host: {}", q(h)));
            }
            if !rt.models.is_empty() {
                let ms: Vec<String> = rt.models.iter().map(|x| q(x)).collect();
                m.push(format!("model: [{}]", ms.join(", ")));
            }
            r.line(None, &format!("    match: {{{}}}", m.join(", ")));
            r.line(
                Some(format!("{key}.baseline")),
                &format!("    baseline: {}", q(self.vname(rt.baseline))),
            );
            let split: Vec<String> = rt
                .split
                .iter()
                .map(|(v, w)| format!("{}: {w}", q(self.vname(*v))))
                .collect();
            r.line(
                Some(format!("{key}.split")),
                &format!("    split: {{{}}}", split.join(", ")),
            );
            match &rt.sticky {
                Some(GenSticky::Header(h)) => r.line(
                    Some(format!("{key}.sticky")),
                    &format!("    sticky: {{header: {}}}", q(h)),
                ),
                Some(GenSticky::Cookie(c)) => r.line(
                    Some(format!("{key}.sticky")),
                    &format!("    sticky: {{cookie: {}}}", q(c)),
                ),
                None => {}
            }
            if let Some(f) = rt.fallback {
                r.line(
                    Some(format!("{key}.fallback")),
                    &format!("    fallback: {}", q(self.vname(f))),
                );
            }
            if let Some(steps) = &rt.rollout {
                let s: Vec<String> = steps.iter().map(u32::to_string).collect();
                r.line(
                    Some(format!("{key}.rollout")),
                    &format!("    rollout: {{steps: [{}], hold: \"5m\"}}", s.join(", ")),
                );
            }
            if let Some(ms) = rt.connect_ms {
                r.line(
                    Some(format!("{key}.timeouts")),
                    &format!("    timeouts: {{connect: \"{ms}ms\"}}"),
                );
            }
            if let Some(k) = rt.max_body_kib {
                r.line(None, &format!("    max_request_body: \"{k}KiB\""));
            }
        }
        r
    }

    /// The same config as TOML.
    fn toml(&self) -> String {
        let mut t = String::new();
        t.push_str("listen = \"127.0.0.1:0\"\n");
        t.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
        let _ = writeln!(
            t,
            "[pin]\nquarantined = \"{}\"\nunknown = \"{}\"",
            pin_q(self.pin_quarantined),
            pin_u(self.pin_unknown)
        );
        t.push_str("[evaluator]\nmin_requests = 1000000\n");
        if let Some(i) = self.interval_ms {
            let _ = writeln!(t, "interval = \"{i}ms\"");
        }
        if let Some(w) = self.window_s {
            let _ = writeln!(t, "window = \"{w}s\"");
        }
        if let Some(c) = self.confidence {
            let _ = writeln!(t, "confidence = {c:?}");
        }
        for v in &self.versions {
            let _ = writeln!(t, "[versions.{}]", q(&v.name));
            let eps: Vec<String> = v.endpoints.iter().map(|e| q(e)).collect();
            let _ = writeln!(t, "endpoints = [{}]", eps.join(", "));
            if let Some((h, val)) = &v.set_header {
                let _ = writeln!(t, "set_headers = {{{} = {}}}", q(h), q(val));
            }
            if !v.bundle.is_empty() {
                let b: Vec<String> = v
                    .bundle
                    .iter()
                    .map(|(k, val)| format!("{} = {}", q(k), q(val)))
                    .collect();
                let _ = writeln!(t, "bundle = {{{}}}", b.join(", "));
            }
        }
        for rt in &self.routes {
            t.push_str("[[routes]]\n");
            let _ = writeln!(t, "name = {}", q(&rt.name));
            let _ = writeln!(t, "baseline = {}", q(self.vname(rt.baseline)));
            let split: Vec<String> = rt
                .split
                .iter()
                .map(|(v, w)| format!("{} = {w}", q(self.vname(*v))))
                .collect();
            let _ = writeln!(t, "split = {{{}}}", split.join(", "));
            let mut m = Vec::new();
            if let Some(p) = &rt.path_prefix {
                m.push(format!("path_prefix = {}", q(p)));
            }
            if let Some(h) = &rt.host {
                m.push(format!("host = {}", q(h)));
            }
            if !rt.models.is_empty() {
                let ms: Vec<String> = rt.models.iter().map(|x| q(x)).collect();
                m.push(format!("model = [{}]", ms.join(", ")));
            }
            let _ = writeln!(t, "match = {{{}}}", m.join(", "));
            match &rt.sticky {
                Some(GenSticky::Header(h)) => {
                    let _ = writeln!(t, "sticky = {{header = {}}}", q(h));
                }
                Some(GenSticky::Cookie(c)) => {
                    let _ = writeln!(t, "sticky = {{cookie = {}}}", q(c));
                }
                None => {}
            }
            if let Some(f) = rt.fallback {
                let _ = writeln!(t, "fallback = {}", q(self.vname(f)));
            }
            if let Some(steps) = &rt.rollout {
                let s: Vec<String> = steps.iter().map(u32::to_string).collect();
                let _ = writeln!(t, "rollout = {{steps = [{}], hold = \"5m\"}}", s.join(", "));
            }
            if let Some(ms) = rt.connect_ms {
                let _ = writeln!(t, "timeouts = {{connect = \"{ms}ms\"}}");
            }
            if let Some(k) = rt.max_body_kib {
                let _ = writeln!(t, "max_request_body = \"{k}KiB\"");
            }
        }
        t
    }
}

fn gen_version(name: String) -> impl Strategy<Value = GenVersion> {
    let endpoint = (
        prop::sample::select(vec!["http", "https", "h2c"]),
        prop::sample::select(vec!["127.0.0.1", "localhost", "model-a.internal", "[::1]"]),
        1u16..,
    )
        .prop_map(|(s, h, p)| format!("{s}://{h}:{p}"));
    (
        prop::collection::vec(endpoint, 1..=3),
        prop::option::of(("x-[a-z]{1,8}", "[ -~]{0,12}")),
        prop::collection::btree_map("[a-z]{1,6}", "[a-zA-Z0-9 ._-]{0,10}", 0..3),
    )
        .prop_map(move |(endpoints, set_header, bundle)| GenVersion {
            name: name.clone(),
            endpoints,
            set_header,
            bundle: bundle.into_iter().collect(),
        })
}

fn gen_route(name: String, nv: usize) -> impl Strategy<Value = GenRoute> {
    let weight = prop_oneof![
        4 => 0u32..=100,
        1 => Just(0u32),
        1 => 0u32..=1_000_000,
    ];
    (
        0..nv,
        prop::collection::vec(prop::option::of(weight), nv),
        prop::option::of("/[a-z0-9/]{0,6}"),
        prop::option::of("[a-z]{1,8}\\.example\\.com"),
        prop::collection::vec("gpt-[a-z0-9]{1,4}", 0..3),
        prop::option::of(prop_oneof![
            "x-[a-z]{1,8}".prop_map(GenSticky::Header),
            "[a-z_]{1,8}".prop_map(GenSticky::Cookie),
        ]),
        prop::option::of(0..nv),
        // The first step is below 100 (the candidate is held next to the baseline first).
        prop::option::of(prop::collection::btree_set(1u32..=100, 1..5))
            .prop_map(|s| s.filter(|s| s.first().is_some_and(|f| *f < 100))),
        prop::option::of(1u32..10_000),
        prop::option::of(1u32..100_000),
    )
        .prop_map(
            move |(
                baseline,
                weights,
                path_prefix,
                host,
                models,
                sticky,
                fallback,
                rollout,
                connect_ms,
                max_body_kib,
            )| {
                let mut split: Vec<(usize, u32)> = weights
                    .iter()
                    .enumerate()
                    .filter_map(|(i, w)| w.map(|w| (i, w)))
                    .collect();
                if split.iter().all(|(_, w)| *w == 0) {
                    // Validation requires a positive sum: give one version weight 1.
                    match split.first_mut() {
                        Some(first) => first.1 = 1,
                        None => split.push((baseline, 1)),
                    }
                }
                GenRoute {
                    name: name.clone(),
                    baseline,
                    split,
                    path_prefix,
                    host,
                    models,
                    sticky,
                    fallback: fallback.filter(|f| *f != baseline),
                    rollout: rollout.map(|s| s.into_iter().collect()),
                    connect_ms,
                    max_body_kib,
                }
            },
        )
}

fn gen_config() -> impl Strategy<Value = GenConfig> {
    (
        prop::collection::btree_set("[a-z][a-z0-9._-]{0,6}", 1..=5),
        prop::collection::btree_set("[a-z][a-z0-9-]{0,6}", 1..=4),
    )
        .prop_flat_map(|(vnames, rnames)| {
            let nv = vnames.len();
            let versions: Vec<_> = vnames.into_iter().map(gen_version).collect();
            let routes: Vec<_> = rnames.into_iter().map(|n| gen_route(n, nv)).collect();
            (
                versions,
                routes,
                prop::sample::select(vec![
                    PinQuarantined::Baseline,
                    PinQuarantined::Honor,
                    PinQuarantined::Reject,
                ]),
                prop::sample::select(vec![PinUnknown::Reject, PinUnknown::Ignore]),
                // evaluator.interval: 10ms to 1h.
                prop::option::of(10u32..1000),
                prop::option::of(1u32..600),
                prop::option::of(0.51f64..0.999),
            )
        })
        .prop_map(
            |(
                versions,
                routes,
                pin_quarantined,
                pin_unknown,
                interval_ms,
                window_s,
                confidence,
            )| {
                GenConfig {
                    versions,
                    routes,
                    pin_quarantined,
                    pin_unknown,
                    interval_ms,
                    // The window must be longer than the interval.
                    window_s: match (interval_ms, window_s) {
                        (Some(_), None) => Some(30),
                        (_, w) => w,
                    },
                    confidence,
                }
            },
        )
}

/// What the generator asked for, checked against what validation produced.
fn assert_config_matches(g: &GenConfig, c: &Config) {
    let want: Vec<&str> = g.versions.iter().map(|v| v.name.as_str()).collect();
    let got: Vec<&str> = c.versions.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(got, want);
    for (gv, cv) in g.versions.iter().zip(&c.versions) {
        assert_eq!(cv.endpoints.len(), gv.endpoints.len());
    }
    assert_eq!(c.routes.len(), g.routes.len());
    for (gr, cr) in g.routes.iter().zip(&c.routes) {
        assert_eq!(&*cr.name, gr.name);
        assert_eq!(cr.baseline.as_str(), g.vname(gr.baseline));
        let mut want: BTreeMap<&str, u32> =
            gr.split.iter().map(|(v, w)| (g.vname(*v), *w)).collect();
        want.entry(g.vname(gr.baseline)).or_insert(0);
        let got: BTreeMap<&str, u32> = cr.split.iter().map(|(v, w)| (v.as_str(), w.0)).collect();
        assert_eq!(got, want, "route {}", gr.name);
        assert_eq!(cr.matcher.models, gr.models);
        assert_eq!(cr.fallback.is_some(), gr.fallback.is_some());
    }
    assert_eq!(c.pin.quarantined, g.pin_quarantined);
    assert_eq!(c.pin.unknown, g.pin_unknown);
}

proptest! {
    #![proptest_config(cases(64))]

    /// A generated valid config validates, keeps the promised invariants (baseline in split,
    /// weights sum > 0, names known, ...), compiles, round-trips through its effective
    /// document, and means the same written as YAML or as TOML.
    #[test]
    fn generated_configs_validate_and_round_trip(g in gen_config()) {
        let yaml = g.yaml().text;
        let from_yaml = check_config_text(&yaml, &origin("yaml"))
            .unwrap_or_else(|e| panic!("{e}\n--- yaml ---\n{yaml}"));
        assert_config_matches(&g, &from_yaml);
        let toml = g.toml();
        let from_toml = check_config_text(&toml, &origin("toml"))
            .unwrap_or_else(|e| panic!("{e}\n--- toml ---\n{toml}"));
        prop_assert_eq!(normalized(&from_yaml), normalized(&from_toml));
    }

    /// One defect in an otherwise valid config is reported at its line, under its key.
    #[test]
    fn a_defect_is_reported_at_its_line_and_key(
        g in gen_config(),
        defect in 0usize..10,
        at in any::<Index>(),
    ) {
        let mut g = g;
        let ri = at.index(g.routes.len());
        let key_route = format!("routes[{ri}]");
        let (anchor, key) = match defect {
            0 => {
                g.versions.push(GenVersion {
                    name: "zz-not-declared".into(),
                    endpoints: vec!["http://127.0.0.1:1".into()],
                    set_header: None,
                    bundle: vec![],
                });
                let v = g.versions.len() - 1;
                g.routes[ri].split.push((v, 1));
                // Rendered below without the version itself.
                (format!("{key_route}.split"), format!("{key_route}.split.zz-not-declared"))
            }
            1 => {
                for s in &mut g.routes[ri].split {
                    s.1 = 0;
                }
                (format!("{key_route}.split"), format!("{key_route}.split"))
            }
            2 => {
                g.routes[ri].split[0].1 = 1_000_001;
                let v = g.vname(g.routes[ri].split[0].0).to_string();
                (format!("{key_route}.split"), format!("{key_route}.split.{v}"))
            }
            3 => {
                g.routes[ri].connect_ms = Some(0);
                (format!("{key_route}.timeouts"), format!("{key_route}.timeouts.connect"))
            }
            4 => {
                g.routes[ri].fallback = Some(g.routes[ri].baseline);
                (format!("{key_route}.fallback"), format!("{key_route}.fallback"))
            }
            5 => {
                g.routes[ri].sticky = Some(GenSticky::Header("bad header".into()));
                (format!("{key_route}.sticky"), format!("{key_route}.sticky.header"))
            }
            6 => {
                g.routes[ri].rollout = Some(vec![50, 5]);
                (format!("{key_route}.rollout"), format!("{key_route}.rollout.steps"))
            }
            7 => {
                let vi = at.index(g.versions.len());
                g.versions[vi].endpoints[0] = "ftp://127.0.0.1:1".into();
                let v = g.versions[vi].name.clone();
                (format!("versions.{v}.endpoints"), format!("versions.{v}.endpoints[0]"))
            }
            8 => {
                if g.routes.len() < 2 {
                    let mut twin = g.routes[0].clone();
                    twin.name = "zz-twin".into();
                    g.routes.push(twin);
                }
                let last = g.routes.len() - 1;
                g.routes[last].name = g.routes[0].name.clone();
                (format!("routes[{last}].name"), format!("routes[{last}].name"))
            }
            _ => {
                let vi = at.index(g.versions.len());
                g.routes[ri].baseline = vi;
                g.routes[ri].fallback = None;
                let name = g.versions[vi].name.clone();
                g.versions[vi].name = format!("{name}-renamed");
                // The route still says the old name: render, then put it back.
                let mut r = g.yaml();
                let line = r.lines[&format!("{key_route}.baseline")];
                let fixed: Vec<String> = r
                    .text
                    .lines()
                    .enumerate()
                    .map(|(n, l)| {
                        if n as u64 + 1 == line {
                            format!("    baseline: {}", q(&name))
                        } else {
                            l.to_string()
                        }
                    })
                    .collect();
                r.text = fixed.join("\n") + "\n";
                return check_defect(&r, &format!("{key_route}.baseline"), &format!("{key_route}.baseline"));
            }
        };
        let mut r = g.yaml();
        if defect == 0 {
            // Drop the undeclared version's own entry (its two lines).
            let start = r.lines["versions.zz-not-declared"];
            let kept: Vec<&str> = r
                .text
                .lines()
                .enumerate()
                .filter(|(n, _)| *n as u64 + 1 != start && *n as u64 + 1 != start + 1)
                .map(|(_, l)| l)
                .collect();
            r.text = kept.join("\n") + "\n";
            for line in r.lines.values_mut() {
                if *line > start {
                    *line -= 2;
                }
            }
        }
        check_defect(&r, &anchor, &key)?;
    }

    /// Arbitrary bytes, as YAML and as TOML: never a panic; an error locates its problems.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..400)) {
        fuzz_harness::config(&data);
    }

    /// Texts built from YAML's and the schema's own tokens reach deeper than random bytes.
    #[test]
    fn yaml_token_soup_never_panics(tokens in prop::collection::vec(any::<Index>(), 0..80)) {
        let text: String = tokens.iter().map(|t| *t.get(TOKENS)).collect();
        fuzz_harness::config(text.as_bytes());
    }

    /// A valid config cut, spliced and shuffled: never a panic; an error locates its problems.
    #[test]
    fn mutated_configs_never_panic(
        g in gen_config(),
        edits in prop::collection::vec((0u8..6, any::<Index>(), any::<Index>(), any::<Index>()), 1..5),
        as_toml in any::<bool>(),
    ) {
        let mut text = if as_toml { g.toml() } else { g.yaml().text };
        for (op, a, b, t) in edits {
            text = mutate(&text, op, a, b, t);
        }
        let ext = if as_toml { "toml" } else { "yaml" };
        let _ = check_config_text(&text, &origin(ext));
    }
}

fn check_defect(r: &Rendered, anchor: &str, key: &str) -> Result<(), TestCaseError> {
    let err = match Config::from_str(&r.text, &origin("yaml")) {
        Ok(_) => panic!("accepted a config with a defect at {key}\n{}", r.text),
        Err(e) => e,
    };
    fuzz_harness::assert_error_located(&err, &r.text, &origin("yaml"));
    let line = r.lines[anchor];
    prop_assert!(
        err.problems.iter().any(|p| p.key == key && p.line == line),
        "expected a problem at line {} key {}, got {:#?}\n--- yaml ---\n{}",
        line,
        key,
        err.problems,
        r.text
    );
    Ok(())
}

const TOKENS: &[&str] = &[
    "\n",
    "\n",
    "\n",
    "  ",
    "  ",
    "    ",
    "- ",
    ": ",
    ":",
    ", ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "#",
    "&a ",
    "*a",
    "!!str ",
    "!!map ",
    "? ",
    "|\n",
    ">\n",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "<<: *a\n",
    "\t",
    "\\",
    "\u{feff}",
    "é",
    "null",
    "~",
    "true",
    "1e999",
    "-1",
    "0x1F",
    "4294967296",
    "18446744073709551616",
    ".nan",
    "-.inf",
    "0.99",
    "1.5",
    "10ms",
    "5 parsecs",
    "versions:",
    "routes:",
    "listen:",
    "admin:",
    "pin:",
    "evaluator:",
    "rules:",
    "alerts:",
    "tls:",
    "state_dir:",
    "drain_timeout:",
    "health_listen:",
    "webhooks:",
    "a:",
    "b:",
    "a",
    "b",
    "endpoints: [http://127.0.0.1:1]",
    "endpoints:",
    "http://127.0.0.1:1",
    "h2c://x:1",
    "https://[::1]:443",
    "name: r",
    "name:",
    "baseline: a",
    "baseline:",
    "split: {a: 1}",
    "split:",
    "{a: 0, b: 0}",
    "sticky: {header: x-u}",
    "sticky: {cookie: s}",
    "match:",
    "path_prefix: /v1/",
    "host: h",
    "model: [m]",
    "headers: {x-a: b}",
    "fallback: b",
    "shadow: {version: b, percent: 10}",
    "rollout: {steps: [5, 50], hold: 1m}",
    "timeouts: {connect: 0s}",
    "retry: {budget_percent: 200}",
    "max_request_body: 10MiB",
    "max_request_body: 99999999999GiB",
    "set_headers: {x-p: v}",
    "set_headers: {host: x}",
    "health_check: {path: /h}",
    "ca_file: /",
    "ca_file: x.pem",
    "quarantined: honor",
    "unknown: ignore",
    "interval: 1ms",
    "window: 1ms",
    "confidence: 2",
    "drift: {signal: 'json:s', p_value: 0.05}",
    "drift: {signal: 'header:'}",
    "safety_violations: {header: x, max: 1, per: 1h}",
    "error_rate_ratio: null",
    "latency_p99_max: 1ns",
    "url: ftp://x",
    "token_file: t",
    "listen: 0.0.0.0:1",
    "=",
    " = ",
    "[[routes]]\n",
    "[versions.a]\n",
    "[pin]\n",
    "\"\"\"",
    "'''",
];

/// One edit of a config text, on character boundaries.
fn mutate(text: &str, op: u8, a: Index, b: Index, t: Index) -> String {
    let chars: Vec<char> = text.chars().collect();
    let lines: Vec<&str> = text.split('\n').collect();
    let n = chars.len().max(1);
    let (i, j) = {
        let (x, y) = (a.index(n), b.index(n));
        (x.min(y), x.max(y))
    };
    let s = |r: &[char]| r.iter().collect::<String>();
    let at = |k: usize| k.min(chars.len());
    match op {
        // Delete a range (at most 40 characters).
        0 => s(&chars[..at(i)]) + &s(&chars[at(j.min(i + 40))..]),
        // Insert a token.
        1 => s(&chars[..at(i)]) + *t.get(TOKENS) + &s(&chars[at(i)..]),
        // Replace a range by a token.
        2 => s(&chars[..at(i)]) + *t.get(TOKENS) + &s(&chars[at(j.min(i + 12))..]),
        // Duplicate a line.
        3 => {
            let k = a.index(lines.len());
            let mut out = lines.clone();
            out.insert(k, lines[k]);
            out.join("\n")
        }
        // Swap two lines.
        4 => {
            let mut out = lines.clone();
            out.swap(a.index(lines.len()), b.index(lines.len()));
            out.join("\n")
        }
        // Truncate.
        _ => s(&chars[..at(i)]),
    }
}

// =======================================================================================
// Version choice on the primitives
// =======================================================================================

/// A route member for `select::rendezvous`: a weight and the seed of a version name.
#[derive(Debug, Clone)]
struct M {
    w: u32,
    seed: u64,
}

impl Candidate for M {
    fn weight(&self) -> u32 {
        self.w
    }
    fn seed(&self) -> u64 {
        self.seed
    }
}

fn members(names: &[String], weights: &[u32]) -> Vec<M> {
    names
        .iter()
        .zip(weights)
        .map(|(n, w)| M {
            w: *w,
            seed: select::name_seed(n),
        })
        .collect()
}

fn cumulative(weights: &[u32]) -> Vec<u32> {
    weights
        .iter()
        .scan(0u32, |t, w| {
            *t += w;
            Some(*t)
        })
        .collect()
}

/// Distinct version names with weights, at least one weight above 0.
fn weighted_names(max_weight: u32) -> impl Strategy<Value = (Vec<String>, Vec<u32>)> {
    prop::collection::btree_set("[a-z][a-z0-9._-]{0,7}", 1..=6)
        .prop_flat_map(move |names| {
            let n = names.len();
            (
                Just(names.into_iter().collect::<Vec<_>>()),
                prop::collection::vec(prop_oneof![1 => Just(0u32), 4 => 1..=max_weight], n),
            )
        })
        .prop_filter("some weight above 0", |(_, w)| w.iter().any(|w| *w > 0))
}

/// A sticky choice: weights and a key to the chosen index.
type Chooser<'a> = dyn Fn(&[u32], &[u8]) -> Option<usize> + 'a;

/// Checks the rendezvous invariant for `keys` between two weight vectors and returns how
/// many keys moved. The invariant, from the score `w / -ln(u(key, version))`: the factor
/// `-ln(u)` of each (key, version) does not depend on weights, so a key moves from `a` to
/// `b` only if `b`'s score grew relative to `a`'s, i.e. `w'_b * w_a >= w'_a * w_b`. In
/// particular the version it moves to gained weight or the one it left lost weight, and a
/// key never moves between two versions whose weights did not change.
fn check_moves(before: &[u32], after: &[u32], choose: &Chooser, keys: u32) -> Result<u32, String> {
    let mut moved = 0;
    for k in 0..keys {
        let key = k.to_le_bytes();
        let (Some(a), Some(b)) = (choose(before, &key), choose(after, &key)) else {
            return Err("no choice with a positive weight".into());
        };
        if a == b {
            continue;
        }
        moved += 1;
        let (wa, wb, wa2, wb2) = (
            u64::from(before[a]),
            u64::from(before[b]),
            u64::from(after[a]),
            u64::from(after[b]),
        );
        if !(wb2 > wb || wa2 < wa) {
            return Err(format!(
                "key {k} moved from {a} ({wa} -> {wa2}) to {b} ({wb} -> {wb2}): neither did {b} gain nor {a} lose weight"
            ));
        }
        if wb2 * wa < wa2 * wb {
            return Err(format!(
                "key {k} moved from {a} ({wa} -> {wa2}) to {b} ({wb} -> {wb2}) although {a} gained relative to {b}"
            ));
        }
    }
    Ok(moved)
}

/// `k` out of `n` with probability `p`: within `sigmas` standard deviations (plus one).
fn within(k: u64, n: u64, p: f64, sigmas: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (k as f64 - mean).abs() <= sigmas * sd + 1.0
}

proptest! {
    #![proptest_config(cases(64))]

    /// `select::weighted` over a uniform draw in `0..total` gives each version exactly its
    /// weight's worth of draws: versions above 0 are reachable, versions at 0 are not.
    #[test]
    fn weighted_choice_gives_each_version_exactly_its_weight(
        (_, weights) in weighted_names(1000),
    ) {
        let cum = cumulative(&weights);
        let total = *cum.last().unwrap();
        let mut hits = vec![0u32; weights.len()];
        for r in 0..total {
            hits[select::weighted(&cum, r)] += 1;
        }
        prop_assert_eq!(hits, weights);
    }

    /// Every version with weight above 0 gets some sticky keys; none at 0 gets any; each
    /// version's share of keys converges to its share of the weight.
    #[test]
    fn sticky_keys_reach_every_weighted_version_in_proportion(
        (names, weights) in weighted_names(100),
    ) {
        let m = members(&names, &weights);
        let total: u32 = weights.iter().sum();
        let keys = 20_000u32;
        let mut hits = vec![0u64; weights.len()];
        for k in 0..keys {
            hits[select::rendezvous(&m, &k.to_le_bytes()).unwrap()] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            if *w == 0 {
                prop_assert_eq!(hits[i], 0, "{} has weight 0", &names[i]);
                continue;
            }
            // The lightest share is 1/600: if 20000 keys missed it, search further.
            if hits[i] == 0 {
                let found = (keys..400_000u32)
                    .any(|k| select::rendezvous(&m, &k.to_le_bytes()) == Some(i));
                prop_assert!(found, "{} (weight {}) is unreachable by sticky keys", &names[i], w);
            }
            let p = f64::from(*w) / f64::from(total);
            prop_assert!(
                within(hits[i], u64::from(keys), p, 6.0),
                "{}: {} of {} keys for a share of {:.4}", &names[i], hits[i], keys, p
            );
        }
    }

    /// Weighted rendezvous hashing: when weights change, a key moves only toward a version
    /// that gained relative weight (see `check_moves`), and at least as many keys move as the
    /// shares changed (the total variation distance, less sampling noise).
    #[test]
    fn sticky_keys_move_only_toward_a_version_that_gained(
        (names, before) in weighted_names(100),
        after_seed in prop::collection::vec(prop_oneof![1 => Just(0u32), 4 => 1u32..=100], 6),
    ) {
        let after: Vec<u32> = after_seed[..before.len()].to_vec();
        prop_assume!(after.iter().any(|w| *w > 0));
        let choose = |w: &[u32], key: &[u8]| select::rendezvous(&members(&names, w), key);
        let keys = 5_000;
        let moved = check_moves(&before, &after, &choose, keys)
            .map_err(TestCaseError::fail)?;
        let (tb, ta) = (
            f64::from(before.iter().sum::<u32>()),
            f64::from(after.iter().sum::<u32>()),
        );
        let tv: f64 = before
            .iter()
            .zip(&after)
            .map(|(b, a)| (f64::from(*a) / ta - f64::from(*b) / tb).max(0.0))
            .sum();
        let floor = tv * f64::from(keys) - 6.0 * (f64::from(keys) * tv.max(1e-9)).sqrt() - 1.0;
        prop_assert!(
            f64::from(moved) >= floor,
            "{} keys moved; the shares changed by {:.4} ({:.0} keys)", moved, tv, tv * f64::from(keys)
        );
    }

    /// Scaling every weight by the same factor changes no share, so no key moves.
    #[test]
    fn scaling_all_weights_moves_no_key(
        (names, weights) in weighted_names(1000),
        factor in 2u32..1000,
    ) {
        let scaled: Vec<u32> = weights.iter().map(|w| w * factor).collect();
        let (m, s) = (members(&names, &weights), members(&names, &scaled));
        for k in 0..2_000u32 {
            let key = k.to_le_bytes();
            prop_assert_eq!(select::rendezvous(&m, &key), select::rendezvous(&s, &key));
        }
    }
}

/// The invariant check is not vacuous: a sticky choice that hashes the key modulo the total
/// weight (a common mistake) reshuffles keys between versions whose weights did not change.
#[test]
fn check_moves_catches_a_selector_that_reshuffles() {
    let modulo = |w: &[u32], key: &[u8]| -> Option<usize> {
        use std::hash::{Hash, Hasher};
        let total: u32 = w.iter().sum();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        (total > 0)
            .then(|| select::weighted(&cumulative(w), (h.finish() % u64::from(total)) as u32))
    };
    let err = check_moves(&[1, 1, 1], &[2, 1, 1], &modulo, 1000).unwrap_err();
    assert!(err.contains("neither did"), "{err}");
    let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let rendezvous = |w: &[u32], key: &[u8]| select::rendezvous(&members(&names, w), key);
    let moved = check_moves(&[1, 1, 1], &[2, 1, 1], &rendezvous, 1000).unwrap();
    assert!(
        moved > 100,
        "doubling one of three weights moved only {moved} of 1000 keys"
    );
}

// =======================================================================================
// Version choice on compiled tables
// =======================================================================================

fn gen_table() -> impl Strategy<Value = (GenConfig, BTreeSet<usize>)> {
    gen_config().prop_flat_map(|g| {
        let nv = g.versions.len();
        (Just(g), prop::collection::btree_set(0..nv, 0..=nv))
    })
}

/// Compiles `g` with the versions in `quarantine` rolled back.
fn table_of(g: &GenConfig, quarantine: &BTreeSet<usize>) -> (Config, std::sync::Arc<Table>) {
    let yaml = g.yaml().text;
    let config = Config::from_str(&yaml, &origin("yaml")).unwrap_or_else(|e| panic!("{e}"));
    let store = compile(config.clone()).expect("compiles");
    if !quarantine.is_empty() {
        let q: Vec<(VersionName, String)> = quarantine
            .iter()
            .map(|i| {
                let v = &config.versions[*i];
                (v.name.clone(), v.fingerprint.clone())
            })
            .collect();
        store
            .update(None, |s| s.quarantined.extend(q))
            .expect("rollback compiles");
    }
    (config, store.load())
}

fn member_name(t: &Table, r: usize, m: usize) -> String {
    t.versions[t.routes[r].members[m].version].name.to_string()
}

proptest! {
    #![proptest_config(cases(32))]

    /// A rollback gives each quarantined candidate weight 0 and its share to the baseline;
    /// the total is unchanged, so the others keep their traffic.
    #[test]
    fn a_rollback_moves_exactly_the_quarantined_share_to_the_baseline(
        (g, quarantine) in gen_table(),
    ) {
        let (config, t) = table_of(&g, &quarantine);
        for (ri, (route, rc)) in t.routes.iter().zip(&config.routes).enumerate() {
            let configured: u32 = rc.split.iter().map(|(_, w)| w.0).sum();
            prop_assert_eq!(route.total_weight, configured);
            prop_assert_eq!(*route.cumulative.last().unwrap(), route.total_weight);
            let mut moved = 0;
            for (mi, m) in route.members.iter().enumerate() {
                let q = t.versions[m.version].quarantined;
                if mi == route.baseline {
                    continue;
                }
                if q {
                    prop_assert_eq!(m.weight, 0, "quarantined {} keeps weight", member_name(&t, ri, mi));
                    moved += m.configured_weight;
                } else {
                    prop_assert_eq!(m.weight, m.configured_weight);
                }
            }
            let b = &route.members[route.baseline];
            prop_assert_eq!(b.weight, b.configured_weight + moved);
        }
    }

    /// `Route::pick_weighted` (the request path's weighted random choice) converges to the
    /// effective weights.
    #[test]
    fn weighted_random_split_converges_to_the_weights((g, quarantine) in gen_table()) {
        let (_, t) = table_of(&g, &quarantine);
        let draws = 10_000u64;
        for (ri, route) in t.routes.iter().enumerate() {
            let mut hits = vec![0u64; route.members.len()];
            for _ in 0..draws {
                hits[route.pick_weighted()] += 1;
            }
            for (mi, m) in route.members.iter().enumerate() {
                let p = f64::from(m.weight) / f64::from(route.total_weight);
                prop_assert!(
                    within(hits[mi], draws, p, 6.0),
                    "{}: {} of {} draws for a share of {:.4}", member_name(&t, ri, mi), hits[mi], draws, p
                );
                if m.weight == 0 {
                    prop_assert_eq!(hits[mi], 0);
                }
            }
        }
    }

    /// A pin, resolved the way the request path does (`Route::member_by_name`, then
    /// `select::resolve_pin`), never routes outside its route: it serves a version of the
    /// route, the pinned one unless the pinned one is quarantined, and never a quarantined
    /// version unless the policy is `honor`.
    #[test]
    fn a_pin_never_routes_outside_its_route(
        (g, quarantine) in gen_table(),
        garbage in prop::collection::vec("[ -~]{0,10}", 0..4),
    ) {
        let (config, t) = table_of(&g, &quarantine);
        let mut pins: Vec<String> = config.versions.iter().map(|v| v.name.to_string()).collect();
        pins.extend(config.versions.iter().map(|v| v.name.as_str().to_uppercase()));
        pins.extend(garbage);
        for (ri, route) in t.routes.iter().enumerate() {
            let names: Vec<String> = (0..route.members.len()).map(|m| member_name(&t, ri, m)).collect();
            let route_versions = fuzz_harness::route_versions(&t, &route.name);
            for n in &names {
                prop_assert!(route_versions.contains(n), "member {} is not in route {}", n, &*route.name);
            }
            let quarantined = |n: &str| t.versions.iter().any(|v| v.name.as_str() == n && v.quarantined);
            for pin in &pins {
                let found = route
                    .member_by_name(pin.as_bytes(), &t)
                    .map(|i| (i, t.versions[route.members[i].version].quarantined));
                let outcome = select::resolve_pin(found, route.baseline, t.pin_quarantined, t.pin_unknown);
                let in_route = names.contains(pin);
                match outcome {
                    PinOutcome::Member(i) => {
                        let served = &names[i];
                        prop_assert!(in_route, "pin {:?} outside route {} served by {}", pin, &*route.name, served);
                        if served == pin {
                            // A quarantined version still serves where it is the baseline
                            // (known issue KB5 below), and pins to it follow the baseline.
                            prop_assert!(
                                !quarantined(pin)
                                    || t.pin_quarantined == PinQuarantined::Honor
                                    || i == route.baseline
                            );
                        } else {
                            prop_assert!(quarantined(pin) && t.pin_quarantined == PinQuarantined::Baseline);
                            prop_assert_eq!(i, route.baseline);
                        }
                    }
                    PinOutcome::NoPin => prop_assert!(!in_route && t.pin_unknown == PinUnknown::Ignore),
                    PinOutcome::RejectUnknown => prop_assert!(!in_route && t.pin_unknown == PinUnknown::Reject),
                    PinOutcome::RejectQuarantined => prop_assert!(
                        in_route && quarantined(pin) && t.pin_quarantined == PinQuarantined::Reject
                    ),
                }
            }
        }
    }
}

// =======================================================================================
// Version choice through the real request handler
// =======================================================================================

const PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/",
    "/v0/legacy",
    "/v2/other",
    "/",
    "/V1/chat",
    "//v1/",
];
const HOSTS: &[&str] = &[
    "",
    "api.example.com",
    "API.Example.com:8443",
    "api.example.com:x",
    "other.example.com",
];
const PINS: &[&str] = &[
    "", "stable", "canary", "beta", "gamma", "delta", "idle", "CANARY", "nope", " stable",
];
const MODELS: &[&str] = &["", "gpt-a", "gpt-b", "gpt-c"];

fn gen_request() -> impl Strategy<Value = String> {
    (
        0usize..4,
        any::<Index>(),
        any::<Index>(),
        any::<Index>(),
        prop::option::of("[a-z0-9]{0,6}"),
        prop::option::of("[a-z0-9=]{0,6}"),
        any::<Index>(),
        0u8..4,
        any::<bool>(),
    )
        .prop_map(
            |(variant, path, host, pin, user, session, model, model_how, tenant)| {
                let mut s = format!("@{variant}\nPOST {}\n", path.get(PATHS));
                let host = *host.get(HOSTS);
                if !host.is_empty() {
                    let _ = writeln!(s, "host: {host}");
                }
                let pin = *pin.get(PINS);
                if !pin.is_empty() {
                    let _ = writeln!(s, "x-rollgate-version: {pin}");
                }
                if let Some(u) = user {
                    let _ = writeln!(s, "x-user-id: {u}");
                }
                if let Some(c) = session {
                    let _ = writeln!(s, "cookie: a=1; session={c}");
                }
                if tenant {
                    s.push_str("x-tenant: acme\n");
                }
                let model = *model.get(MODELS);
                let mut body = String::new();
                match model_how {
                    0 => {}
                    1 => {
                        let _ = writeln!(s, "x-gateway-model-name: {model}");
                    }
                    2 => body = format!("{{\"model\": \"{model}\", \"messages\": []}}"),
                    _ => {
                        body = format!(
                            "{{\"model\": \"{model}\", \"pad\": \"{}\"}}",
                            "x".repeat(2000)
                        )
                    }
                }
                s.push('\n');
                s.push_str(&body);
                s
            },
        )
}

proptest! {
    #![proptest_config(cases(96))]

    /// Requests built from every input that feeds version choice, sent over HTTP/1.1 to the
    /// real handler: the answer is the one SPEC §4 prescribes (checked inside
    /// `fuzz_harness::request_route`), and the answering version always belongs to the route.
    #[test]
    fn the_handler_chooses_as_the_spec_says(req in gen_request()) {
        let outcome = fuzz_harness::request_route(req.as_bytes())
            .unwrap_or_else(|| panic!("hyper refused a well-formed request: {req}"));
        if let Expected::Served { route, .. } = &outcome.expected {
            let table = fuzz_harness::fixture_table(FuzzRequest::decode(req.as_bytes()).variant);
            let v = outcome.version.clone().unwrap();
            prop_assert!(fuzz_harness::route_versions(&table, route).contains(&v));
            let pinned_honor = table.pin_quarantined == PinQuarantined::Honor && req.contains("x-rollgate-version: canary");
            if table.versions.iter().any(|x| x.name.as_str() == v && x.quarantined) {
                prop_assert!(pinned_honor, "quarantined {} served: {}", v, req);
            }
        }
    }
}

// =======================================================================================
// The fuzz targets' seed corpora, on stable
// =======================================================================================

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Every seed of `fuzz/corpus/config` and every example in `config/` through the `config`
/// target. The examples must be accepted; the seeds include both kinds.
#[test]
fn config_corpus_runs_through_the_fuzz_harness() {
    let seeds = corpus("config");
    assert!(seeds.len() >= 8, "only {} config seeds", seeds.len());
    let (mut ok, mut err) = (0, 0);
    for (path, data) in &seeds {
        fuzz_harness::config(data);
        let text = String::from_utf8_lossy(data);
        let ext = if path.extension().is_some_and(|e| e == "toml") {
            "toml"
        } else {
            "yaml"
        };
        match Config::from_str(&text, &origin(ext)) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(ok >= 2 && err >= 2, "{ok} accepted, {err} rejected seeds");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for e in std::fs::read_dir(&examples).unwrap() {
        let p = e.unwrap().path();
        if !matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "toml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        // The examples' relative paths (token files, CAs) resolve next to them.
        check_config_text(&text, &p).unwrap_or_else(|e| panic!("{e}"));
        fuzz_harness::config(text.as_bytes());
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} examples");
}

/// Every seed of `fuzz/corpus/request_route` through the `request_route` target; together
/// they reach every way a version is chosen or refused.
#[test]
fn request_route_corpus_runs_through_the_fuzz_harness() {
    let seeds = corpus("request_route");
    assert!(seeds.len() >= 10, "only {} request seeds", seeds.len());
    let mut seen = BTreeSet::new();
    for (_, data) in &seeds {
        if let Some(RouteOutcome { expected, .. }) = fuzz_harness::request_route(data) {
            seen.insert(match expected {
                Expected::Refused(_, code) => code.to_string(),
                Expected::Served { how, .. } => how.to_string(),
            });
        }
    }
    for want in [
        "pin",
        "pin to a quarantined version",
        "pin honoured",
        "sticky key",
        "weighted random",
        "no_route",
        "unknown_version",
        "version_quarantined",
        "bad_request",
        "body_too_large",
    ] {
        assert!(seen.contains(want), "no seed exercises {want:?}: {seen:?}");
    }
}

// =======================================================================================
// Bugs these properties found (ignored until fixed: run with `--ignored`)
// =======================================================================================

fn minimal_with(routes: &str, extra: &str) -> String {
    format!(
        "versions:\n  a: {{endpoints: [\"http://127.0.0.1:1\"]}}\n  b: {{endpoints: [\"http://127.0.0.1:2\"]}}\nroutes:\n{routes}{extra}"
    )
}

/// KB1. Route names are checked for duplicates before trimming, but stored trimmed: `r`
/// and ` r` are accepted as two routes both named `r`, which the admin API, weight
/// overrides, pauses and promotions (all keyed by route name) cannot tell apart.
#[test]
fn kb1_route_names_are_unique_after_trimming() {
    let text = minimal_with(
        "  - {name: r, baseline: a, split: {a: 1}}\n  - {name: ' r', baseline: b, split: {b: 1}}\n",
        "",
    );
    let Err(e) = Config::from_str(&text, &origin("yaml")) else {
        panic!("two routes named \"r\" were accepted");
    };
    assert!(e.to_string().contains("routes[1].name"), "{e}");
}

/// KB2. `window must be longer than interval` is checked only when both keys are written:
/// `evaluator: {window: 50ms}` (interval defaults to 100ms) is accepted, so every window
/// is shorter than one evaluator tick; `{interval: 100ms, window: 50ms}` is rejected.
#[test]
fn kb2_window_longer_than_default_interval() {
    let text = minimal_with(
        "  - {name: r, baseline: a, split: {a: 1}}\n",
        "evaluator: {window: 50ms}\n",
    );
    let c = Config::from_str(&text, &origin("yaml"));
    assert!(
        c.is_err(),
        "accepted window {:?} with interval {:?}",
        c.as_ref().unwrap().evaluator.window,
        c.as_ref().unwrap().evaluator.interval
    );
}

/// KB3. `evaluator.rules.drift.p_value` is not range-checked: 7, 0, -1 and .nan are accepted
/// (a KS test compared against p_value 7 trips on every tick; .nan never trips), and .nan
/// is shown as `null` by `GET /api/v1/config`.
#[test]
fn kb3_drift_p_value_is_a_probability() {
    for p in ["7", "0", "-1", ".nan"] {
        let text = minimal_with(
            "  - {name: r, baseline: a, split: {a: 1}}\n",
            &format!(
                "evaluator: {{rules: {{drift: {{signal: 'header:x-score', p_value: {p}}}}}}}\n"
            ),
        );
        assert!(
            Config::from_str(&text, &origin("yaml")).is_err(),
            "p_value {p} accepted"
        );
    }
}

/// KB4. `ca_file` is checked only for existence: a directory (or any path that is not a
/// readable PEM file) passes validation (`rollgate check` says valid), then compiling the
/// table fails (`rollgate run` exits, a reload is refused after `check` approved it).
#[test]
#[ignore = "known bug KB4: ca_file naming a directory passes validation, fails at startup"]
fn kb4_ca_file_is_validated_like_startup_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    let text = "versions:\n  a: {endpoints: [\"https://localhost:1\"], ca_file: certs}\nroutes:\n  - {name: r, baseline: a, split: {a: 1}}\n";
    let origin = dir.path().join("rollgate.yaml");
    match Config::from_str(text, &origin) {
        Err(_) => {}
        Ok(c) => match compile(c) {
            Ok(_) => {}
            Err(e) => panic!("validation accepted it, compiling failed: {e}"),
        },
    }
}

/// KB5. A version that is the baseline of one route and a candidate on another is rolled
/// back (on the route where it is a candidate: the admin API and the evaluator allow it).
/// SPEC §1 says a rolled-back version "gets weight 0 on every route", and §5 "the candidate
/// gets no new requests"; but where it is the baseline it keeps its weight (and takes the
/// share of others), so it goes on answering all of that route's traffic.
#[test]
#[ignore = "known issue KB5: a quarantined version keeps serving routes where it is the baseline"]
fn kb5_a_quarantined_version_serves_no_route() {
    let text = minimal_with(
        "  - {name: one, match: {path_prefix: /one}, baseline: a, split: {a: 1}}\n  - {name: two, baseline: b, split: {b: 9, a: 1}}\n",
        "",
    );
    let config = Config::from_str(&text, &origin("yaml")).unwrap();
    let fp = config.version("a").unwrap().fingerprint.clone();
    let store = compile(config).unwrap();
    store
        .update(None, |s| {
            s.quarantined.insert("a".into(), fp);
        })
        .unwrap();
    let t = store.load();
    for r in t.routes.iter() {
        for m in r.members.iter() {
            let v = &t.versions[m.version];
            assert!(
                !(v.quarantined && m.weight > 0),
                "route {}: quarantined {} has weight {}",
                r.name,
                v.name,
                m.weight
            );
        }
    }
}
