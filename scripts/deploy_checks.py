#!/usr/bin/env python3
"""Offline checks of radflow's deployment files (run by scripts/validate-deploy.sh).

  deploy_checks.py manifests [--kubernetes-version 1.32] [--overlay NAME] FILE...
      Rendered Kubernetes manifests (`kubectl kustomize` output): every object is
      validated in strict mode, built-in kinds against the Kubernetes OpenAPI schemas
      of kubernetes-validate, custom resources against the schemas kept in k8s/schemas/;
      a kind that neither knows is an error (kubernetes-validate's command line only
      warns about it). Then radflow's policy: every container has requests and limits,
      runs as non-root with a read-only root file system, no privilege escalation and
      all capabilities dropped; long-running containers have startup, readiness and
      liveness probes; images carry a version tag; service account tokens are not
      mounted; every Deployment and StatefulSet has a PodDisruptionBudget; Secrets in
      a manifest hold only marked example values, and none in production overlays.

  deploy_checks.py monitoring REPO
      compose's monitoring profile: Prometheus scrapes services that compose defines,
      and every radflow service compose builds; its rule files are mounted into the
      Prometheus container; every alert has a severity and a summary, and the
      Kubernetes rules (ConfigMap radflow-prometheus-rules) are the same as compose's;
      Grafana's data source and dashboards are valid and refer to each other.

Exit status 1 and one line per finding when anything fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "k8s" / "schemas"

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}
# Overlays whose Secrets must come from outside the repository.
NO_SECRETS_OVERLAYS = {"prod", "gpu"}
EXAMPLE_VALUE = re.compile(r"^(example-|radflow$)")


def custom_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> JSON schema, from k8s/schemas/<group>_<version>_<Kind>.json."""
    out = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema.get("properties", {})
        api = props.get("apiVersion", {}).get("const")
        kind = props.get("kind", {}).get("const")
        if not api or not kind:
            raise SystemExit(f"{path}: schema must fix apiVersion and kind with const")
        jsonschema.Draft202012Validator.check_schema(schema)
        out[(api, kind)] = schema
    return out


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name', '?')}"


def validate_schema(doc: dict, version: str, crds: dict) -> list[str]:
    where = name_of(doc)
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crds:
        validator = jsonschema.Draft202012Validator(crds[key])
        return [
            f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
        ]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: unknown kind {key[0]} {key[1]}: no Kubernetes schema and none in k8s/schemas/"]
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(root)"
        return [f"{where}: {path}: {e.message}"]
    return []


def pod_spec(doc: dict) -> dict | None:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def pod_labels(doc: dict) -> dict:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("metadata", {}).get("labels", {})


