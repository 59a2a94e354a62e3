#!/usr/bin/env bash
# The page in a real browser: installs Debian's chromium and playwright-core (from
# tests/browser/package-lock.json) when missing, starts `vqclip serve` (the debug
# build, which `cargo test` leaves in target/debug) with the tiny fixture models on a
# free 127.0.0.1 port, and runs tests/browser/run.mjs. Screenshots of every state go
# to tests/browser/artifacts/ (ignored by git).
#
#   scripts/browser-test.sh            # after `cargo build` or `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${VQCLIP_BIN:-$ROOT/target/debug/vqclip}
ARTIFACTS=${ARTIFACTS:-$ROOT/tests/browser/artifacts}
[ -x "$BIN" ] || { echo "no $BIN; run cargo build first" >&2; exit 1; }

if [ ! -x /usr/bin/chromium ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/config.toml" <<TOML
[server]
bind = "127.0.0.1:0"
[database]
url = "sqlite://$WORK/vqclip.db"
[storage]
artifact_dir = "$WORK/artifacts"
[workers]
count = 1
lease_seconds = 5
heartbeat_seconds = 1
poll_interval_ms = 100
[models]
vqgan = "$ROOT/tests/fixtures/vqgan-tiny"
clip = ["$ROOT/tests/fixtures/clip-tiny"]
[auth]
requests_per_second = 0.0
TOML

rm -rf "$ARTIFACTS" && mkdir -p "$ARTIFACTS"
VQCLIP_LOG=${VQCLIP_LOG:-info} "$BIN" serve --config "$WORK/config.toml" \
  >"$WORK/stdout" 2>"$ARTIFACTS/server.log" &
SERVER_PID=$!
for _ in $(seq 1 300); do
  if grep -q '^vqclip listening on ' "$WORK/stdout"; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$ARTIFACTS/server.log" >&2; exit 1; }
  sleep 0.1
done
ADDR=$(sed -n 's/^vqclip listening on //p' "$WORK/stdout" | head -n1)
[ -n "$ADDR" ] || { echo "the server did not start" >&2; cat "$ARTIFACTS/server.log" >&2; exit 1; }
echo "browser test against $ADDR (server log: $ARTIFACTS/server.log)"

VQCLIP_BASE="$ADDR" VQCLIP_BIN="$BIN" VQCLIP_DB="sqlite://$WORK/vqclip.db" ARTIFACTS="$ARTIFACTS" \
  timeout 600 node tests/browser/run.mjs
