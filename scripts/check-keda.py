#!/usr/bin/env python3
"""Check what kubernetes-validate cannot, in deploy/, offline.

- Every KEDA ScaledObject in deploy/kubernetes against a JSON schema
  written from KEDA's documented ScaledObject spec and prometheus scaler
  (v2.16; unknown fields fail).
- Cross-references between the manifests: the ScaledObject's target
  Deployment exists; each worker's terminationGracePeriodSeconds exceeds
  its INFERQ_SHUTDOWN_GRACE_SECS; PDB and Service selectors match pod
  labels; referenced ConfigMaps, Secrets, keys, ports and namespaces exist.
- deploy/grafana/*.json: every panel has a title and a data source, and
  every metric a query names is one inferq exports (METRICS below).

scripts/check-deploy.sh runs this after kubernetes-validate. Exit 1 with
the problems listed.
"""
import json
import pathlib
import re
import sys

import jsonschema
import yaml

root = pathlib.Path(__file__).resolve().parent.parent
kube_dir = root / "deploy/kubernetes"
grafana_dir = root / "deploy/grafana"

# The metrics inferq exports. Must match the code: the names passed to
# metrics::counter!/gauge!/histogram! in api/, worker/ and queue-core/
# (checked below when the sources are present). Queue gauges come from the
# API's /metrics, the rest from the workers' (and the API's own counters).
API_QUEUE_GAUGES = {
    "inferq_queue_ready",  # {queue, priority}
    "inferq_queue_scheduled",  # {queue}
    "inferq_queue_running",  # {queue}
    "inferq_queue_oldest_ready_age_seconds",  # {queue, priority}
}
GAUGES = API_QUEUE_GAUGES | {
    "inferq_worker_in_flight",
    "inferq_worker_concurrency",
    "inferq_backend_concurrency_limit",  # {backend}
    "inferq_backend_breaker_state",  # {backend}: 0 closed, 1 half-open, 2 open
}
COUNTERS = {
    "inferq_tasks_submitted_total",  # {queue}, API
    "inferq_tasks_started_total",  # {queue}
    "inferq_tasks_succeeded_total",  # {queue}
    "inferq_tasks_failed_total",  # {queue}
    "inferq_tasks_retried_total",  # {queue}
    "inferq_tasks_released_total",  # {queue}
    "inferq_tasks_cancelled_total",  # {queue}, API
    "inferq_tasks_lease_expired_total",  # {queue}
    "inferq_backend_requests_total",  # {backend}
    "inferq_backend_errors_total",  # {backend, class}
    "inferq_backend_tokens_total",  # {backend, direction}
    "inferq_api_unavailable_total",  # API
}
HISTOGRAMS = {
    "inferq_task_queued_seconds",  # {queue}
    "inferq_task_running_seconds",  # {queue}
    "inferq_task_end_to_end_seconds",  # {queue}
    "inferq_backend_latency_seconds",  # {backend}
}
METRICS = GAUGES | COUNTERS | HISTOGRAMS

problems = []


def problem(msg):
    if msg not in problems:
        problems.append(msg)


# --- KEDA ScaledObject schema -------------------------------------------
# Written from https://keda.sh/docs/2.16/reference/scaledobject-spec/ and
# https://keda.sh/docs/2.16/scalers/prometheus/. Trigger metadata is a
# map of strings in KEDA's CRD, so numbers there must be quoted.
NUMBER_STRING = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}
BOOL_STRING = {"type": "string", "enum": ["true", "false"]}
HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
PROMETHEUS_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["serverAddress", "query", "threshold"],
    "properties": {
        "serverAddress": {"type": "string", "pattern": r"^https?://[^\s]+$"},
        "query": {"type": "string", "minLength": 1},
        "threshold": NUMBER_STRING,
        "activationThreshold": NUMBER_STRING,
        "namespace": {"type": "string"},
        "customHeaders": {"type": "string"},
        "ignoreNullValues": BOOL_STRING,
        "queryParameters": {"type": "string"},
        "unsafeSsl": BOOL_STRING,
        "authModes": {"type": "string"},
    },
}
SCALED_OBJECT = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        # The ObjectMeta fields a manifest in this repository uses.
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": HPA_RULES, "scaleDown": HPA_RULES},
                                },
                            },
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["target", "formula"],
                            "properties": {
                                "target": {"type": "string"},
                                "activationTarget": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value"]},
                                "formula": {"type": "string"},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string", "minLength": 1},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "name": {"type": "string"},
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                                },
                            },
                        },
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {"properties": {"metadata": PROMETHEUS_METADATA}},
                    },
                },
            },
        },
    },
}


