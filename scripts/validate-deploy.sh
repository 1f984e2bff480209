#!/usr/bin/env bash
# Offline validation of everything radflow deploys with: the Kubernetes overlays, the
# compose files, the Dockerfiles and the monitoring configuration. No cluster, no
# registry, no network. Tools come from .venv (`.ci/setup`, requirements-dev.txt):
# kubectl (kustomize), kubernetes-validate, check-jsonschema, hadolint, checkov; where
# installed, docker-compose and promtool check compose and the Prometheus rules too.
#
#   scripts/validate-deploy.sh [output folder for the rendered manifests]
#
# Exit status 0 only when every step passed. tests/deploy_validate.rs runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
venv=${RADFLOW_VENV:-$repo/.venv}
export PATH="$venv/bin:$PATH"
kubernetes_version=${KUBERNETES_VERSION:-1.32}
out=${1:-$(mktemp -d)}
mkdir -p "$out"

failed=0
step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*" >&2; failed=1; }
need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run .ci/setup (requirements-dev.txt)" >&2; exit 2; }
  done
}
need kubectl check-jsonschema hadolint checkov python3
python=$venv/bin/python3
[[ -x $python ]] || python=python3

step "kustomize: render every overlay (kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
rendered=()
for dir in k8s/overlays/*/; do
  name=$(basename "$dir")
  if kubectl kustomize "$dir" >"$out/$name.yaml"; then
    rendered+=("$out/$name.yaml")
    echo "$name: $(grep -c '^kind:' "$out/$name.yaml") objects -> $out/$name.yaml"
  else
    fail "kubectl kustomize $dir"
  fi
done
((${#rendered[@]} >= 3)) || fail "expected the dev, prod and gpu overlays"

step "manifests: strict schemas (Kubernetes $kubernetes_version, k8s/schemas for custom resources) and policy"
"$python" scripts/deploy_checks.py manifests --kubernetes-version "$kubernetes_version" "${rendered[@]}" || fail "manifest checks"

step "ci: GitHub Actions workflows (actionlint)"
if command -v actionlint >/dev/null; then
  actionlint .github/workflows/*.yml || fail "actionlint"
else
  fail "actionlint missing: run .ci/setup (requirements-dev.txt)"
fi

step "gitops: Argo CD project and application set (schemas in k8s/schemas)"
"$python" scripts/deploy_checks.py manifests --kubernetes-version "$kubernetes_version" k8s/argocd/*.yaml || fail "Argo CD manifests"

step "compose: compose specification (check-jsonschema vendor.compose-spec)"
check-jsonschema --builtin-schema vendor.compose-spec compose.yaml compose.local.yaml || fail "compose schema"
if command -v docker-compose >/dev/null; then
  step "compose: docker-compose $(docker-compose version --short 2>/dev/null) reads it"
  for profile in "" gpu monitoring; do
    args=(-f compose.yaml)
    [[ -n $profile ]] && args+=(--profile "$profile")
    docker-compose "${args[@]}" config -q || fail "docker-compose ${args[*]} config"
  done
  docker-compose -f compose.yaml -f compose.local.yaml config -q || fail "docker-compose with compose.local.yaml"
fi

step "monitoring: Prometheus targets and rules, Grafana provisioning and dashboards"
"$python" scripts/deploy_checks.py monitoring "$repo" || fail "monitoring checks"
if command -v promtool >/dev/null; then
  step "monitoring: promtool $(promtool --version 2>/dev/null | sed -n '1s/^promtool, version \([^ ]*\).*/\1/p') checks the configuration, the rules and their tests"
  promtool check config --syntax-only monitoring/prometheus/prometheus.yml || fail "promtool check config"
  promtool check rules monitoring/prometheus/alerts.yml || fail "promtool check rules"
  promtool test rules monitoring/prometheus/alerts_test.yml || fail "promtool test rules"
fi

step "Dockerfiles: hadolint"
dockerfiles=(docker/Dockerfile docker/s3-dev.Dockerfile docker/local.Dockerfile)
hadolint "${dockerfiles[@]}" && echo "hadolint: ${#dockerfiles[@]} files clean" || fail "hadolint"
for f in "${dockerfiles[@]}"; do
  while IFS= read -r line; do
    image=${line#*=}
    [[ $image == *:* && $image != *:latest ]] || fail "$f: $line has no version tag"
  done < <(grep -E '^ARG [A-Z_]*IMAGE=' "$f")
done

step "checkov: Dockerfiles and rendered manifests (skips named in scripts/checkov.yaml)"
docker_args=()
for f in "${dockerfiles[@]}"; do docker_args+=(-f "$f"); done
checkov --config-file scripts/checkov.yaml --framework dockerfile "${docker_args[@]}" >"$out/checkov-docker.txt" 2>&1 \
  && grep -h 'Passed checks' "$out/checkov-docker.txt" || { cat "$out/checkov-docker.txt"; fail "checkov dockerfile"; }
k8s_args=()
for f in "${rendered[@]}"; do k8s_args+=(-f "$f"); done
checkov --config-file scripts/checkov.yaml --framework kubernetes "${k8s_args[@]}" >"$out/checkov-k8s.txt" 2>&1 \
  && grep -h 'Passed checks' "$out/checkov-k8s.txt" || { cat "$out/checkov-k8s.txt"; fail "checkov kubernetes"; }

step "shell scripts parse"
for f in docker/base/debootstrap.sh docker/build-local.sh docker/radflow-probe docker/radflow-fetch-models \
  docker/s3-dev-entrypoint scripts/compose-smoke.sh scripts/validate-deploy.sh; do
  bash -n "$f" || fail "bash -n $f"
done

if ((failed)); then
  echo "deploy validation FAILED" >&2
  exit 1
fi
echo "deploy validation passed"
