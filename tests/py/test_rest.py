"""The REST API driven by real clients: the `curl` binary (uploads, Expect,
chunked, keep-alive, Server-Sent Events with `-N`, HTTP/2 prior knowledge) and
Python's requests, srt and webvtt-py for the output formats.

Run: `cargo build` then `.venv-test/bin/pytest -q tests/py/test_rest.py`.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import srt
import webvtt

from conftest import GOLOS, LONG_70S, golden_text, golos, normalize


def run_curl(curl: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([curl, "-sS", *args], capture_output=True, timeout=timeout)


def curl_json(curl: str, *args: str) -> tuple[int, dict]:
    """(status, JSON body) of one curl request."""
    out = run_curl(curl, "-w", "\n%{http_code}", *args)
    assert out.returncode == 0, out.stderr.decode()
    body, _, status = out.stdout.decode().rpartition("\n")
    return int(status), json.loads(body)


def curl_sse(curl: str, url: str, body: Path, *extra: str) -> list[tuple[float, dict]]:
    """POSTs `body` with `curl -N` and returns (seconds since start, event) per
    `data:` line, timed as each line arrives."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [curl, "-sS", "-N", "--data-binary", f"@{body}", *extra, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    events = []
    assert proc.stdout is not None
    for raw in proc.stdout:  # unbuffered: each line as soon as it arrives
        line = raw.decode().strip()
        if line.startswith("data:"):
            events.append((time.monotonic() - started, json.loads(line[5:])))
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    return events


def assert_events_arrive_one_by_one(events: list[tuple[float, dict]]) -> None:
    kinds = [e["type"] for _, e in events]
    assert len(kinds) >= 3, kinds
    assert kinds[-1] == "final", kinds
    assert set(kinds[:-1]) == {"partial"}, kinds
    first_partial = events[0][0]
    final = events[-1][0]
    # Unbuffered delivery: the first partial is seen well before the final.
    assert final - first_partial >= 0.25, [round(t, 3) for t, _ in events]
    assert events[-1][1]["text"], events[-1][1]


# ---------------------------------------------------------------- curl uploads


@pytest.mark.parametrize("name", GOLOS)
def test_curl_upload_gives_the_golden_text(curl, gigastt, name):
    status, body = curl_json(curl, "--data-binary", f"@{golos(name)}", f"{gigastt.url}/v1/transcribe")
    assert status == 200, body
    assert body["text"] == golden_text(name)


def test_curl_format_text(curl, gigastt):
    out = run_curl(curl, "--fail", "--data-binary", f"@{golos('golos_03')}",
                   f"{gigastt.url}/v1/transcribe?format=text")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().strip() == golden_text("golos_03")


def test_curl_large_upload_uses_expect_100_continue(curl, gigastt):
    # curl sends `Expect: 100-continue` for bodies over 1 MiB; long_70s is 2.2 MB.
    out = run_curl(curl, "-v", "--data-binary", f"@{LONG_70S}", "-w", "\n%{http_code}",
                   f"{gigastt.url}/v1/transcribe?format=text")
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "Expect: 100-continue" in err, err
    assert re.search(r"< HTTP/1.1 100", err), err
    text, _, status = out.stdout.decode().rpartition("\n")
    assert status == "200", text
    assert len(text.strip()) > 50


def test_curl_chunked_upload(curl, gigastt):
    status, body = curl_json(curl, "-H", "Transfer-Encoding: chunked",
                             "--data-binary", f"@{golos('golos_08')}",
                             f"{gigastt.url}/v1/transcribe")
    assert status == 200, body
    assert body["text"] == golden_text("golos_08")


def test_curl_reuses_one_connection_for_two_uploads(curl, gigastt):
    url = f"{gigastt.url}/v1/transcribe"
    out = run_curl(curl, "-v", "--data-binary", f"@{golos('golos_00')}", url,
                   "--next", "--data-binary", f"@{golos('golos_01')}", url)
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "Re-using existing" in err, err
    decoder = json.JSONDecoder()
    text = out.stdout.decode()
    first, end = decoder.raw_decode(text)
    second, _ = decoder.raw_decode(text[end:].lstrip())
    assert first["text"] == golden_text("golos_00")
    assert second["text"] == golden_text("golos_01")


