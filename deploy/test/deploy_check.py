#!/usr/bin/env python3
"""Checks everything under deploy/ against the real tools and a live rollgate.

Run through `.ci/deploy-check`, which installs the tools first. Each check prints one
PASS/FAIL line; the summary at the end repeats the failures and the exit status is 1 if any.

  configs      `rollgate check` on config/* and on every rollgate config a kustomization renders
  kustomize    `kubectl kustomize` renders every kustomization (Components through their users)
  schemas      the rendered objects validate against the Kubernetes OpenAPI schemas (strict)
  manifests    what the manifests promise: directory-mounted ConfigMap, probes on health_listen,
               hardened securityContext, requests/limits, grace period > preStop + drain_timeout;
               with `fleet:` the store password on a Secret and the replica named after the pod;
               the reference fleet store (components/fleet-redis) single, hardened, password-protected
  dockerfile   multi-stage, --locked, numeric non-root USER, EXPOSE matches the manifests
  prometheus   promtool check/test rules, scrape config, PrometheusRule in sync with the rules
  live         mock models + `rollgate run` + a real Prometheus scraping it at 1 s; load, reloads,
               a manual rollback, `rollgate drill`, a degraded route; then every dashboard query,
               annotation and variable, every recording rule and every Flagger/Argo query must
               return data, and the alerts must have fired on the events that should fire them

`python3 deploy/test/deploy_check.py prometheusrule` prints deploy/prometheus/prometheusrule.yaml
from rollgate.rules.yml.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "rollgate.json"
RULES = PROM / "rollgate.rules.yml"
PROMETHEUSRULE = PROM / "prometheusrule.yaml"

# Kubernetes versions every kustomization is validated against, unless its kustomization.yaml
# says otherwise with a `# validate-against: 1.27.0 1.35.0` line. 1.30 is the floor the
# manifests are written for (native sidecars, the preStop sleep action).
DEFAULT_K8S_VERSIONS = ["1.30.0", "1.35.0"]
# CRDs the schemas do not know; checked for structure here and for their queries live.
CRD_GROUPS = ("flagger.app/", "argoproj.io/", "monitoring.coreos.com/")


# ---------------------------------------------------------------------------------------------
# Results


class Results:
    def __init__(self) -> None:
        self.items: list[tuple[str, bool, str]] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append((name, ok, detail))
        line = f"{'PASS' if ok else 'FAIL'}  {name}"
        first = detail.strip().splitlines()[0] if detail.strip() else ""
        if ok and first and len(first) <= 80:
            line += f"  ({first})"
        elif not ok and detail.strip():
            line += "\n      " + detail.strip().replace("\n", "\n      ")
        print(line, flush=True)
        return ok

    def summary(self, elapsed: float) -> int:
        failed = [i for i in self.items if not i[1]]
        print()
        print("=" * 72)
        print(f"deploy-check: {len(self.items) - len(failed)} passed, {len(failed)} failed  ({elapsed:.0f} s)")
        for name, _, detail in failed:
            print(f"  FAIL  {name}: {detail.splitlines()[0] if detail else ''}")
        print("=" * 72)
        return 1 if failed else 0


def outcome(p: subprocess.CompletedProcess, limit: int = 3000) -> str:
    """All output when the command failed, else its last line (promtool's SUCCESS line)."""
    out = (p.stdout + p.stderr).strip()
    return out[-limit:] if p.returncode != 0 else (out.splitlines() or [""])[-1].strip()


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def duration_s(text: str) -> float:
    """rollgate's durations: 250ms, 5s, 2m, 1h."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# ---------------------------------------------------------------------------------------------
# Kustomize


def kustomizations() -> list[tuple[Path, str]]:
    """(directory, kind) of every kustomization under deploy/."""
    out = []
    for k in sorted(DEPLOY.rglob("kustomization.yaml")):
        kind = (yaml.safe_load(k.read_text()) or {}).get("kind", "Kustomization")
        out.append((k.parent, kind))
    return out


def render_all(res: Results) -> dict[Path, list[dict]]:
    rendered: dict[Path, list[dict]] = {}
    used_components: set[Path] = set()
    for d, kind in kustomizations():
        if kind == "Component":
            continue
        p = run(["kubectl", "kustomize", str(d)])
        if p.returncode != 0:
            res.add(f"kustomize {rel(d)}", False, p.stderr.strip())
            continue
        docs = [doc for doc in yaml.safe_load_all(p.stdout) if doc]
        rendered[d] = docs
        comps = (yaml.safe_load((d / "kustomization.yaml").read_text()) or {}).get("components", [])
        used_components.update((d / c).resolve() for c in comps)
        res.add(f"kustomize {rel(d)}", True, f"{len(docs)} objects")
    for d, kind in kustomizations():
        if kind == "Component":
            res.add(f"kustomize {rel(d)} (component)", d.resolve() in used_components,
                    "rendered through its users" if d.resolve() in used_components
                    else "no kustomization uses this component, so nothing renders or validates it")
    return rendered


def versions_for(d: Path) -> list[str]:
    for line in (d / "kustomization.yaml").read_text().splitlines():
        m = re.match(r"#\s*validate-against:\s*(.+)", line)
        if m:
            return m.group(1).split()
    return DEFAULT_K8S_VERSIONS


def validate_schemas(res: Results, rendered: dict[Path, list[dict]]) -> None:
    import kubernetes_validate

    for d, docs in rendered.items():
        for version in versions_for(d):
            problems = []
            for doc in docs:
                ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                if str(doc.get("apiVersion", "")).startswith(CRD_GROUPS):
                    continue
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    problems.append(f"{ident}: {e.message} at {'.'.join(map(str, e.path))}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    problems.append(f"{ident}: no schema ({e})")
            res.add(f"schema {rel(d)} @ kubernetes {version} (strict)", not problems, "\n".join(problems))


# ---------------------------------------------------------------------------------------------
# rollgate configs


def embedded_configs(rendered: dict[Path, list[dict]]) -> dict[str, tuple[str, str]]:
    """sha -> (where, text) of every rollgate config in a rendered ConfigMap, deduplicated."""
    out: dict[str, tuple[str, str]] = {}
    for d, docs in rendered.items():
        for doc in docs:
            if doc.get("kind") != "ConfigMap":
                continue
            for key, text in (doc.get("data") or {}).items():
                if not re.search(r"\.(ya?ml|toml)$", key):
                    continue
                try:
                    parsed = yaml.safe_load(text)
                except yaml.YAMLError:
                    parsed = None
                if isinstance(parsed, dict) and "versions" in parsed and "routes" in parsed:
                    h = hashlib.sha256(text.encode()).hexdigest()
                    out.setdefault(h, (f"{rel(d)}: ConfigMap {doc['metadata']['name']} key {key}", text))
    return out


def check_configs(res: Results, rollgate: str, rendered, tmp: Path) -> None:
    files = sorted((ROOT / "config").glob("*.y*ml")) + sorted((ROOT / "config").glob("*.toml"))
    for f in files:
        p = run([rollgate, "check", "-c", str(f)], timeout=30)
        res.add(f"rollgate check {rel(f)}", p.returncode == 0, (p.stdout + p.stderr).strip()[-2000:])
    found = embedded_configs(rendered)
    if not found:
        res.add("rollgate configs embedded in deploy/", False, "no rollgate config found in any rendered ConfigMap")
    for i, (where, text) in enumerate(found.values()):
        key = where.rsplit(" ", 1)[-1]
        f = tmp / f"embedded-{i}-{key}"
        f.write_text(text)
        p = run([rollgate, "check", "-c", str(f)], timeout=30)
        res.add(f"rollgate check {where}", p.returncode == 0, (p.stdout + p.stderr).strip()[-2000:])


# ---------------------------------------------------------------------------------------------
# What the manifests promise


def pod_templates(docs: list[dict]):
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet"):
            yield doc, spec.get("template", {}).get("spec", {})


def prestop_seconds(c: dict) -> float | None:
    pre = (c.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = (pre.get("exec") or {}).get("command") or []
    if cmd and cmd[0].endswith("sleep") and len(cmd) == 2:
        return float(cmd[1])
    return None


def lint_manifests(res: Results, rendered: dict[Path, list[dict]]) -> dict:
    """Checks each pod that runs rollgate; returns facts the Dockerfile check compares with."""
    facts = {"ports": set(), "args": set()}
    for d, docs in rendered.items():
        configmaps = {doc["metadata"]["name"]: doc for doc in docs if doc.get("kind") == "ConfigMap"}
        for wl, pod in pod_templates(docs):
            native = [c for c in pod.get("initContainers") or [] if c.get("name") == "rollgate"]
            plain = [c for c in pod.get("containers") or [] if c.get("name") == "rollgate"]
            for c in native + plain:
                is_native = c in native
                where = f"{rel(d)}: {wl['kind']}/{wl['metadata']['name']}"
                problems = []
                volumes = {v["name"]: v for v in pod.get("volumes") or []}
                mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
                args = c.get("args") or []
                facts["args"].add(tuple(args))
                cfg_path = args[args.index("--config") + 1] if "--config" in args else None
                cfg = None
                if not cfg_path:
                    problems.append("args do not name --config")
                else:
                    mount = mounts.get(str(Path(cfg_path).parent))
                    vol = volumes.get(mount["name"]) if mount else None
                    if not mount or not vol or "configMap" not in vol:
                        problems.append(f"{cfg_path}: its directory is not a ConfigMap volume mount")
                    else:
                        if mount.get("subPath"):
                            problems.append("the config is mounted with subPath: it would never hot-reload")
                        cm = configmaps.get(vol["configMap"]["name"])
                        if cm is None:
                            problems.append(f"ConfigMap {vol['configMap']['name']} is not in the rendered output")
                        elif Path(cfg_path).name not in (cm.get("data") or {}):
                            problems.append(f"ConfigMap {cm['metadata']['name']} has no key {Path(cfg_path).name}")
                        else:
                            cfg = yaml.safe_load(cm["data"][Path(cfg_path).name])
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
                facts["ports"].update(ports.values())
                if cfg:
                    hl = cfg.get("health_listen")
                    if not hl:
                        problems.append("the config sets no health_listen: probes would need the admin port")
                    elif int(str(hl).rsplit(":", 1)[1]) not in ports.values():
                        problems.append(f"health_listen {hl} is not a container port")
                    if int(str(cfg.get("listen", "0.0.0.0:8080")).rsplit(":", 1)[1]) not in ports.values():
                        problems.append(f"listen {cfg.get('listen')} is not a container port")
                    health_port = int(str(hl).rsplit(":", 1)[1]) if hl else None
                    token = (cfg.get("admin") or {}).get("token_file")
                    tm = mounts.get(str(Path(token).parent)) if token else None
                    if not token or not tm or "secret" not in volumes.get(tm["name"], {}):
                        problems.append("admin.token_file does not live on a mounted Secret")
                    if cfg.get("fleet"):
                        problems += fleet_problems(cfg["fleet"], c, volumes, mounts, docs)
                    sd = cfg.get("state_dir")
                    sm = mounts.get(sd)
                    if not sm or not ({"emptyDir", "persistentVolumeClaim"} & set(volumes.get(sm["name"], {}))):
                        problems.append(f"state_dir {sd} is not an emptyDir or PVC mount")
                    probes = ["readinessProbe", "livenessProbe"] + (["startupProbe"] if is_native else [])
                    for probe in probes:
                        get = (c.get(probe) or {}).get("httpGet")
                        port = get and get.get("port")
                        port = ports.get(port, port)
                        if not get or port != health_port:
                            problems.append(f"{probe} is not an httpGet on the health_listen port")
                    drain = duration_s(cfg.get("drain_timeout", "25s"))
                    grace = pod.get("terminationGracePeriodSeconds", 30)
                    stop = prestop_seconds(c)
                    if not is_native and stop is None:
                        problems.append("no preStop sleep")
                    if grace <= (stop or 0) + drain:
                        problems.append(f"terminationGracePeriodSeconds {grace} <= preStop {stop or 0} + drain_timeout {drain:g}")
                if is_native and c.get("restartPolicy") != "Always":
                    problems.append("a native sidecar needs restartPolicy: Always")
                sc = c.get("securityContext") or {}
                psc = pod.get("securityContext") or {}
                if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                    problems.append("runAsNonRoot is not set")
                if not sc.get("readOnlyRootFilesystem"):
                    problems.append("readOnlyRootFilesystem is not set")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append("allowPrivilegeEscalation is not false")
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    problems.append("capabilities do not drop ALL")
                r = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    for what in ("cpu", "memory"):
                        if what not in (r.get(kind) or {}):
                            problems.append(f"no {kind}.{what}")
                if ":" not in c.get("image", ""):
                    problems.append(f"image {c.get('image')!r} has no tag (kustomize `images:` missing?)")
                res.add(f"manifest {where} ({'native sidecar' if is_native else 'container'} rollgate)",
                        not problems, "\n".join(problems))
    return facts


def fleet_problems(fleet: dict, c: dict, volumes: dict, mounts: dict, docs: list[dict]) -> list[str]:
    """What a `fleet:` block needs from its pod (SPEC section 10, deploy/README.md "Fleet")."""
    problems = []
    store = str(fleet.get("store", ""))
    url = urllib.parse.urlsplit(store)
    if url.password:
        problems.append("fleet.store has a password in its URL, i.e. in a ConfigMap: use fleet.password_file on a Secret")
    pw = fleet.get("password_file")
    if pw:
        pm = mounts.get(str(Path(pw).parent))
        secret = volumes.get(pm["name"], {}).get("secret") if pm else None
        if secret is None:
            problems.append(f"fleet.password_file {pw} does not live on a mounted Secret")
        elif secret.get("optional"):
            problems.append(f"fleet.password_file {pw}: its Secret volume is optional: the pod would start without the password")
    if not fleet.get("replica"):
        env = {e["name"]: e for e in c.get("env") or []}
        named = [n for n in ("ROLLGATE_REPLICA", "POD_NAME")
                 if ((env.get(n) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"]
        if not named:
            problems.append("fleet.replica is unset and neither ROLLGATE_REPLICA nor POD_NAME is the pod's name (fieldRef metadata.name)")
    # A store that is a Service of the same kustomization: the URL must name one of its ports.
    host = (url.hostname or "").split(".")[0]
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    if host in services:
        ports = {p["port"] for p in services[host]["spec"].get("ports", [])}
        if (url.port or 6379) not in ports:
            problems.append(f"fleet.store {store}: Service {host} has ports {sorted(ports)}")
    return problems


def lint_fleet_stores(res: Results, rendered: dict[Path, list[dict]]) -> None:
    """The reference store (components/fleet-redis) as rendered in each overlay that uses it."""
    for d, docs in rendered.items():
        for wl, pod in pod_templates(docs):
            if (wl["metadata"].get("labels") or {}).get("app.kubernetes.io/component") != "rollgate-fleet-store":
                continue
            problems = []
            spec = wl["spec"]
            if spec.get("replicas", 1) != 1 or (spec.get("strategy") or {}).get("type") != "Recreate":
                problems.append("a single-instance store needs replicas: 1 and strategy Recreate (two pods = two stores)")
            psc = pod.get("securityContext") or {}
            for c in pod.get("containers") or []:
                sc = c.get("securityContext") or {}
                if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                    problems.append(f"{c['name']}: runAsNonRoot is not set")
                if not sc.get("readOnlyRootFilesystem"):
                    problems.append(f"{c['name']}: readOnlyRootFilesystem is not set")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{c['name']}: allowPrivilegeEscalation is not false")
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    problems.append(f"{c['name']}: capabilities do not drop ALL")
                if ((sc.get("seccompProfile") or psc.get("seccompProfile")) or {}).get("type") != "RuntimeDefault":
                    problems.append(f"{c['name']}: no RuntimeDefault seccomp profile")
                r = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    for what in ("cpu", "memory"):
                        if what not in (r.get(kind) or {}):
                            problems.append(f"{c['name']}: no {kind}.{what}")
                if not re.search(r":[\w.-]+$", c.get("image", "")) or c["image"].endswith(":latest"):
                    problems.append(f"{c['name']}: image {c.get('image')!r} is not pinned to a version")
                if not (c.get("readinessProbe") and c.get("livenessProbe")):
                    problems.append(f"{c['name']}: needs readiness and liveness probes")
                args = [str(a) for a in c.get("args") or []] + [""]
                env = {e["name"]: e for e in c.get("env") or []}
                if "--requirepass" not in args:
                    problems.append(f"{c['name']}: no --requirepass (an open store lets anyone roll versions back)")
                else:
                    m = re.fullmatch(r"\$\((\w+)\)", args[args.index("--requirepass") + 1])
                    if not m or "secretKeyRef" not in ((env.get(m.group(1)) or {}).get("valueFrom") or {}):
                        problems.append(f"{c['name']}: --requirepass is not $(VAR) of an env var from a secretKeyRef")
            res.add(f"manifest {rel(d)}: {wl['kind']}/{wl['metadata']['name']} (fleet store)", not problems, "\n".join(problems))


def lint_crds(res: Results) -> None:
    for f in (PROM / "flagger-metrictemplates.yaml", PROM / "argo-analysistemplate.yaml", PROM / "podmonitor.yaml", PROMETHEUSRULE):
        problems = []
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            k = doc.get("kind")
            if not doc.get("apiVersion", "").startswith(CRD_GROUPS) or not doc.get("metadata", {}).get("name"):
                problems.append(f"{k}: apiVersion or metadata.name missing")
            spec = doc.get("spec") or {}
            if k == "MetricTemplate" and not (spec.get("provider", {}).get("type") == "prometheus" and spec.get("query")):
                problems.append("MetricTemplate needs spec.provider.type prometheus and spec.query")
            if k == "AnalysisTemplate":
                args = {a["name"] for a in spec.get("args", [])}
                for m in spec.get("metrics", []):
                    used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", json.dumps(m)))
                    if used - args:
                        problems.append(f"metric {m.get('name')} uses undeclared args {sorted(used - args)}")
                    if not m.get("successCondition"):
                        problems.append(f"metric {m.get('name')} has no successCondition")
            if k == "PodMonitor" and not spec.get("podMetricsEndpoints"):
                problems.append("PodMonitor without podMetricsEndpoints")
        res.add(f"structure {rel(f)}", not problems, "\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Dockerfile


def check_dockerfile(res: Results, facts: dict) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
    problems = []
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    if len(froms) < 2:
        problems.append("not multi-stage")
    final = froms[-1] if froms else ""
    if not re.search(r"distroless|-slim|scratch", final):
        problems.append(f"final stage {final!r} is not a small base")
    last = lines[lines.index(final):] if final else []
    users = [l.split()[1] for l in last if l.upper().startswith("USER ")]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problems.append("final stage has no numeric non-root USER")
    if not re.search(r"cargo build --release --locked", text):
        problems.append("no `cargo build --release --locked`")
    exposed = {int(p.split("/")[0]) for l in last if l.upper().startswith("EXPOSE ") for p in l.split()[1:]}
    if facts["ports"] and not facts["ports"] <= exposed:
        problems.append(f"manifests use container ports {sorted(facts['ports'])}, EXPOSE has {sorted(exposed)}")
    cmd = next((l for l in reversed(last) if l.upper().startswith("CMD ")), "")
    try:
        cmd_args = tuple(json.loads(cmd[4:]))
    except ValueError:
        cmd_args = ()
        problems.append("CMD is not in exec form")
    if cmd_args and facts["args"] and cmd_args not in facts["args"]:
        problems.append(f"CMD {list(cmd_args)} differs from the manifests' args {sorted(map(list, facts['args']))}")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    # Scripts the build runs (benches/pgo.sh for the profile-guided build) must be in the
    # context, executable, build what Cargo.lock pins too, and find the tools they check for
    # (`for tool in ...`) installed by the Dockerfile.
    installed = set()
    for l in lines:
        for command in l.split("&&"):
            if "apt-get install" in command:
                installed |= {w for w in command.split("apt-get install", 1)[1].split() if not w.startswith("-")}
    package = {"h2load": "nghttp2-client"}
    for script in sorted(set(re.findall(r"\b(benches/[\w.-]+\.sh)\b", " ".join(lines)))):
        path = ROOT / script
        if not path.is_file() or not os.access(path, os.X_OK):
            problems.append(f"the build runs {script}, which is missing or not executable")
            continue
        body = re.sub(r"\\\n", " ", path.read_text())  # continuation lines joined
        for l in body.splitlines():
            if re.search(r"\bcargo (build|b|run|install)\b", l) and "--locked" not in l:
                problems.append(f"{script} runs cargo build without --locked: {l.strip()}")
        for tools in re.findall(r"for tool in ([^;]+);", body):
            for tool in tools.split():
                if package.get(tool, tool) not in installed:
                    problems.append(f"{script} needs {tool}; the Dockerfile does not install {package.get(tool, tool)}")
        if any(script == i or script.startswith(i.rstrip("/") + "/") for i in ignore):
            problems.append(f"Dockerfile.dockerignore excludes {script}")
    for needed in ("Cargo.toml", "Cargo.lock", "src"):
        if needed in ignore:
            problems.append(f"Dockerfile.dockerignore excludes {needed}")
    p = run(["cargo", "metadata", "--locked", "--format-version", "1"], cwd=ROOT, timeout=120)
    if p.returncode != 0:
        problems.append("Cargo.lock is not in sync with Cargo.toml (`cargo build --locked` would fail): " + p.stderr.strip()[-300:])
    res.add("dockerfile deploy/Dockerfile (static: docker build is not run here)", not problems, "\n".join(problems))


# ---------------------------------------------------------------------------------------------
# Prometheus files


def prometheusrule_text() -> str:
    rules = RULES.read_text()
    body = rules[rules.index("groups:"):]
    indented = "".join(("  " + l) if l.strip() else l for l in body.splitlines(keepends=True))
    return (
        "# GENERATED from rollgate.rules.yml by `python3 deploy/test/deploy_check.py prometheusrule`:\n"
        "# edit the rules file, regenerate, and CI checks the two match.\n"
        "#\n"
        "# prometheus-operator: the same recording and alerting rules as a PrometheusRule. Your\n"
        "# Prometheus must select it (ruleSelector, often a `release: <helm release>` label).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: rollgate\n"
        "  labels:\n"
        "    app.kubernetes.io/name: rollgate\n"
        "spec:\n" + indented
    )


def check_prometheus_files(res: Results, tmp: Path) -> None:
    p = run(["promtool", "check", "rules", str(RULES)])
    res.add(f"promtool check rules {rel(RULES)}", p.returncode == 0, outcome(p))
    p = run(["promtool", "test", "rules", str(PROM / "rollgate.rules.test.yml")], cwd=PROM)
    res.add("promtool test rules deploy/prometheus/rollgate.rules.test.yml", p.returncode == 0, outcome(p))
    # Debian's Prometheus is built without Kubernetes service discovery: check the same file with
    # a static target in place of kubernetes_sd_configs (the relabelling is still checked).
    sc = (PROM / "scrape-config.yml").read_text()
    sc = sc.replace("kubernetes_sd_configs:", "static_configs:").replace("- role: pod", '- targets: ["127.0.0.1:9902"]')
    (tmp / "scrape-config.yml").write_text(sc)
    shutil.copy(RULES, tmp / "rollgate.rules.yml")
    p = run(["promtool", "check", "config", str(tmp / "scrape-config.yml")])
    res.add("promtool check config deploy/prometheus/scrape-config.yml (kubernetes_sd swapped for static)",
            p.returncode == 0, outcome(p))
    ok = PROMETHEUSRULE.exists() and PROMETHEUSRULE.read_text() == prometheusrule_text()
    if ok:
        ok = yaml.safe_load(PROMETHEUSRULE.read_text())["spec"] == yaml.safe_load(RULES.read_text())
    res.add("deploy/prometheus/prometheusrule.yaml matches rollgate.rules.yml", ok,
            "regenerate: python3 deploy/test/deploy_check.py prometheusrule > deploy/prometheus/prometheusrule.yaml")


def check_dashboard_static(res: Results) -> dict:
    problems = []
    try:
        dash = json.loads(DASHBOARD.read_text())
    except ValueError as e:
        res.add(f"dashboard {rel(DASHBOARD)} is valid JSON", False, str(e))
        return {}
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        problems.append("duplicate panel ids")
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        if not p.get("targets"):
            problems.append(f"panel {p['title']!r} has no query")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"panel {p['title']!r} does not use the $datasource variable")
    titles = [p["title"] for p in dash["panels"]]
    for must in ("Request rate by version", "Error rate by version", "Time to first byte (p50, p99)",
                 "Total duration (p50, p99)", "Effective weights"):
        if must not in titles:
            problems.append(f"no panel {must!r}")
    if "Rollbacks" not in [a["name"] for a in dash["annotations"]["list"]]:
        problems.append("no Rollbacks annotation")
    res.add(f"dashboard {rel(DASHBOARD)} structure", not problems, "\n".join(problems))
    return dash


# ---------------------------------------------------------------------------------------------
# Live stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def http_post(url: str, body: dict, token: str | None = None, timeout: float = 10) -> tuple[int, str]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


class Procs:
    """Processes this script started; stopped by pid (each leads its own process group)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=self.tmp)
        self.procs[name] = p
        return p

    def log(self, name: str, tail: int = 25) -> str:
        try:
            lines = (self.tmp / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    def stop(self, name: str, timeout: float = 30) -> int | None:
        p = self.procs.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        return p.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name, timeout=10)


