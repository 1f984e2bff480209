//! Deployment files: the Kubernetes overlays render and validate offline, compose
//! validates against the compose specification, Dockerfiles and manifests pass
//! hadolint and checkov, and the manifest policy holds (scripts/validate-deploy.sh).
//! The policy checker is also shown to reject what it must reject. The exporter is
//! deployed like the other workers: in every overlay on CPU with its destinations
//! ConfigMap, in compose with its destinations file, and its example files parse.
//!
//! The tools come from `.venv` (`.ci/setup` installs requirements-dev.txt); a missing
//! tool fails the test. The Docker smoke test of the compose stack is heavy (builds
//! images, several minutes) and runs only on request:
//! `cargo test --test deploy_validate compose_stack_smoke -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_bin(tool: &str) -> PathBuf {
    let path = repo().join(".venv/bin").join(tool);
    assert!(
        path.is_file(),
        "{} is missing: run .ci/setup (requirements-dev.txt)",
        path.display()
    );
    path
}

fn show(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("radflow-deploy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `deploy_checks.py manifests` on YAML text, as overlay `overlay`.
fn check_manifests(dir: &Path, overlay: &str, yaml: &str) -> Output {
    let file = dir.join(format!("{overlay}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    Command::new(venv_bin("python3"))
        .arg(repo().join("scripts/deploy_checks.py"))
        .args(["manifests", "--overlay", overlay])
        .arg(&file)
        .output()
        .unwrap()
}

fn render(overlay: &str) -> String {
    let output = Command::new(venv_bin("kubectl"))
        .arg("kustomize")
        .arg(repo().join("k8s/overlays").join(overlay))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn deploy_files_validate_and_follow_policy() {
    let out = TempDir::new("validate");
    let output = Command::new("bash")
        .arg(repo().join("scripts/validate-deploy.sh"))
        .arg(&out.0)
        .env("RADFLOW_VENV", repo().join(".venv"))
        .output()
        .unwrap();
    let text = show(&output);
    assert!(output.status.success(), "{text}");
    for overlay in ["dev", "prod", "gpu"] {
        assert!(
            text.contains(&format!("{overlay}.yaml: ")) && text.contains("objects valid"),
            "overlay {overlay} was not validated:\n{text}"
        );
    }
    assert!(text.contains("deploy validation passed"), "{text}");
}

const COMPLIANT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: radflow}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      automountServiceAccountToken: false
      securityContext: {runAsNonRoot: true, runAsUser: 10001, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: web
          image: radflow/listener:0.1.0
          resources:
            requests: {cpu: 100m, memory: 64Mi}
            limits: {cpu: "1", memory: 128Mi}
          startupProbe: {httpGet: {path: /healthz, port: 8080}}
          readinessProbe: {httpGet: {path: /readyz, port: 8080}}
          livenessProbe: {httpGet: {path: /healthz, port: 8080}}
          securityContext:
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: web, namespace: radflow}
spec:
  maxUnavailable: 1
  selector: {matchLabels: {app: web}}
"#;

#[test]
fn policy_accepts_a_compliant_workload() {
    let dir = TempDir::new("compliant");
    let output = check_manifests(&dir.0, "prod", COMPLIANT);
    assert!(output.status.success(), "{}", show(&output));
}

#[test]
fn policy_rejects_missing_resources_probes_and_hardening() {
    let dir = TempDir::new("policy");
    let yaml = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: radflow}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: radflow/listener
          resources:
            requests: {cpu: 100m}
      initContainers:
        - name: init
          image: radflow/model-fetch:0.1.0
          securityContext: {runAsNonRoot: true, readOnlyRootFilesystem: true}
"#;
    let output = check_manifests(&dir.0, "prod", yaml);
    assert!(!output.status.success(), "{}", show(&output));
    let err = String::from_utf8_lossy(&output.stderr);
    for finding in [
        "container web: no requests.memory",
        "container web: no limits.cpu",
        "container web: no readinessProbe",
        "container web: no livenessProbe",
        "container web: no startupProbe",
        "container web: runAsNonRoot is not true",
        "container web: readOnlyRootFilesystem is not true",
        "container web: capabilities are not all dropped",
        "container web: allowPrivilegeEscalation is not false",
        "container web: image 'radflow/listener' has no version tag",
        "container init: capabilities are not all dropped",
        "container init: no limits.memory",
        "no RuntimeDefault seccomp profile",
        "automountServiceAccountToken is not false",
        "no PodDisruptionBudget selects its pods",
    ] {
        assert!(
            err.contains(finding),
            "missing finding {finding:?} in:\n{err}"
        );
    }
    // Init containers cannot have probes: none is demanded of them.
    assert!(!err.contains("container init: no readinessProbe"), "{err}");
}

#[test]
fn schemas_reject_unknown_kinds_unknown_fields_and_bad_custom_resources() {
    let dir = TempDir::new("schemas");
    let yaml = format!(
        r#"{COMPLIANT}
---
apiVersion: apps/v1
kind: Deploymnet
metadata: {{name: typo}}
---
apiVersion: example.com/v1
kind: Widget
metadata: {{name: widget}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc}}
spec:
  ports: [{{port: 80}}]
  selectr: {{app: web}}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {{name: inferer}}
spec:
  scaleTargetRef: {{name: inferer}}
  pollingIntervall: 10
  triggers:
    - type: nats-jetstream
      metadata:
        natsServerMonitoringEndpoint: "nats:8222"
        stream: RADFLOW_JOBS
        consumer: inferer-demo-tissue
        lagThreshold: 4
---
apiVersion: argoproj.io/v1alpha1
kind: Application
metadata: {{name: radflow-dev, namespace: argocd}}
spec:
  project: radflow
  source: {{repoURL: "https://example.org/radflow.git", targetRevison: main, path: k8s/overlays/dev}}
  destination: {{server: "https://kubernetes.default.svc", namespace: radflow}}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {{name: radflow-nats-tls}}
spec:
  secretNmae: radflow-nats-tls
  dnsNames: [nats]
  usages: [server auth, client-auth]
  issuerRef: {{name: radflow-nats-ca}}
"#
    );
    let output = check_manifests(&dir.0, "prod", &yaml);
    assert!(!output.status.success(), "{}", show(&output));
    let err = String::from_utf8_lossy(&output.stderr);
    for finding in [
        "Deploymnet/typo: unknown kind apps/v1 Deploymnet",
        "Widget/widget: unknown kind example.com/v1 Widget",
        "Service/svc: spec: Additional properties are not allowed ('selectr' was unexpected)",
        "ScaledObject/inferer: spec: Additional properties are not allowed ('pollingIntervall' was unexpected)",
        "ScaledObject/inferer: spec.triggers.0.metadata.lagThreshold: 4 is not of type 'string'",
        "Application/radflow-dev: spec.source: Additional properties are not allowed ('targetRevison' was unexpected)",
        "Certificate/radflow-nats-tls: spec: 'secretName' is a required property",
        "Certificate/radflow-nats-tls: spec: Additional properties are not allowed ('secretNmae' was unexpected)",
        "Certificate/radflow-nats-tls: spec.usages.1: 'client-auth' is not one of",
    ] {
        assert!(
            err.contains(finding),
            "missing finding {finding:?} in:\n{err}"
        );
    }
}

#[test]
fn secrets_are_examples_only_and_absent_from_production() {
    let dir = TempDir::new("secrets");
    let secret = r#"
apiVersion: v1
kind: Secret
metadata: {name: radflow-s3, namespace: radflow}
stringData:
  AWS_ACCESS_KEY_ID: example-dev-access-key
  AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMIK7MDENGbPxRfiCY
"#;
    let output = check_manifests(&dir.0, "dev", secret);
    assert!(!output.status.success(), "{}", show(&output));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("AWS_SECRET_ACCESS_KEY is not a marked example value"),
        "{err}"
    );
    assert!(!err.contains("AWS_ACCESS_KEY_ID is not"), "{err}");

    let example = secret.replace("wJalrXUtnFEMIK7MDENGbPxRfiCY", "example-change-me");
    let output = check_manifests(&dir.0, "dev", &example);
    assert!(output.status.success(), "{}", show(&output));
    let output = check_manifests(&dir.0, "prod", &example);
    assert!(!output.status.success(), "{}", show(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("a Secret in overlay prod"));
}

#[test]
fn gpu_overlay_puts_the_cuda_inferer_on_gpu_nodes_and_prod_does_not() {
    let gpu = render("gpu");
    let prod = render("prod");
    for (text, want) in [
        (&gpu, "image: radflow/inferer-cuda:0.1.0"),
        (&gpu, "nvidia.com/gpu: \"1\""),
        (&gpu, "key: nvidia.com/gpu"),
        (&gpu, "nvidia.com/gpu.present: \"true\""),
        (&gpu, "value: cuda"),
        (&gpu, "minReplicaCount: 0"),
        (&prod, "image: radflow/inferer:0.1.0"),
        (&prod, "kind: ScaledObject"),
        (&prod, "consumer: inferer-demo-tissue"),
        (&prod, "kind: ExternalSecret"),
    ] {
        assert!(text.contains(want), "{want:?} missing");
    }
    // In prod only the training Job template (components/training) asks for GPUs; the
    // inferer and everything else stay on CPU nodes.
    for doc in prod.split("\n---\n") {
        let training = doc.contains("kind: CronJob\n") && doc.contains("\n  name: radflow-train\n");
        assert!(
            training || !doc.contains("nvidia.com/gpu"),
            "a prod object other than the training template asks for GPUs:\n{doc}"
        );
    }
    assert!(!prod.contains("kind: Secret\n"));
    // KEDA owns the inferer's and the exporter's HPAs: no second one may target them.
    let hpas = prod.matches("kind: HorizontalPodAutoscaler").count();
    assert_eq!(hpas, 1, "only the preprocessor has an HPA");
}

/// YAML documents as JSON values (PyYAML of `.venv`, merge keys resolved).
fn yaml_docs(yaml: &str) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut child = Command::new(venv_bin("python3"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", show(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn find<'a>(
    docs: &'a [serde_json::Value],
    kind: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A destinations file and its commented example, uncommented, are both what the
/// exporter accepts: the example must name a destination and a route.
#[cfg(feature = "exporter")]
fn assert_destinations_file(path: &str) {
    let text = read(path);
    radflow_exporter::Destinations::parse(&text, path)
        .unwrap_or_else(|e| panic!("{path} as checked in: {e}"));
    let example: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.starts_with("[[")
                || l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                })
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let parsed = radflow_exporter::Destinations::parse(&example, path)
        .unwrap_or_else(|e| panic!("{path}: the commented example does not parse: {e}\n{example}"));
    assert!(
        !parsed.destinations.is_empty() && !parsed.routes.is_empty(),
        "{path}: the example names no destination or no route:\n{example}"
    );
}

#[test]
fn the_exporter_runs_in_every_overlay_on_cpu_with_its_destinations() {
    for overlay in ["dev", "prod", "gpu"] {
        let docs = yaml_docs(&render(overlay));
        let deployment = find(&docs, "Deployment", "exporter")
            .unwrap_or_else(|| panic!("{overlay}: no exporter Deployment"));
        let pod = &deployment["spec"]["template"];
        let spec = &pod["spec"];
        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{overlay}: {containers:?}");
        let c = &containers[0];
        assert_eq!(c["image"], "radflow/exporter:0.1.0", "{overlay}");
        assert_eq!(c["args"], serde_json::json!(["exporter"]), "{overlay}");
        // No GPU: no request, no limit, no GPU node selector or toleration.
        let text = deployment.to_string();
        assert!(
            !text.contains("nvidia.com/gpu"),
            "{overlay}: the exporter asks for a GPU:\n{text}"
        );
        assert!(!c["resources"]["requests"]["cpu"].is_null(), "{overlay}");
        // The destinations ConfigMap (generated, hashed name) is mounted where
        // RADFLOW_DESTINATIONS points.
        let env = c["env"].as_array().unwrap();
        assert!(
            env.iter().any(|e| e["name"] == "RADFLOW_DESTINATIONS"
                && e["value"] == "/etc/radflow/destinations.toml"),
            "{overlay}: {env:?}"
        );
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| {
                v["configMap"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("radflow-destinations-"))
            })
            .unwrap_or_else(|| panic!("{overlay}: no radflow-destinations volume: {spec}"));
        let mounts = c["volumeMounts"].as_array().unwrap();
        assert!(
            mounts.iter().any(|m| m["name"] == volume["name"]
                && m["mountPath"] == "/etc/radflow"
                && m["readOnly"] == true),
            "{overlay}: {mounts:?}"
        );
        let configmap = volume["configMap"]["name"].as_str().unwrap();
        let cm = find(&docs, "ConfigMap", configmap)
            .unwrap_or_else(|| panic!("{overlay}: ConfigMap {configmap} missing"));
        assert!(
            cm["data"]["destinations.toml"].is_string(),
            "{overlay}: {cm}"
        );
        // NATS and the store like every worker, and C-STORE out to the destinations.
        assert_eq!(
            pod["metadata"]["labels"]["radflow.io/nats-client"], "true",
            "{overlay}"
        );
        let dicom = find(&docs, "NetworkPolicy", "exporter-dicom-egress")
            .unwrap_or_else(|| panic!("{overlay}: no exporter-dicom-egress NetworkPolicy"));
        assert_eq!(
            dicom["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "exporter"
        );
        let ports: Vec<_> = dicom["spec"]["egress"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].clone())
            .collect();
        assert!(
            ports.contains(&serde_json::json!(104)) && ports.contains(&serde_json::json!(11112)),
            "{ports:?}"
        );
        assert!(
            find(&docs, "PodDisruptionBudget", "exporter").is_some(),
            "{overlay}"
        );
        // The export alerts come with the monitoring component (dev and prod).
        let rules = find(&docs, "ConfigMap", "radflow-prometheus-rules")
            .unwrap_or_else(|| panic!("{overlay}: no radflow-prometheus-rules"));
        for alert in [
            "RadflowExportsFailing",
            "RadflowNoSuccessfulExport",
            "RadflowExportDeadLetters",
        ] {
            assert!(
                rules["data"]["alerts.yml"]
                    .as_str()
                    .unwrap()
                    .contains(alert),
                "{overlay}: {alert}"
            );
        }
        // KEDA (prod, gpu) scales it on its consumers' lag; no HPA of its own.
        let scaled = find(&docs, "ScaledObject", "exporter");
        if overlay == "dev" {
            assert!(scaled.is_none());
        } else {
            let scaled = scaled.unwrap_or_else(|| panic!("{overlay}: no exporter ScaledObject"));
            assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "exporter");
            let triggers = scaled["spec"]["triggers"].as_array().unwrap();
            assert!(
                triggers
                    .iter()
                    .any(|t| t["metadata"]["stream"] == "RADFLOW_EXPORTS"
                        && t["metadata"]["consumer"] == "exporter"),
                "{overlay}: {triggers:?}"
            );
        }
        assert!(
            !docs.iter().any(|d| d["kind"] == "HorizontalPodAutoscaler"
                && d["spec"]["scaleTargetRef"]["name"] == "exporter"),
            "{overlay}: an HPA targets the exporter"
        );
    }
    #[cfg(feature = "exporter")]
    assert_destinations_file("k8s/base/destinations.toml");
}

