#!/usr/bin/env bash
# Release check (CI): build the static musl binary, prove it has no dynamic
# dependencies, then run it exactly as the Dockerfile does (no Docker engine
# here) — `serve --host 0.0.0.0 --bind-all` with the model dir from
# GIGASTT_MODEL_DIR — and check that it binds, serves /health and a transcript,
# and that `gigastt health` (the image's HEALTHCHECK) agrees.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=x86_64-unknown-linux-musl
if ! command -v musl-gcc >/dev/null; then
    apt-get install -y -qq --no-install-recommends musl-tools
fi
make release RELEASE_TARGET=$target
bin="target/$target/release/gigastt"

echo "--- ldd $bin"
if ldd "$bin" 2>&1 | grep -qE '=>|ld-linux'; then
    ldd "$bin"
    echo "check-release: $bin is dynamically linked" >&2
    exit 1
fi
file "$bin" | grep -q 'static' || { echo "check-release: not a static executable" >&2; exit 1; }
echo "size: $(stat -c %s "$bin") bytes"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
# The Dockerfile's CMD, with the image's ENV GIGASTT_MODEL_DIR (here: the test model).
GIGASTT_MODEL_DIR=models/gigaam-v3-tiny-random GIGASTT_PORT=$port \
    "$bin" serve --host 0.0.0.0 --bind-all >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
    grep -q '] ready: ' "$log" && break
    sleep 0.1
done
grep -q "listening on http://0.0.0.0:$port" "$log" || { cat "$log"; echo "check-release: did not bind 0.0.0.0:$port" >&2; exit 1; }
"$bin" health --url "http://127.0.0.1:$port/health"
text=$(curl -sf --data-binary @tests/fixtures/golos/golos_00.wav "http://127.0.0.1:$port/v1/transcribe?format=text")
expected="Шестьдесят тысяч тенге сколько будет стоить?"
[ "$text" = "$expected" ] || { echo "check-release: got '$text', expected '$expected'" >&2; exit 1; }
kill -TERM $pid
wait $pid
echo "check-release: ok (static, binds 0.0.0.0 with --bind-all, serves, exits 0 on SIGTERM)"
