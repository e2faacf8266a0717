#!/usr/bin/env bash
# tests/deploy.sh -- the examples in deploy/ checked and run with podman.
#
#   bash tests/deploy.sh            # IMAGE=localhost/ncps:latest (make test-image builds it)
#
# 1. Schemas: deploy/compose.yaml with `docker-compose config` (Debian's docker-compose, which
#    validates against the Compose specification's JSON schema; no daemon needed);
#    deploy/kubernetes.yaml document by document with the official Kubernetes Python client's
#    models (each document is deserialized into V1ConfigMap, V1PersistentVolumeClaim,
#    V1StatefulSet, V1Service and must serialize back unchanged: a misspelled or misplaced
#    field is dropped by the models, so it shows up as a difference).
# 2. deploy/kubernetes.yaml with `podman kube play`: podman 4.3 plays Pods, not StatefulSets, so
#    the StatefulSet's pod template is played as a Pod, with its ConfigMap and PVC (renamed for
#    this run, on host networking with another port); it must answer /healthz and /pubkey (the
#    hostname from the ConfigMap's config file), run as uid 10001 with its read-only root,
#    and stop with status 0.
# 3. deploy/compose.yaml with podman-compose: up, /healthz, down.
# The upstream (cache.nixos.org) is not reachable here; ncps starts and answers without it.
set -uo pipefail

# shellcheck source=tests/podman-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/podman-common.sh"
TMP=$(mktemp -d /tmp/ncps-deploy.XXXXXX)
RUN=t$$
PROJECT=ncpsdeploy$$
cleanup() {
    [[ -f $TMP/play.yaml ]] && podman kube down "$TMP/play.yaml" >/dev/null 2>&1
    # kube down (podman 4.3) leaves the PVC volume and the one made for the ConfigMap.
    podman volume rm -f "ncps-data-$RUN" "ncps-$RUN" >/dev/null 2>&1
    if [[ -n ${COMPOSE_UP:-} ]]; then
        (cd "$ROOT/deploy" && podman-compose -p "$PROJECT" down -v) >/dev/null 2>&1
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

need=()
for c in podman podman-compose docker-compose; do command -v $c >/dev/null || need+=("$c"); done
python3 -c 'import venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}"
    echo "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; } ||
        die "cannot install ${need[*]}"
fi
podman image exists "$IMAGE" || podman manifest exists "$IMAGE" || die "no image $IMAGE: run make image"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_200() {
    for _ in $(seq 100); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1") == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

# ---- 1. schemas ------------------------------------------------------------------------------
if out=$(cd "$ROOT/deploy" && docker-compose -f compose.yaml config -q 2>&1); then
    pass "deploy/compose.yaml is valid (docker-compose config)"
else
    fail "deploy/compose.yaml: $out"
fi
# The Kubernetes client, in a venv kept between runs (a few MB from PyPI, once).
VENV=${XDG_CACHE_HOME:-$HOME/.cache}/ncps-tests/k8s-venv
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import kubernetes, yaml' 2>/dev/null; then
    echo "installing the Kubernetes Python client into $VENV"
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q kubernetes pyyaml >/dev/null 2>&1 || die "pip install kubernetes"
fi
if out=$("$VENV/bin/python" - "$ROOT/deploy/kubernetes.yaml" 2>&1 <<'PY'
import json, sys, yaml
from kubernetes.client import ApiClient
api = ApiClient()
class R:  # what ApiClient.deserialize reads
    def __init__(self, d): self.data = json.dumps(d)
bad = []
for doc in yaml.safe_load_all(open(sys.argv[1])):
    kind = doc["kind"]
    model = "V1" + kind
    try:
        try:
            obj = api.deserialize(json.dumps(doc), model, "application/json")
        except TypeError:  # older clients take a response object, no content_type
            obj = api.deserialize(R(doc), model)
    except Exception as e:
        bad.append(f"{kind}: {e}")
        continue
    back = api.sanitize_for_serialization(obj)
    # The models write int-or-string ports and quantities as given; compare as JSON.
    if json.dumps(back, sort_keys=True) != json.dumps(doc, sort_keys=True):
        def diff(a, b, at=""):
            if isinstance(a, dict) and isinstance(b, dict):
                for k in set(a) | set(b):
                    if k not in b: bad.append(f"{kind}: {at}{k}: not a field of {model} (dropped)")
                    elif k not in a: bad.append(f"{kind}: {at}{k}: added")
                    else: diff(a[k], b[k], f"{at}{k}.")
            elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                for i, (x, y) in enumerate(zip(a, b)): diff(x, y, f"{at}{i}.")
            elif a != b:
                bad.append(f"{kind}: {at}: {a!r} became {b!r}")
        diff(doc, back)
    print(kind, "ok")
if bad:
    print("\n".join(bad)); sys.exit(1)
PY
); then
    pass "deploy/kubernetes.yaml matches the Kubernetes models: $(echo $out)"
else
    fail "deploy/kubernetes.yaml: $out"
fi

# ---- 2. podman kube play ---------------------------------------------------------------------
PORT=$(free_port)
"$VENV/bin/python" - "$ROOT/deploy/kubernetes.yaml" "$TMP/play.yaml" "$RUN" "$PORT" "$IMAGE" <<'PY' || die "making the Pod from the StatefulSet"
import sys, yaml
src, dst, run, port, image = sys.argv[1:]
out = []
for doc in yaml.safe_load_all(open(src)):
    kind = doc["kind"]
    if kind == "Service":
        continue  # podman has no Services; the pod's port is reached directly
    if kind in ("ConfigMap", "PersistentVolumeClaim"):
        doc["metadata"]["name"] += "-" + run
    if kind == "StatefulSet":
        tpl = doc["spec"]["template"]
        spec = tpl["spec"]
        spec["hostNetwork"] = True
        for c in spec["containers"]:
            c["image"] = image
            c["command"].append(f"--server-addr=127.0.0.1:{port}")  # a flag beats the file
            for p in ("livenessProbe", "readinessProbe"):
                c[p]["httpGet"]["port"] = int(port)
            c["ports"] = []
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v: v["persistentVolumeClaim"]["claimName"] += "-" + run
            if "configMap" in v: v["configMap"]["name"] += "-" + run
        doc = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "ncps-" + run, "labels": tpl["metadata"]["labels"]}, "spec": spec}
    out.append(doc)