#[test]
fn compose_runs_the_exporter_like_the_other_workers() {
    let compose = &yaml_docs(&read("compose.yaml"))[0];
    let services = &compose["services"];
    let exporter = &services["exporter"];
    let preprocessor = &services["preprocessor"];
    assert_eq!(exporter["build"]["dockerfile"], "docker/Dockerfile");
    assert_eq!(exporter["build"]["target"], "exporter");
    assert_eq!(
        exporter["image"],
        "radflow/exporter:${RADFLOW_VERSION:-0.1.0}"
    );
    // The shared worker settings: dependencies, health check, hardening, environment.
    for key in [
        "depends_on",
        "healthcheck",
        "read_only",
        "cap_drop",
        "security_opt",
        "restart",
        "tmpfs",
    ] {
        assert_eq!(exporter[key], preprocessor[key], "compose exporter: {key}");
    }
    for (key, value) in preprocessor["environment"].as_object().unwrap() {
        assert_eq!(
            &exporter["environment"][key], value,
            "compose exporter: environment {key}"
        );
    }
    assert_eq!(
        exporter["environment"]["RADFLOW_DESTINATIONS"],
        "/etc/radflow/destinations.toml"
    );
    let volumes = exporter["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().any(|v| v
            == "${RADFLOW_DESTINATIONS_FILE:-./docker/destinations.toml}:/etc/radflow/destinations.toml:ro"),
        "{volumes:?}"
    );
    assert!(
        exporter["deploy"].is_null(),
        "the compose exporter reserves devices"
    );
    let ports: Vec<_> = services
        .as_object()
        .unwrap()
        .values()
        .filter_map(|s| s["ports"].as_array())
        .flatten()
        .collect();
    assert_eq!(
        ports
            .iter()
            .filter(|p| **p == "127.0.0.1:8085:8080")
            .count(),
        1,
        "the exporter's HTTP port 8085 is published once: {ports:?}"
    );
    let local = &yaml_docs(&read("compose.local.yaml"))[0];
    assert_eq!(
        local["services"]["exporter"]["image"],
        "radflow-local/exporter:${RADFLOW_VERSION:-0.1.0}"
    );

    // Its image: the exporter-only binary (no pixel codec, no ONNX Runtime) in
    // production, the host's binary in the local build, which the smoke test starts and
    // waits for.
    let dockerfile = read("docker/Dockerfile");
    let stage = dockerfile
        .split("\nFROM ")
        .find(|s| s.starts_with("runtime AS exporter\n"))
        .expect("docker/Dockerfile: no exporter stage");
    assert!(
        stage.contains("COPY --from=builder /out/exporter/radflow /usr/local/bin/radflow"),
        "{stage}"
    );
    assert!(stage.contains("CMD [\"exporter\"]"), "{stage}");
    assert!(!stage.contains("onnxruntime"), "{stage}");
    assert!(dockerfile.contains("--no-default-features --features exporter"));
    assert!(read("docker/local.Dockerfile").contains("FROM runtime AS exporter\n"));
    assert!(read("docker/build-local.sh").contains("build exporter radflow-local/exporter:"));
    let smoke = read("scripts/compose-smoke.sh");
    assert!(smoke.contains("wait_healthy 180 nats s3 listener preprocessor inferer exporter\n"));
    let prometheus = read("monitoring/prometheus/prometheus.yml");
    assert!(prometheus.contains("targets: [\"exporter:8080\"]"));
    #[cfg(feature = "exporter")]
    assert_destinations_file("docker/destinations.toml");
}