def wait_until(pred, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return False


class Load:
    """Closed-loop chat completions through the data plane from a few threads, rate-limited:
    a quarter streamed (SSE), sticky per x-user-id, and now and then a request the proxy refuses
    (an unknown pinned version: 400) so every classification shows up."""

    def __init__(self, port: int, rps: float = 150, threads: int = 6) -> None:
        self.port, self.interval = port, threads / rps
        self.stop_flag = threading.Event()
        self.counts = {"ok": 0, "failed": 0, "refused": 0}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def loop(self, i: int) -> None:
        rng = random.Random(i)
        conn = None
        while not self.stop_flag.is_set():
            t0 = time.monotonic()
            stream = rng.random() < 0.25
            body = json.dumps({"model": "chat", "stream": stream,
                               "messages": [{"role": "user", "content": f"question {rng.randrange(1000)}"}]})
            headers = {"content-type": "application/json", "x-user-id": f"user-{rng.randrange(200)}"}
            refused = rng.random() < 0.02
            if refused:
                headers["x-rollgate-version"] = "no-such-version"
            kind = "failed"
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                r = conn.getresponse()
                r.read()
                kind = "ok" if r.status < 300 else ("refused" if r.status < 500 else "failed")
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.counts[kind] += 1
            self.stop_flag.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        if conn is not None:
            conn.close()

    def stop(self) -> dict:
        self.stop_flag.set()
        for t in self.threads:
            t.join(15)
        return dict(self.counts)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, params: dict) -> dict:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url, timeout=30)
        try:
            data = json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {status}: {body[:300]}"}
        return data

    def query_range(self, expr: str, start: float, end: float, step: float) -> tuple[bool, str]:
        """(has data, detail): data = at least one sample that is a number (not NaN)."""
        d = self.api("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
        if d.get("status") != "success":
            return False, f"query error: {d.get('error')}"
        series = d["data"]["result"]
        points = sum(1 for s in series for _, v in s["values"] if not math.isnan(float(v)))
        return points > 0, f"{len(series)} series, {points} points"

    def query(self, expr: str, at: float | None = None) -> tuple[bool, str, list]:
        params = {"query": expr}
        if at:
            params["time"] = f"{at:.3f}"
        d = self.api("query", params)
        if d.get("status") != "success":
            return False, f"query error: {d.get('error')}", []
        result = d["data"]["result"]
        vals = [r for r in result if not math.isnan(float(r["value"][1]))]
        return bool(vals), f"{len(vals)} series", result


def grafana_expr(expr: str, step: float, window: float) -> str:
    """Substitutes Grafana's variables as Grafana would for this time range, with every
    template variable at its `All` value (.*)."""
    subs = {
        "$__rate_interval": f"{int(max(4 * 1, step + 1))}s",   # max(4 x scrape, step + scrape)
        "$__interval": f"{int(step)}s",
        "$__range": f"{int(window)}s",
    }
    for k, v in subs.items():
        expr = expr.replace(k, v)
    return re.sub(r"\$\{?(namespace|job|route|version)\}?", ".*", expr)


def metric_names(text: str) -> set[str]:
    """Metric names in PromQL text; recording-rule names (level:metric:op) are not metrics."""
    return set(re.findall(r"(?<![\w:])(rollgate_[a-z0-9_]+)(?![\w:])", text))


def exposition_families(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, 1)[0])
    return names


