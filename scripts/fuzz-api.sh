#!/usr/bin/env bash
# Fuzzes the HTTP API against openapi.yaml with schemathesis: a real `vqclip serve` on
# loopback with the tiny fixture models, every check on (server errors, status codes,
# content types, response headers and schemas, negative data rejected), positive and
# negative data, once with API keys off and once with a key required. Any failure fails.
#
#   scripts/fuzz-api.sh            # uses target/debug/vqclip (built by `cargo test`)
#   VQCLIP_BIN=target/release/vqclip FUZZ_EXAMPLES=200 scripts/fuzz-api.sh
#
# Bounded: FUZZ_EXAMPLES cases per operation and data kind, and each run is killed after
# FUZZ_RUN_SECONDS (a timeout fails the run), so both runs stay within 4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${VQCLIP_BIN:-target/debug/vqclip}
EXAMPLES=${FUZZ_EXAMPLES:-30}
RUN_SECONDS=${FUZZ_RUN_SECONDS:-110}
SCHEMATHESIS_VERSION=3.39.16
# Later hypothesis releases break schemathesis 3.39 (`many.more` is gone).
HYPOTHESIS_VERSION=6.131.0
VENV=.ci/venv

if [ ! -x "$BIN" ]; then
    echo "fuzz-api: $BIN is missing; run cargo build (or cargo test) first" >&2
    exit 1
fi
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    # A bare CI image may lack Python's venv module (Debian splits it out).
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        if command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
        fi
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" "hypothesis==$HYPOTHESIS_VERSION"
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

fixtures="$PWD/tests/fixtures"
cat > "$work/vqclip.toml" <<EOF
[server]
bind = "127.0.0.1:0"
[database]
url = "sqlite://$work/vqclip.db"
[storage]
artifact_dir = "$work/artifacts"
[models]
vqgan = "$fixtures/vqgan-tiny"
clip = ["$fixtures/clip-tiny"]
cache_dir = "$work/models"
[workers]
# One worker, so that /readyz is ready; the small limits below keep the jobs it
# renders (those naming the fixture models) cheap. The spec's maxima are the defaults,
# so larger jobs are a documented 422 here.
count = 1
[limits]
max_side = 64
max_pixels = 4096
max_steps = 4
max_cutn = 2
EOF

# With keys off the server asks for none: that run uses the document without its
# security requirement (otherwise a request without a key would count as bad input).
"$VENV/bin/python" - "$work/openapi-keys-off.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open("openapi.yaml"))
doc.pop("security", None)
doc.get("components", {}).pop("securitySchemes", None)
for item in doc["paths"].values():
    for op in item.values():
        if isinstance(op, dict):
            op.pop("security", None)
yaml.safe_dump(doc, open(sys.argv[1], "w"), sort_keys=False)
PY

start_server() {
    # Offline: jobs naming catalogue models fail at once instead of downloading.
    VQCLIP_OFFLINE=1 VQCLIP_LOG=${VQCLIP_LOG:-warn} "$BIN" serve --config "$work/vqclip.toml" \
        > "$work/stdout" 2> "$work/server.log" &
    server_pid=$!
    for _ in $(seq 100); do
        if grep -q "listening on" "$work/stdout" 2>/dev/null; then
            base=$(sed -n 's/^vqclip listening on //p' "$work/stdout" | head -n1)
            return 0
        fi
        sleep 0.1
    done
    echo "fuzz-api: the server did not start" >&2
    cat "$work/server.log" >&2
    exit 1
}

stop_server() {
    kill "$server_pid"
    wait "$server_pid" || true
    server_pid=""
}

# One schemathesis run; its output is kept for the totals.
fuzz() {
    local name=$1 document=$2
    shift 2
    echo "== fuzz-api: $name (base $base)"
    local rc=0
    # Bad input may be refused as 413 (too large), 415 (no or wrong body type) or 429
    # (a limit) as well as schemathesis's defaults; all are documented refusals.
    timeout "$RUN_SECONDS" "$VENV/bin/st" run "$document" \
        --base-url "$base" \
        --checks all \
        --experimental-negative-data-rejection-allowed-statuses 400,401,403,404,406,413,415,422,428,429 \
        --data-generation-method all \
        --experimental openapi-3.1 \
        --hypothesis-max-examples "$EXAMPLES" \
        --hypothesis-seed 9 \
        --hypothesis-derandomize \
        --hypothesis-suppress-health-check all \
        --generation-allow-x00 false \
        --generation-codec utf-8 \
        --request-timeout 10000 \
        --no-color \
        --show-trace \
        "$@" | tee "$work/$name.out" || rc=$?
    if [ "$rc" -eq 124 ]; then
        echo "fuzz-api: $name ran past ${RUN_SECONDS}s" >&2
    fi
    return "$rc"
}

status=0
# FUZZ_RUNS picks runs when chasing a failure, e.g. FUZZ_RUNS=keys-on.
RUNS=${FUZZ_RUNS:-keys-off keys-on}
if [[ " $RUNS " == *" keys-off "* ]]; then
    start_server
    fuzz keys-off "$work/openapi-keys-off.yaml" || status=1
    stop_server
fi
if [[ " $RUNS " == *" keys-on "* ]]; then

# Keys on: every request carries a valid key whose rate the fuzzer cannot exhaust.
key=$("$BIN" keys create --name fuzz --rps 100000 --burst 100000 --max-queued 0 \
    --config "$work/vqclip.toml" 2>/dev/null)
start_server
fuzz keys-on openapi.yaml --header "Authorization: Bearer $key" || status=1
stop_server
fi

echo "== fuzz-api: totals"
for name in keys-off keys-on; do
    if [ -f "$work/$name.out" ]; then
        echo "$name: $(grep -E '^=+ .*(passed|failed|errored).* =+$' "$work/$name.out" | tail -n1)"
    fi
done
if grep -qE "ERROR|panicked" "$work/server.log"; then
    echo "fuzz-api: the server log has faults:" >&2
    grep -E "ERROR|panicked" "$work/server.log" | head -20 >&2
    status=1
fi
exit "$status"