/// The pod templates of a rendered overlay's workloads, by kind and name.
fn pod_templates(docs: &[serde_json::Value]) -> Vec<(String, &serde_json::Value)> {
    docs.iter()
        .filter_map(|d| {
            let template = match d["kind"].as_str()? {
                "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => &d["spec"]["template"],
                "CronJob" => &d["spec"]["jobTemplate"]["spec"]["template"],
                _ => return None,
            };
            Some((
                format!(
                    "{}/{}",
                    d["kind"].as_str()?,
                    d["metadata"]["name"].as_str()?
                ),
                template,
            ))
        })
        .collect()
}

/// Whether a container's environment comes from Secret `secret` (or the hashed name a
/// secretGenerator gives it).
fn has_secret_ref(container: &serde_json::Value, secret: &str) -> bool {
    container["envFrom"].as_array().is_some_and(|e| {
        e.iter().any(|r| {
            r["secretRef"]["name"].as_str().is_some_and(|n| {
                n == secret
                    || n.strip_prefix(secret)
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|hash| {
                            hash.len() == 10 && hash.bytes().all(|b| b.is_ascii_alphanumeric())
                        })
            })
        })
    })
}

#[test]
fn nats_takes_tls_clients_only_and_every_radflow_workload_trusts_its_ca() {
    for overlay in ["dev", "prod", "gpu"] {
        let docs = yaml_docs(&render(overlay));
        // Every radflow container reads these from radflow-config.
        let config = docs
            .iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("radflow-config-"))
            })
            .unwrap_or_else(|| panic!("{overlay}: no radflow-config"));
        assert_eq!(
            config["data"]["RADFLOW_NATS_URL"], "tls://nats:4222",
            "{overlay}"
        );
        assert_eq!(
            config["data"]["RADFLOW_NATS_TLS_CA"], "/etc/nats-tls/ca.crt",
            "{overlay}"
        );

        // Every pod that talks to NATS (the label that lets it through the network
        // policy) mounts the CA, and only the CA, of Secret radflow-nats-tls, and no
        // container points RADFLOW_NATS_URL elsewhere.
        let mut clients = Vec::new();
        for (name, pod) in pod_templates(&docs) {
            let text = pod.to_string();
            assert!(
                !text.contains("nats://"),
                "{overlay}: {name} names a cleartext NATS URL"
            );
            if pod["metadata"]["labels"]["radflow.io/nats-client"] != "true" {
                assert!(
                    !pod["spec"]["containers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|c| has_secret_ref(c, "radflow-nats")),
                    "{overlay}: {name} has NATS credentials but no nats-client label"
                );
                continue;
            }
            let volumes = pod["spec"]["volumes"].as_array().unwrap();
            let ca = volumes
                .iter()
                .find(|v| v["secret"]["secretName"] == "radflow-nats-tls")
                .unwrap_or_else(|| {
                    panic!("{overlay}: {name} mounts no radflow-nats-tls: {volumes:?}")
                });
            assert_eq!(
                ca["secret"]["items"],
                serde_json::json!([{"key": "ca.crt", "path": "ca.crt"}]),
                "{overlay}: {name} mounts more of radflow-nats-tls than its CA"
            );
            let containers = pod["spec"]["containers"].as_array().unwrap();
            let nats_containers: Vec<_> = containers
                .iter()
                .filter(|c| has_secret_ref(c, "radflow-nats"))
                .collect();
            assert!(
                !nats_containers.is_empty(),
                "{overlay}: {name}: no container with NATS credentials"
            );
            for c in nats_containers {
                let mounts = c["volumeMounts"].as_array().unwrap();
                assert!(
                    mounts.iter().any(|m| m["name"] == ca["name"]
                        && m["mountPath"] == "/etc/nats-tls"
                        && m["readOnly"] == true),
                    "{overlay}: {name}/{}: the CA is not at /etc/nats-tls: {mounts:?}",
                    c["name"]
                );
                assert!(
                    c["envFrom"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|r| r["configMapRef"]["name"]
                            .as_str()
                            .is_some_and(|n| n.starts_with("radflow-config-"))),
                    "{overlay}: {name}: no radflow-config"
                );
            }
            clients.push(name);
        }
        let mut want = vec![
            "Deployment/listener",
            "Deployment/preprocessor",
            "Deployment/inferer",
            "Deployment/exporter",
        ];
        if overlay != "dev" {
            want.extend([
                "CronJob/radflow-rescore",
                "CronJob/radflow-batch-score",
                "CronJob/radflow-batch-workers",
            ]);
        }
        for w in want {
            assert!(
                clients.iter().any(|c| c == w),
                "{overlay}: {w} is not a TLS NATS client: {clients:?}"
            );
        }

        // NATS: a tls {} block for clients from the Secret's files, mounted; the
        // monitoring port stays plain HTTP (probes, KEDA, the NATS exporter).
        let conf_map = docs
            .iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("nats-config-"))
            })
            .unwrap_or_else(|| panic!("{overlay}: no nats-config"));
        let conf = conf_map["data"]["nats.conf"].as_str().unwrap();
        let client_tls = &conf[conf
            .find("\ntls {")
            .unwrap_or_else(|| panic!("{overlay}: nats.conf has no tls block:\n{conf}"))..];
        let client_tls = &client_tls[..client_tls.find("\n}").unwrap()];
        for line in [
            "cert_file: /etc/nats-tls/tls.crt",
            "key_file: /etc/nats-tls/tls.key",
            "ca_file: /etc/nats-tls/ca.crt",
        ] {
            assert!(
                client_tls.contains(line),
                "{overlay}: {line} missing in\n{client_tls}"
            );
        }
        assert!(conf.contains("http: 0.0.0.0:8222"), "{overlay}: {conf}");
        assert!(conf.contains("authorization {"), "{overlay}: {conf}");
        if overlay != "dev" {
            let cluster = &conf[conf.find("cluster {").expect("prod runs a cluster")..];
            assert!(
                cluster.contains("tls {") && cluster.contains("verify: true"),
                "{overlay}: routes without mutual TLS:\n{cluster}"
            );
        }
        let nats = find(&docs, "StatefulSet", "nats").unwrap();
        let spec = &nats["spec"]["template"]["spec"];
        let tls = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"] == "radflow-nats-tls")
            .unwrap_or_else(|| panic!("{overlay}: NATS mounts no radflow-nats-tls"));
        let c = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "nats")
            .unwrap_or_else(|| panic!("{overlay}: no nats container"));
        assert!(
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == tls["name"]
                    && m["mountPath"] == "/etc/nats-tls"
                    && m["readOnly"] == true),
            "{overlay}: {c}"
        );
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "monitor", "{overlay}: {probe}");
            assert!(
                c[probe]["httpGet"]["scheme"].is_null(),
                "{overlay}: {probe} is not plain HTTP"
            );
        }
        for scaled in docs.iter().filter(|d| d["kind"] == "ScaledObject") {
            for t in scaled["spec"]["triggers"].as_array().unwrap() {
                assert!(
                    t["metadata"]["natsServerMonitoringEndpoint"]
                        .as_str()
                        .is_some_and(|e| e.ends_with(":8222")),
                    "{overlay}: {t}"
                );
            }
        }

        // cert-manager issues the Secret, for the names clients and routes use.
        let cert = find(&docs, "Certificate", "radflow-nats-tls")
            .unwrap_or_else(|| panic!("{overlay}: no Certificate radflow-nats-tls"));
        assert_eq!(cert["spec"]["secretName"], "radflow-nats-tls");
        let names = cert["spec"]["dnsNames"].as_array().unwrap();
        for name in ["nats", "nats.radflow.svc.cluster.local", "*.nats-headless"] {
            assert!(
                names.iter().any(|n| n == name),
                "{overlay}: {name} not in {names:?}"
            );
        }
        let usages = cert["spec"]["usages"].as_array().unwrap();
        for usage in ["server auth", "client auth"] {
            assert!(usages.iter().any(|u| u == usage), "{overlay}: {usages:?}");
        }
        let issuer = cert["spec"]["issuerRef"]["name"].as_str().unwrap();
        assert!(
            find(&docs, "Issuer", issuer).is_some(),
            "{overlay}: no Issuer {issuer}"
        );
    }
}