def live_config(base: dict, ports: dict, tmp: Path, token_file: Path) -> dict:
    """The base gateway config with loopback addresses, the mock upstreams, and faster health
    checks; every other key (routes, rules, drain_timeout...) as shipped."""
    cfg = json.loads(json.dumps(base, default=str))
    cfg["listen"] = f"127.0.0.1:{ports['data']}"
    cfg["admin"] = {"listen": f"127.0.0.1:{ports['admin']}", "token_file": str(token_file)}
    cfg["health_listen"] = f"127.0.0.1:{ports['health']}"
    cfg["state_dir"] = str(tmp / "state")
    for i, (name, v) in enumerate(sorted(cfg["versions"].items(), key=lambda kv: kv[0] != cfg["routes"][0]["baseline"])):
        v["endpoints"] = [f"http://127.0.0.1:{ports['mock%d' % i]}"]
        if v.get("health_check"):
            v["health_check"]["interval"] = "1s"
    return cfg


def live(res: Results, rollgate: str, tmp: Path, dash: dict) -> None:
    base = yaml.safe_load((K8S / "base" / "rollgate.yaml").read_text())
    route = base["routes"][0]["name"]
    baseline = base["routes"][0]["baseline"]
    candidate = next(v for v in base["routes"][0]["split"] if v != baseline)
    ports = {k: free_port() for k in ("mock0", "mock1", "data", "admin", "health", "prom")}
    token = "ci-" + os.urandom(12).hex()
    token_file = tmp / "token"
    token_file.write_text(token + "\n")
    cfg_dir = tmp / "config"
    cfg_dir.mkdir()
    cfg_file = cfg_dir / "rollgate.yaml"
    cfg = live_config(base, ports, tmp, token_file)
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    admin = f"http://127.0.0.1:{ports['admin']}"
    health = f"http://127.0.0.1:{ports['health']}"
    data_url = f"http://127.0.0.1:{ports['data']}/v1/chat/completions"
    procs = Procs(tmp)
    load = None
    try:
        # -- start --------------------------------------------------------------------------------
        names = {0: baseline, 1: candidate}
        for i in (0, 1):
            procs.start(f"mock{i}", [rollgate, "mock-model", "--listen", f"127.0.0.1:{ports['mock%d' % i]}",
                                     "--name", names[i], "--chunks", "6", "--chunk-interval", "15ms"])
        for i in (0, 1):
            ok = wait_until(lambda: f'"{names[i]}"' in http_get(f"http://127.0.0.1:{ports['mock%d' % i]}/v1/models", 1)[1], 15)
            if not res.add(f"live: mock model {names[i]} serves on 127.0.0.1:{ports['mock%d' % i]}", ok, procs.log(f"mock{i}")):
                return
        procs.start("rollgate", [rollgate, "run", "-c", str(cfg_file), "--log-format", "json"])
        ok = wait_until(lambda: http_get(f"{health}/readyz", 1)[0] == 200, 20)
        if not res.add("live: rollgate run (deploy/kubernetes/base config) is ready on health_listen", ok, procs.log("rollgate")):
            return
        prom_cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "rollgate",
                "metrics_path": "/metrics",
                # The labels Kubernetes discovery would add.
                "static_configs": [{"targets": [f"127.0.0.1:{ports['health']}"],
                                    "labels": {"namespace": "ci", "pod": "rollgate-ci-0", "container": "rollgate"}}],
            }],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
        procs.start("prometheus", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{ports['prom']}",
                                   "--storage.tsdb.retention.time=1h", "--log.level=warn"])
        prom = Prometheus(ports["prom"])
        ok = wait_until(lambda: http_get(f"{prom.base}/-/ready", 1)[0] == 200, 30)
        if not res.add("live: prometheus ready (1 s scrape and rule evaluation, rollgate.rules.yml loaded)", ok, procs.log("prometheus")):
            return
        ok = wait_until(lambda: prom.query('up{job="rollgate"} == 1')[0], 15)
        if not res.add("live: prometheus scrapes rollgate's health listener", ok, procs.log("prometheus")):
            return
        t_start = time.time()

        # -- traffic and events -----------------------------------------------------------------------
        load = Load(ports["data"]).start()
        time.sleep(12)
        st, body = http_post(f"{admin}/api/v1/reload", {}, token)
        res.add("live: POST /api/v1/reload with the token", st == 200, f"HTTP {st} {body[:300]}")
        good = cfg_file.read_text()
        cfg_file.write_text(good + "\nbogus_key: 1\n")                      # the watcher sees this
        time.sleep(2)
        st, body = http_post(f"{admin}/api/v1/reload", {}, token)
        res.add("live: an invalid config is rejected (HTTP 422) and changes nothing", st == 422, f"HTTP {st} {body[:300]}")
        cfg_file.write_text(good)
        time.sleep(2)
        p = run([rollgate, "rollback", "--version", candidate, "--reason", "deploy-check", "--operator", "ci",
                 "--admin", admin, "--token-file", str(token_file)], timeout=30)
        res.add(f"live: rollgate rollback --version {candidate}", p.returncode == 0, (p.stdout + p.stderr).strip()[-800:])
        time.sleep(4)                       # a few rule evaluations while the rollback is fresh
        p = run([rollgate, "resume", "--version", candidate, "--reason", "deploy-check", "--admin", admin,
                 "--token-file", str(token_file)], timeout=30)
        res.add(f"live: rollgate resume --version {candidate}", p.returncode == 0, (p.stdout + p.stderr).strip()[-800:])
        time.sleep(3)
        p = run([rollgate, "drill", "--version", candidate, "--fault", "error=0.3", "--timeout", "45s",
                 "--load", data_url, "--operator", "ci", "--admin", admin, "--token-file", str(token_file)], timeout=90)
        res.add(f"live: rollgate drill --version {candidate} --fault error=0.3 (real automatic rollback, resumed)",
                p.returncode == 0, (p.stdout + p.stderr).strip()[-1500:])
        time.sleep(10)
        # The baseline's model server goes away: health checks fail, the route turns degraded.
        procs.stop("mock0", timeout=10)
        degraded = wait_until(lambda: prom.query(f'rollgate_route_degraded{{route="{route}"}} == 1')[0], 20, 0.5)
        res.add(f"live: route {route} turns degraded when its baseline's upstream dies", degraded, procs.log("rollgate", 10))
        time.sleep(4)
        counts = load.stop()
        load = None
        res.add("live: load through the data plane", counts["ok"] > 500, json.dumps(counts))
        time.sleep(3)                       # the last scrapes and rule evaluations
        t_end = time.time()
        window = t_end - t_start
        step = 2.0

        # -- what rollgate exports ---------------------------------------------------------------------
        st, admin_metrics = http_get(f"{admin}/metrics")
        st2, health_metrics = http_get(f"{health}/metrics")
        fam_admin, fam_health = exposition_families(admin_metrics), exposition_families(health_metrics)
        res.add("live: /metrics on the admin and health listeners export the same series",
                st == st2 == 200 and fam_admin == fam_health, f"only admin: {sorted(fam_admin - fam_health)}, only health: {sorted(fam_health - fam_admin)}")
        referenced = set()
        sources = [DASHBOARD, RULES, PROM / "flagger-metrictemplates.yaml", PROM / "argo-analysistemplate.yaml"]
        for f in sources:
            referenced |= metric_names(f.read_text())
        missing = sorted(n for n in referenced if n not in fam_health)
        res.add(f"live: all {len(referenced)} rollgate metric names used in deploy/ are exported",
                not missing, f"not exported by a live rollgate: {missing}")

        # -- dashboard -----------------------------------------------------------------------------------
        for p_ in dash.get("panels", []):
            for t in p_.get("targets", []):
                expr = grafana_expr(t["expr"], step, window)
                if t.get("instant"):
                    ok, detail, _ = prom.query(expr, t_end)
                else:
                    ok, detail = prom.query_range(expr, t_start, t_end, step)
                res.add(f"live: dashboard panel {p_['title']!r} query {t['refId']}", ok, f"{detail}\n{expr}")
        for a in dash.get("annotations", {}).get("list", []):
            if "expr" not in a:
                continue
            expr = grafana_expr(a["expr"], step, window)
            ok, detail = prom.query_range(expr, t_start, t_end, step)
            res.add(f"live: dashboard annotation {a['name']!r}", ok, f"{detail}\n{expr}")
        for v in dash.get("templating", {}).get("list", []):
            if v.get("type") != "query":
                continue
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["definition"])
            if not m:
                res.add(f"live: dashboard variable ${v['name']}", False, f"cannot read {v['definition']!r}")
                continue
            sel, label = grafana_expr(m.group(1), step, window), m.group(2)
            d = prom.api("series", {"match[]": sel, "start": f"{t_start:.0f}", "end": f"{t_end:.0f}"})
            values = sorted({s.get(label, "") for s in d.get("data", [])} - {""})
            res.add(f"live: dashboard variable ${v['name']} has values", bool(values), f"{values}")

        # -- recording rules and alerts -------------------------------------------------------------------
        rules = yaml.safe_load(RULES.read_text())
        for g in rules["groups"]:
            for r in g["rules"]:
                if "record" in r:
                    ok, detail = prom.query_range(r["record"], t_start, t_end, step)
                    res.add(f"live: recording rule {r['record']}", ok, detail)
        d = prom.api("rules", {})
        bad = [f"{r.get('name')}: {r.get('lastError')}" for g in d.get("data", {}).get("groups", [])
               for r in g["rules"] if r.get("health") != "ok"]
        res.add("live: every rule evaluates without error", d.get("status") == "success" and not bad, "\n".join(bad))
        for alert, state in (("RollgateRollback", "pending"), ("RollgateConfigReloadFailing", "firing"),
                             ("RollgateRouteDegraded", "pending")):
            ok, detail = prom.query_range(f'ALERTS{{alertname="{alert}", alertstate=~"{state}|firing"}}', t_start, t_end, 1)
            res.add(f"live: alert {alert} went {state} on its event", ok, detail)
        # The drill rolled back for real, and the rule saw it; the alert's expression must still be
        # empty for it, because the drill recorded itself.
        alert_expr = next(r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == "RollgateRollback")
        seen, _, _ = prom.query('route_trigger:rollgate_rollbacks:increase5m{trigger!="manual"} > 0', t_end)
        _, _, firing = prom.query(alert_expr, t_end)
        drill_alerts = [r["metric"] for r in firing if r["metric"].get("trigger") != "manual"]
        res.add("live: RollgateRollback stays silent for the drill's (counted) rollback", seen and not drill_alerts,
                f"drill rollback counted: {seen}; alert series for it: {drill_alerts}")

        # -- Flagger and Argo Rollouts templates ----------------------------------------------------------
        subs = {"{{ namespace }}": "ci", "{{ variables.route }}": route, "{{ variables.version }}": candidate,
                "{{ interval }}": "30s", "{{args.namespace}}": "ci", "{{args.route}}": route, "{{args.version}}": candidate}

        def fill(q: str) -> str:
            for k, v in subs.items():
                q = q.replace(k, v)
            return q

        for doc in yaml.safe_load_all((PROM / "flagger-metrictemplates.yaml").read_text()):
            expr = fill(doc["spec"]["query"])
            ok, detail = prom.query_range(expr, t_start, t_end, step)
            res.add(f"live: Flagger MetricTemplate {doc['metadata']['name']}", ok and "{{" not in expr, f"{detail}\n{expr}")
        for doc in yaml.safe_load_all((PROM / "argo-analysistemplate.yaml").read_text()):
            for m in doc["spec"]["metrics"]:
                expr = fill(m["provider"]["prometheus"]["query"])
                ok, detail = prom.query_range(expr, t_start, t_end, step)
                res.add(f"live: Argo AnalysisTemplate {doc['metadata']['name']} metric {m['name']}", ok and "{{" not in expr, f"{detail}\n{expr}")

        # -- drain -----------------------------------------------------------------------------------------
        t0 = time.monotonic()
        rc = procs.stop("rollgate", timeout=40)
        res.add("live: rollgate drains and exits 0 on SIGTERM", rc == 0, f"exit {rc} after {time.monotonic() - t0:.1f} s\n{procs.log('rollgate', 10)}")
    finally:
        if load is not None:
            load.stop()
        procs.stop_all()


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "static", "prometheusrule"])
    ap.add_argument("--rollgate", default=os.environ.get("ROLLGATE_BIN", str(ROOT / "target/debug/rollgate")))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, TSDB)")
    a = ap.parse_args()
    if a.what == "prometheusrule":
        sys.stdout.write(prometheusrule_text())
        return 0
    t0 = time.monotonic()
    res = Results()
    tmp = Path(tempfile.mkdtemp(prefix="rollgate-deploy-check-"))
    # SIGTERM (CI timeout, the wrapper's trap) unwinds through the `finally` that stops processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        rendered = render_all(res)
        validate_schemas(res, rendered)
        check_configs(res, a.rollgate, rendered, tmp)
        facts = lint_manifests(res, rendered)
        lint_fleet_stores(res, rendered)
        lint_crds(res)
        check_dockerfile(res, facts)
        check_prometheus_files(res, tmp)
        dash = check_dashboard_static(res)
        if a.what == "all":
            live(res, a.rollgate, tmp, dash)
    finally:
        failed = any(not ok for _, ok, _ in res.items)
        if a.keep or failed:
            print(f"\nlogs and data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return res.summary(time.monotonic() - t0)


if __name__ == "__main__":
    sys.exit(main())