def check_container(where: str, c: dict, pod_sc: dict, long_running: bool, init: bool) -> list[str]:
    out = []
    label = f"{where} container {c.get('name')}"
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                out.append(f"{label}: no {part}.{r}")
    sc = c.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or (pod_sc.get("runAsNonRoot") and "runAsNonRoot" not in sc)):
        out.append(f"{label}: runAsNonRoot is not true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.append(f"{label}: runs as user 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append(f"{label}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{label}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        out.append(f"{label}: privileged")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        out.append(f"{label}: capabilities are not all dropped")
    if sc.get("capabilities", {}).get("add"):
        out.append(f"{label}: adds capabilities")
    image = c.get("image", "")
    tag = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
        out.append(f"{label}: image {image!r} has no version tag")
    # Init containers run to completion before the pod starts and cannot have probes;
    # Job containers run to completion too: probes apply to long-running containers.
    if long_running and not init:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in c:
                out.append(f"{label}: no {probe}")
    return out


def check_policy(docs: list[dict], overlay: str | None) -> list[str]:
    out = []
    pdb_selectors = [
        d.get("spec", {}).get("selector", {}).get("matchLabels", {})
        for d in docs
        if d.get("kind") == "PodDisruptionBudget"
    ]
    for doc in docs:
        kind = doc.get("kind")
        where = name_of(doc)
        if kind == "Secret":
            if overlay in NO_SECRETS_OVERLAYS:
                out.append(f"{where}: a Secret in overlay {overlay}: take it from the secret store")
            values = {**doc.get("stringData", {})}
            for k, v in doc.get("data", {}).items():
                values[k] = base64.b64decode(v).decode("utf-8", "replace")
            for k, v in values.items():
                if not EXAMPLE_VALUE.match(v):
                    out.append(f"{where}: {k} is not a marked example value (example-…)")
        if kind not in WORKLOADS:
            continue
        spec = pod_spec(doc)
        if spec is None:
            out.append(f"{where}: no pod template")
            continue
        pod_sc = spec.get("securityContext", {})
        if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: no RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{where}: automountServiceAccountToken is not false")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                out.append(f"{where}: {flag}")
        long_running = kind in LONG_RUNNING
        for c in spec.get("initContainers", []):
            out += check_container(where, c, pod_sc, long_running, init=True)
        if not spec.get("containers"):
            out.append(f"{where}: no containers")
        for c in spec.get("containers", []):
            out += check_container(where, c, pod_sc, long_running, init=False)
        if kind in ("Deployment", "StatefulSet"):
            labels = pod_labels(doc)
            if not any(sel and all(labels.get(k) == v for k, v in sel.items()) for sel in pdb_selectors):
                out.append(f"{where}: no PodDisruptionBudget selects its pods")
    return out


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def cmd_manifests(args) -> list[str]:
    crds = custom_schemas()
    findings = []
    for f in args.files:
        path = Path(f)
        docs = load_docs(path)
        if not docs:
            findings.append(f"{path}: no objects")
        overlay = args.overlay or path.stem
        for doc in docs:
            findings += [f"{path.name}: {m}" for m in validate_schema(doc, args.kubernetes_version, crds)]
        findings += [f"{path.name}: {m}" for m in check_policy(docs, overlay)]
        if not findings:
            kinds = sorted({d["kind"] for d in docs})
            print(f"{path.name}: {len(docs)} objects valid ({', '.join(kinds)})")
    return findings


def cmd_monitoring(args) -> list[str]:
    repo = Path(args.repo)
    out = []
    compose = yaml.safe_load((repo / "compose.yaml").read_text())
    services = compose["services"]
    prom = yaml.safe_load((repo / "monitoring/prometheus/prometheus.yml").read_text())
    for job in prom.get("scrape_configs", []):
        for sc in job.get("static_configs", []):
            for target in sc.get("targets", []):
                host = target.split(":")[0]
                if host not in services:
                    out.append(f"prometheus job {job['job_name']}: target {target} is not a compose service")
    scraped = {
        target.split(":")[0]
        for job in prom.get("scrape_configs", [])
        for sc in job.get("static_configs", [])
        for target in sc.get("targets", [])
    }
    for name, service in services.items():
        build = service.get("build", {})
        # A one-shot job without a network (nats-certs) has nothing to scrape.
        if service.get("network_mode") == "none":
            continue
        if isinstance(build, dict) and build.get("dockerfile") == "docker/Dockerfile" and name not in scraped:
            out.append(f"prometheus: radflow service {name} of compose.yaml is not scraped")
    for name in ("prometheus", "grafana", "nats-exporter"):
        if "monitoring" not in services.get(name, {}).get("profiles", []):
            out.append(f"compose: {name} is not in the monitoring profile")
    out += check_rules(repo, prom, services.get("prometheus", {}))
    ds = yaml.safe_load((repo / "monitoring/grafana/provisioning/datasources/prometheus.yaml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    for path in sorted((repo / "monitoring/grafana/dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        for key in ("uid", "title", "panels"):
            if key not in dash:
                out.append(f"{path.name}: no {key}")
        for panel in dash.get("panels", []):
            for target in panel.get("targets", []) + [panel]:
                uid = target.get("datasource", {}).get("uid")
                if uid and uid not in uids:
                    out.append(f"{path.name}: panel {panel.get('title')}: unknown data source {uid}")
            if not panel.get("targets"):
                out.append(f"{path.name}: panel {panel.get('title')} has no query")
        print(f"{path.name}: {len(dash.get('panels', []))} panels")
    return out


def check_rules(repo: Path, prom: dict, prometheus_service: dict) -> list[str]:
    """Alerting rules: compose mounts what prometheus.yml loads, every alert is labelled
    and explained, and the Kubernetes ConfigMap holds the same rules."""
    out = []
    mounts = {}
    for volume in prometheus_service.get("volumes", []):
        parts = volume.split(":")
        if len(parts) >= 2 and parts[0].startswith("./"):
            mounts[parts[1]] = repo / parts[0][2:]
    rules = {}
    for rule_file in prom.get("rule_files", []):
        source = mounts.get(rule_file)
        if source is None or not source.is_file():
            out.append(f"prometheus: rule file {rule_file} is not mounted from the repository by compose")
            continue
        rules[source.name] = yaml.safe_load(source.read_text())
    alerts = 0
    for name, doc in rules.items():
        for group in doc.get("groups", []):
            for rule in group.get("rules", []):
                if "alert" not in rule:
                    continue
                alerts += 1
                where = f"{name}: alert {rule['alert']}"
                if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    out.append(f"{where}: no severity (critical, warning or info)")
                if not rule.get("annotations", {}).get("summary"):
                    out.append(f"{where}: no summary")
    configmap = repo / "k8s/components/monitoring/prometheus-rules.yaml"
    k8s = yaml.safe_load(configmap.read_text()).get("data", {})
    if set(k8s) != set(rules):
        out.append(f"{configmap.name}: holds {sorted(k8s)}, compose's Prometheus loads {sorted(rules)}")
    for name, doc in rules.items():
        if name in k8s and yaml.safe_load(k8s[name]) != doc:
            out.append(f"{configmap.name}: {name} differs from monitoring/prometheus/{name}")
    print(f"prometheus rules: {alerts} alerts in {', '.join(sorted(rules)) or 'no file'}, compared with {configmap.name}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--kubernetes-version", default="1.32")
    m.add_argument("--overlay", help="overlay name (default: the file's stem)")
    m.add_argument("files", nargs="+")
    mon = sub.add_parser("monitoring")
    mon.add_argument("repo", nargs="?", default=str(REPO))
    args = parser.parse_args()
    findings = cmd_manifests(args) if args.command == "manifests" else cmd_monitoring(args)
    for f in findings:
        print(f"FAIL {f}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