#[test]
fn compose_gives_nats_tls_and_a_password_and_every_radflow_service_uses_them() {
    let compose = &yaml_docs(&read("compose.yaml"))[0];
    let services = compose["services"].as_object().unwrap();
    let nats = &services["nats"];
    assert_eq!(
        nats["command"],
        serde_json::json!(["--config", "/etc/nats/nats.conf"])
    );
    assert_eq!(
        nats["depends_on"]["nats-certs"]["condition"],
        "service_completed_successfully"
    );
    let volumes = nats["volumes"].as_array().unwrap();
    for v in [
        "./docker/nats.conf:/etc/nats/nats.conf:ro",
        "nats-tls:/etc/nats/tls:ro",
    ] {
        assert!(
            volumes.iter().any(|x| x == v),
            "nats: {v} not in {volumes:?}"
        );
    }
    let conf = read("docker/nats.conf");
    for line in [
        "include \"tls/nats-auth.conf\"",
        "cert_file: /etc/nats/tls/server.crt",
        "key_file: /etc/nats/tls/server.key",
        "{ user: radflow, password: $NATS_PASSWORD }",
        "http: 0.0.0.0:8222",
    ] {
        assert!(conf.contains(line), "docker/nats.conf: {line} missing");
    }
    let certs = &services["nats-certs"];
    assert_eq!(
        certs["entrypoint"],
        serde_json::json!(["bash", "/usr/local/bin/dev-certs.sh"])
    );
    assert!(
        certs["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "./scripts/dev-certs.sh:/usr/local/bin/dev-certs.sh:ro")
    );
    assert_eq!(certs["network_mode"], "none");
    let local = &yaml_docs(&read("compose.local.yaml"))[0];
    assert_eq!(
        local["services"]["nats-certs"]["image"],
        "radflow-local/listener:${RADFLOW_VERSION:-0.1.0}"
    );
    // Every service that runs radflow: TLS to nats, its CA, user and password file.
    let mut radflow = 0;
    for (name, service) in services {
        let env = &service["environment"];
        if env["RADFLOW_NATS_URL"].is_null() {
            assert!(
                service["build"]["dockerfile"] != "docker/Dockerfile" || name == "nats-certs",
                "{name} builds radflow but has no NATS settings"
            );
            continue;
        }
        radflow += 1;
        assert_eq!(env["RADFLOW_NATS_URL"], "tls://nats:4222", "{name}");
        assert_eq!(env["RADFLOW_NATS_TLS_CA"], "/etc/nats-tls/ca.crt", "{name}");
        assert_eq!(env["RADFLOW_NATS_USER"], "radflow", "{name}");
        assert_eq!(
            env["RADFLOW_NATS_PASSWORD_FILE"], "/etc/nats-tls/nats-password",
            "{name}"
        );
        assert!(
            env["RADFLOW_NATS_PASSWORD"].is_null(),
            "{name}: a password in compose.yaml"
        );
        let volumes = service["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no volumes"));
        assert!(
            volumes.iter().any(|v| v == "nats-tls:/etc/nats-tls:ro"),
            "{name}: {volumes:?}"
        );
    }
    assert_eq!(
        radflow, 5,
        "listener, preprocessor, inferer, exporter, inferer-gpu"
    );
    assert!(read(".gitignore").lines().any(|l| l == "/docker/certs/"));
}