def test_curl_over_the_body_limit_gets_413_before_sending_the_body(curl, gigastt_factory):
    server = gigastt_factory("--body-limit-bytes", "100000")
    out = run_curl(curl, "--data-binary", f"@{LONG_70S}",
                   "-w", "\n%{http_code} %{size_upload}", f"{server.url}/v1/transcribe")
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.decode().rpartition("\n")
    status, uploaded = tail.split()
    assert status == "413", body
    assert json.loads(body)["code"] == "payload_too_large"
    # Expect: 100-continue was answered with the 413: the 2.2 MB never went out.
    assert int(uploaded) < LONG_70S.stat().st_size // 2, tail


def test_curl_foreign_origin_is_403_before_the_body(curl, gigastt):
    out = run_curl(curl, "-H", "Origin: https://evil.example", "--data-binary", f"@{LONG_70S}",
                   "-w", "\n%{http_code} %{size_upload}", f"{gigastt.url}/v1/transcribe")
    body, _, tail = out.stdout.decode().rpartition("\n")
    status, uploaded = tail.split()
    assert status == "403", body
    assert json.loads(body)["code"] == "origin_denied"
    assert int(uploaded) < LONG_70S.stat().st_size // 2, tail


def test_curl_http2_prior_knowledge_is_refused_and_logged(curl, gigastt_factory):
    server = gigastt_factory()
    out = run_curl(curl, "--http2-prior-knowledge", f"{server.url}/health", timeout=20)
    assert out.returncode != 0, out.stdout
    line = server.wait_for_log(r"WARN.*h2c")
    assert line, server.log
    # HTTP/1.1 keeps working on the same server.
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


# ---------------------------------------------------------------- SSE


def test_curl_sse_events_arrive_one_by_one(curl, gigastt):
    events = curl_sse(curl, f"{gigastt.url}/v1/transcribe/stream", LONG_70S)
    assert_events_arrive_one_by_one(events)
    plain = requests.post(f"{gigastt.url}/v1/transcribe", data=LONG_70S.read_bytes(), timeout=120)
    assert events[-1][1]["text"] == plain.json()["text"]


def test_sse_short_file_final_is_golden(curl, gigastt):
    events = curl_sse(curl, f"{gigastt.url}/v1/transcribe/stream", golos("golos_09"))
    assert events[-1][1]["type"] == "final"
    assert events[-1][1]["text"] == golden_text("golos_09")


# ---------------------------------------------------------------- python clients


def test_health_ready_models(gigastt):
    health = requests.get(f"{gigastt.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = requests.get(f"{gigastt.url}/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["pool_total"] >= 1
    model = requests.get(f"{gigastt.url}/v1/models", timeout=10).json()["data"][0]
    assert model["test_model"] is True and model["warning"]


def test_srt_output_parses_with_the_srt_library(gigastt):
    r = requests.post(f"{gigastt.url}/v1/transcribe?format=srt",
                      data=golos("golos_04").read_bytes(), timeout=60)
    assert r.status_code == 200
    subs = list(srt.parse(r.text))
    assert subs, r.text
    for a, b in zip(subs, subs[1:]):
        assert a.end <= b.start or a.start <= b.start
    assert all(s.start < s.end for s in subs)
    assert normalize(" ".join(s.content for s in subs)) == normalize(golden_text("golos_04"))


def test_vtt_output_parses_with_webvtt(gigastt):
    r = requests.post(f"{gigastt.url}/v1/transcribe?format=vtt",
                      data=golos("golos_06").read_bytes(), timeout=60)
    assert r.status_code == 200
    captions = webvtt.from_buffer(io.StringIO(r.text)).captions
    assert captions, r.text
    assert all(c.start_in_seconds < c.end_in_seconds for c in captions)
    text = " ".join(c.text for c in captions)
    assert normalize(text) == normalize(golden_text("golos_06"))


def test_srt_of_long_audio_has_ordered_cues(gigastt):
    r = requests.post(f"{gigastt.url}/v1/transcribe?format=srt",
                      data=LONG_70S.read_bytes(), timeout=120)
    assert r.status_code == 200
    subs = list(srt.parse(r.text))
    assert len(subs) >= 2, r.text
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    for a, b in zip(subs, subs[1:]):
        assert a.start <= b.start, (a, b)


def test_rate_limit_retry_after(gigastt_factory):
    server = gigastt_factory("--rate-limit-per-minute", "2", "--rate-limit-burst", "2")
    codes = [requests.get(f"{server.url}/v1/models", timeout=10).status_code for _ in range(2)]
    assert codes == [200, 200]
    r = requests.get(f"{server.url}/v1/models", timeout=10)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["code"] == "rate_limited"
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