yaml.safe_dump_all(out, open(dst, "w"))
PY
if out=$(podman kube play "$TMP/play.yaml" 2>&1); then
    pass "podman kube play (ConfigMap, PVC, the StatefulSet's pod)"
else
    fail "podman kube play: $out"
fi
CTR=ncps-$RUN-ncps
if wait_200 "http://127.0.0.1:$PORT/healthz"; then
    pass "the pod answers /healthz"
    key=$(curl -s --max-time 2 "http://127.0.0.1:$PORT/pubkey")
    [[ $key == cache.lan:* ]] && pass "/pubkey is named after the ConfigMap's cache.hostname" || fail "/pubkey: $key"
    pid=$(podman inspect --format '{{.State.Pid}}' "$CTR")
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
    [[ $uid == 10001 ]] && pass "the pod's ncps runs as uid 10001" || fail "the pod's ncps runs as uid $uid"
    ro=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$CTR")
    [[ $ro == true ]] && pass "with a read-only root file system" || fail "root file system read-only: $ro"
else
    fail "the pod does not answer /healthz"; podman logs "$CTR" 2>&1 | tail -20 >&2
fi
t0=$(date +%s%N); podman pod stop -t 10 "ncps-$RUN" >/dev/null; ms=$((($(date +%s%N) - t0) / 1000000))
code=$(podman inspect --format '{{.State.ExitCode}}' "$CTR")
((ms < 2000)) && [[ $code == 0 ]] && pass "podman pod stop: ${ms} ms, exit status 0" || fail "podman pod stop: ${ms} ms, exit status $code"

# ---- 3. podman-compose -------------------------------------------------------------------------
CPORT=$(free_port)
COMPOSE_UP=1
if out=$(cd "$ROOT/deploy" && NCPS_IMAGE=$IMAGE NCPS_PORT=$CPORT podman-compose -p "$PROJECT" up -d 2>&1); then
    if wait_200 "http://127.0.0.1:$CPORT/healthz"; then pass "podman-compose up: /healthz answers on the published port"
    else fail "podman-compose up: no /healthz on port $CPORT"; podman logs "${PROJECT}_ncps_1" 2>&1 | tail -20 >&2; fi
else
    fail "podman-compose up: $out"
fi
t0=$(date +%s%N)
(cd "$ROOT/deploy" && NCPS_IMAGE=$IMAGE NCPS_PORT=$CPORT podman-compose -p "$PROJECT" stop) >/dev/null 2>&1
ms=$((($(date +%s%N) - t0) / 1000000))
code=$(podman inspect --format '{{.State.ExitCode}}' "${PROJECT}_ncps_1" 2>/dev/null)
((ms < 3000)) && [[ $code == 0 ]] && pass "podman-compose stop: ${ms} ms, exit status 0" || fail "podman-compose stop: ${ms} ms, exit status $code"

((failures == 0)) && echo "tests/deploy.sh: all checks passed" || { echo "tests/deploy.sh: $failures check(s) failed" >&2; exit 1; }