/// Runs scripts/dev-certs.sh into `dir`; its output.
fn dev_certs(dir: &Path, args: &[&str]) -> Output {
    let output = Command::new("bash")
        .arg(repo().join("scripts/dev-certs.sh"))
        .args(args)
        .arg(dir)
        .env_remove("RADFLOW_NATS_PASSWORD")
        .env_remove("RADFLOW_NATS_CERT_NAMES")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    output
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(clap::Parser)]
struct BusCli {
    #[command(flatten)]
    bus: radflow_shared::config::BusArgs,
}

/// compose's NATS, without Docker: docker/nats.conf with what dev-certs.sh makes, on
/// loopback ports, and radflow with compose's settings.
#[tokio::test]
async fn compose_nats_with_dev_certs_takes_radflow_over_tls_and_nothing_else() {
    use clap::Parser;
    use radflow_shared::bus::{Bus, ConsumerSpec, NatsBus, NatsOptions, Outgoing, RESULTS};

    let dir = TempDir::new("compose-nats");
    let etc = dir.0.join("etc/nats");
    let tls = etc.join("tls");
    dev_certs(&tls, &[]);
    let names = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(tls.join("server.crt"))
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(
        names.contains("DNS:nats")
            && names.contains("DNS:localhost")
            && names.contains("IP Address:127.0.0.1"),
        "{names}"
    );
    // Run again: kept. --renew: a new CA.
    let ca = std::fs::read(tls.join("ca.crt")).unwrap();
    let password = std::fs::read_to_string(tls.join("nats-password")).unwrap();
    let again = dev_certs(&tls, &[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("holds valid certificates"));
    assert_eq!(std::fs::read(tls.join("ca.crt")).unwrap(), ca);
    dev_certs(&tls, &["--renew"]);
    assert_ne!(
        std::fs::read(tls.join("ca.crt")).unwrap(),
        ca,
        "--renew kept the CA"
    );
    assert_eq!(
        std::fs::read_to_string(tls.join("nats-password")).unwrap(),
        password
    );
    assert_eq!(password.trim().len(), 32);

    let (port, monitor) = (free_port(), free_port());
    let conf = read("docker/nats.conf")
        .replace("/etc/nats/", &format!("{}/", etc.display()))
        .replace(
            "store_dir: /data",
            &format!("store_dir: {:?}", dir.0.join("data")),
        )
        .replace("0.0.0.0:4222", &format!("127.0.0.1:{port}"))
        .replace("0.0.0.0:8222", &format!("127.0.0.1:{monitor}"));
    std::fs::write(etc.join("nats.conf"), conf).unwrap();
    let log = dir.0.join("nats.log");
    let mut server = Command::new(venv_bin("nats-server"))
        .arg("-c")
        .arg(etc.join("nats.conf"))
        .arg("-l")
        .arg(&log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Server is ready")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server did not start: {:?}",
            server.try_wait()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _server = Kill(server);

    // radflow as compose starts it (RADFLOW_NATS_* there), by name and by address.
    let cancel = tokio_util::sync::CancellationToken::new();
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("tls://{host}:{port}");
        let cli = BusCli::try_parse_from([
            "radflow",
            "--nats-url",
            &url,
            "--nats-tls-ca",
            tls.join("ca.crt").to_str().unwrap(),
            "--nats-user",
            "radflow",
            "--nats-password-file",
            tls.join("nats-password").to_str().unwrap(),
        ])
        .unwrap();
        let bus = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            cli.bus.connect_nats("compose-test", &cancel),
        )
        .await
        .expect("connects within 20 s")
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        bus.publish(Outgoing {
            subject: "radflow.result.compose".into(),
            msg_id: format!("compose-{host}"),
            correlation_id: String::new(),
            payload: bytes::Bytes::from_static(b"job"),
        })
        .await
        .unwrap();
        let got = bus
            .fetch(
                &ConsumerSpec::new(RESULTS, &format!("compose-{}", host.replace('.', "-"))),
                10,
                std::time::Duration::from_secs(2),
            )
            .await
            .unwrap();
        assert!(!got.is_empty(), "{url}: nothing came back");
    }
    // Refused: the right CA without the password, and the password without the CA.
    let plain = |url: String| NatsOptions {
        url,
        name: "compose-test".into(),
        replicas: 1,
        ..Default::default()
    };
    let with_ca = NatsOptions {
        tls_ca: Some(tls.join("ca.crt")),
        ..plain(format!("tls://127.0.0.1:{port}"))
    };
    let err = NatsBus::connect(&with_ca)
        .await
        .err()
        .expect("no password, no entry")
        .to_string();
    assert!(err.to_lowercase().contains("authorization"), "{err}");
    let err = NatsBus::connect(&NatsOptions {
        user: Some("radflow".into()),
        password: Some(radflow_shared::secret::Secret::new(password.trim())),
        ..plain(format!("nats://127.0.0.1:{port}"))
    })
    .await
    .err()
    .expect("no CA, no entry")
    .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // The monitoring port stays plain HTTP (compose's health check, the NATS exporter).
    let health = reqwest::get(format!(
        "http://127.0.0.1:{monitor}/healthz?js-enabled-only=true"
    ))
    .await
    .unwrap();
    assert!(health.status().is_success());
}

/// The compose stack on this machine's Docker engine: builds the images without a
/// registry, sends studies, kills the inferer mid-job (scripts/compose-smoke.sh).
#[test]
#[ignore = "needs Docker, root and ~10 minutes: cargo test --test deploy_validate compose_stack_smoke -- --ignored"]
fn compose_stack_smoke() {
    let output = Command::new("bash")
        .arg(repo().join("scripts/compose-smoke.sh"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
}