# --- PromQL: which metric names does an expression use? ------------------
# Not a parser: strips strings, label matchers, ranges, label lists and
# Grafana variables; what is left that is an identifier not followed by
# "(" (a function or aggregation) and not a keyword is a metric name.
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
                   "bool", "and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr):
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    if "__name__" in s:
        problem(f"query selects by __name__, name the metric instead: {expr}")
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue  # the unit or exponent of a number: 5m, 1e3
        if s[m.end():].lstrip().startswith("("):
            continue
        if m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def unknown_metrics(expr):
    """Names in expr that inferq does not export, with a reason each."""
    bad = []
    for name in sorted(metric_names(expr)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in GAUGES or name in COUNTERS:
            continue
        if base in HISTOGRAMS and base != name:
            continue
        if name in HISTOGRAMS:
            bad.append(f"{name} (a histogram: use {name}_bucket, _sum or _count)")
        else:
            bad.append(f"{name} (not exported by inferq)")
    return bad


# --- Load the manifests -------------------------------------------------
docs = []  # (file name, object)
for path in sorted(kube_dir.glob("*.yaml")) + sorted(kube_dir.glob("*.yml")):
    try:
        objs = [o for o in yaml.safe_load_all(path.read_text()) if o is not None]
    except yaml.YAMLError as e:
        problem(f"{path.name}: not YAML: {e}")
        continue
    if not objs:
        problem(f"{path.name}: no objects")
    for obj in objs:
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            problem(f"{path.name}: an object without apiVersion and kind")
            continue
        docs.append((path.name, obj))
    # check-deploy.sh hands files without KEDA objects to kubernetes-validate
    # and leaves the others to this script, so a file must not mix them.
    keda = [o.get("apiVersion", "").startswith("keda.sh/") for o in objs if isinstance(o, dict)]
    if any(keda) and not all(keda):
        problem(f"{path.name}: mixes KEDA and core objects; give the KEDA objects their own file")

if not docs:
    problem(f"no manifests in {kube_dir.relative_to(root)}")


def name_of(obj):
    return (obj.get("metadata") or {}).get("name", "?")


def ns_of(obj):
    return (obj.get("metadata") or {}).get("namespace", "default")


def objects(kind):
    return [(f, o) for f, o in docs if o.get("kind") == kind]


def pod_specs():
    """(file, owner, namespace, pod template) of every workload."""
    for f, o in docs:
        spec = o.get("spec") or {}
        if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f, o, ns_of(o), spec.get("template") or {}


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


namespaces = {name_of(o) for _, o in objects("Namespace")}
configmaps = {(ns_of(o), name_of(o)): set((o.get("data") or {}) | (o.get("binaryData") or {}))
              for _, o in objects("ConfigMap")}
secrets = {(ns_of(o), name_of(o)): set((o.get("data") or {}) | (o.get("stringData") or {}))
           for _, o in objects("Secret")}

for f, o in docs:
    if o.get("kind") != "Namespace" and namespaces and ns_of(o) not in namespaces:
        problem(f"{f}: {o['kind']} {name_of(o)} is in namespace {ns_of(o)!r}, which no manifest defines")

# --- Workloads: selectors, config references, ports, drain time ---------
for f, o, ns, tmpl in pod_specs():
    kind, name = o["kind"], name_of(o)
    labels = (tmpl.get("metadata") or {}).get("labels") or {}
    pod = tmpl.get("spec") or {}
    if kind != "Job":
        sel = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not matches(sel, labels):
            problem(f"{f}: {kind} {name}: selector {sel} does not match its pod labels {labels}")
    for c in pod.get("containers") or []:
        where = f"{f}: {kind} {name}, container {c.get('name')}"
        ports = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
        for src in c.get("envFrom") or []:
            for key, known in (("configMapRef", configmaps), ("secretRef", secrets)):
                ref = src.get(key)
                if ref and not ref.get("optional") and (ns, ref.get("name")) not in known:
                    problem(f"{where}: envFrom {key} {ref.get('name')!r} is not defined in namespace {ns}")
        env = {}
        for e in c.get("env") or []:
            env[e.get("name")] = e.get("value")
            vf = e.get("valueFrom") or {}
            for key, known in (("configMapKeyRef", configmaps), ("secretKeyRef", secrets)):
                ref = vf.get(key)
                if not ref or ref.get("optional"):
                    continue
                keys = known.get((ns, ref.get("name")))
                if keys is None:
                    problem(f"{where}: env {e.get('name')}: {key} {ref.get('name')!r} is not defined in namespace {ns}")
                elif ref.get("key") not in keys:
                    problem(f"{where}: env {e.get('name')}: {ref.get('name')!r} has no key {ref.get('key')!r}")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = ((c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket") or {}).get("port")
            if isinstance(port, str) and port not in ports:
                problem(f"{where}: {probe} uses port {port!r}, which the container does not name")
        # The worker drains on SIGTERM for INFERQ_SHUTDOWN_GRACE_SECS (default
        # 30, see queue-core/src/config.rs); the kubelet sends SIGKILL after
        # terminationGracePeriodSeconds (default 30). The first must end first.
        if (c.get("command") or [""])[0] == "inferq-worker" or "INFERQ_SHUTDOWN_GRACE_SECS" in env:
            raw = env.get("INFERQ_SHUTDOWN_GRACE_SECS", "30")
            try:
                grace = int(raw)
            except (TypeError, ValueError):
                problem(f"{where}: INFERQ_SHUTDOWN_GRACE_SECS is {raw!r}, not a literal number of seconds")
                continue
            kill = pod.get("terminationGracePeriodSeconds", 30)
            if not kill > grace:
                problem(f"{where}: terminationGracePeriodSeconds ({kill}) must be greater than "
                        f"INFERQ_SHUTDOWN_GRACE_SECS ({grace}), or SIGKILL cuts the drain short")
            if "INFERQ_METRICS_BIND" not in env:
                problem(f"{where}: no INFERQ_METRICS_BIND, so the worker serves no /metrics")

workload_pods = [(ns, (t.get("metadata") or {}).get("labels") or {}, t.get("spec") or {}, o)
                 for _, o, ns, t in pod_specs() if o["kind"] != "Job"]

for f, o in objects("PodDisruptionBudget"):
    sel = ((o.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    if not any(ns == ns_of(o) and matches(sel, labels) for ns, labels, _, _ in workload_pods):
        problem(f"{f}: PodDisruptionBudget {name_of(o)}: selector {sel} matches no workload's pods")

for f, o in objects("Service"):
    spec = o.get("spec") or {}
    sel = spec.get("selector") or {}
    hits = [pod for ns, labels, pod, _ in workload_pods if ns == ns_of(o) and matches(sel, labels)]
    if not hits:
        problem(f"{f}: Service {name_of(o)}: selector {sel} matches no workload's pods")
    for p in spec.get("ports") or []:
        tp = p.get("targetPort", p.get("port"))
        for pod in hits:
            cports = [cp for c in pod.get("containers") or [] for cp in c.get("ports") or []]
            if isinstance(tp, str) and tp not in {cp.get("name") for cp in cports}:
                problem(f"{f}: Service {name_of(o)}: targetPort {tp!r} is not a named port of the selected pods")
            if isinstance(tp, int) and tp not in {cp.get("containerPort") for cp in cports}:
                problem(f"{f}: Service {name_of(o)}: targetPort {tp} is not a containerPort of the selected pods")

# --- ScaledObjects ------------------------------------------------------
validator = jsonschema.Draft202012Validator(SCALED_OBJECT)
scaled = objects("ScaledObject")
if docs and not scaled:
    problem("no ScaledObject in deploy/kubernetes")
for f, o in scaled:
    where = f"{f}: ScaledObject {name_of(o)}"
    errors = sorted(validator.iter_errors(o), key=lambda e: list(e.absolute_path))
    for e in errors:
        problem(f"{where}: schema: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}")
    if errors:
        continue
    spec = o["spec"]
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if lo > hi:
        problem(f"{where}: minReplicaCount {lo} is above maxReplicaCount {hi}")
    if "idleReplicaCount" in spec and not spec["idleReplicaCount"] < lo:
        problem(f"{where}: idleReplicaCount must be less than minReplicaCount")
    names = [t.get("name") for t in spec["triggers"] if t.get("name")]
    if len(names) != len(set(names)):
        problem(f"{where}: trigger names repeat: {names}")
    if "fallback" in spec and any(t.get("metricType", "AverageValue") != "AverageValue" for t in spec["triggers"]):
        problem(f"{where}: fallback works only when every trigger's metricType is AverageValue")
    for i, t in enumerate(spec["triggers"]):
        if t["type"] != "prometheus":
            continue
        query = t["metadata"]["query"]
        for bad in unknown_metrics(query):
            problem(f"{where}: trigger {t.get('name', i)}: query uses {bad}")
        if float(t["metadata"]["threshold"]) <= 0:
            problem(f"{where}: trigger {t.get('name', i)}: threshold must be above 0")
    ref = spec["scaleTargetRef"]
    kind, api = ref.get("kind", "Deployment"), ref.get("apiVersion", "apps/v1")
    targets = [t for _, t in docs if t.get("kind") == kind and t.get("apiVersion") == api
               and name_of(t) == ref["name"] and ns_of(t) == ns_of(o)]
    if not targets:
        problem(f"{where}: scaleTargetRef names {api} {kind} {ref['name']!r} in namespace "
                f"{ns_of(o)}, which deploy/kubernetes does not define")
    for t in targets:
        if "replicas" in (t.get("spec") or {}):
            problem(f"{where}: its target {kind} {ref['name']} sets replicas, which every "
                    "`kubectl apply` would reset under KEDA; leave it out")

# --- Grafana dashboards -------------------------------------------------
dashboards = sorted(grafana_dir.glob("*.json"))
if not dashboards:
    problem(f"no dashboard in {grafana_dir.relative_to(root)}")


def walk_panels(panels):
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


for path in dashboards:
    rel = path.relative_to(root)
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problem(f"{rel}: not JSON: {e}")
        continue
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    inputs = {i.get("name") for i in dash.get("__inputs") or []}

    def check_datasource(where, ds):
        if not ds:
            problem(f"{where}: no datasource")
            return
        uid = ds.get("uid", "") if isinstance(ds, dict) else ds
        m = re.fullmatch(r"\$\{?(\w+)\}?", uid or "")
        if m and m.group(1) not in inputs and (variables.get(m.group(1)) or {}).get("type") != "datasource":
            problem(f"{where}: datasource {uid} is neither a datasource variable nor an __inputs entry")

    for name, v in variables.items():
        if v.get("type") != "query":
            continue
        check_datasource(f"{rel}: variable {name}", v.get("datasource"))
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        for m in re.finditer(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", q):
            for bad in unknown_metrics(m.group(1)):
                problem(f"{rel}: variable {name} uses {bad}")
    ids = []
    panels = list(walk_panels(dash.get("panels")))
    if not panels:
        problem(f"{rel}: no panels")
    for p in panels:
        ids.append(p.get("id"))
        where = f"{rel}: panel {p.get('id')} {p.get('title', '')!r}"
        if not (p.get("title") or "").strip():
            problem(f"{where}: no title")
        if p.get("type") == "row":
            continue
        if p.get("type") not in ("timeseries", "stat", "gauge", "bargauge", "table", "text"):
            problem(f"{where}: panel type {p.get('type')!r} is not one this dashboard uses")
        if p.get("type") == "text":
            continue
        check_datasource(where, p.get("datasource"))
        targets = p.get("targets") or []
        if not targets:
            problem(f"{where}: no queries")
        for t in targets:
            expr = t.get("expr") or ""
            if not expr.strip():
                problem(f"{where}: query {t.get('refId')} is empty")
            for bad in unknown_metrics(expr):
                problem(f"{where}: query {t.get('refId')} uses {bad}")
    if len(ids) != len(set(ids)):
        problem(f"{rel}: panel ids repeat")

# --- The allow-list against the code ------------------------------------
# A name listed above that no source emits would leave a panel blank.
sources = [p for d in ("api/src", "worker/src", "queue-core/src") for p in (root / d).rglob("*.rs")]
if sources:
    literals, emitted = set(), set()
    for p in sources:
        text = p.read_text()
        literals |= set(re.findall(r'"(inferq_[a-z0-9_]+)"', text))
        emitted |= set(re.findall(r'(?:counter|gauge|histogram)!\(\s*"(inferq_[a-z0-9_]+)"', text))
        emitted |= set(re.findall(r'"(inferq_[a-z0-9_]+_(?:total|seconds))"', text))
    for name in sorted(METRICS - literals):
        problem(f"check-keda.py lists metric {name}, which no source under api/, worker/ or queue-core/ emits")
    for name in sorted(emitted - METRICS):
        print(f"note: the code emits {name}, which check-keda.py's METRICS does not list")

if problems:
    print("deploy/ is invalid:")
    for p in problems:
        print("  -", p)
    sys.exit(1)
print(f"deploy/ is consistent: {len(docs)} objects, {len(scaled)} ScaledObject(s) valid against the "
      f"KEDA 2.16 schema, {len(dashboards)} dashboard(s) using only exported metrics")
