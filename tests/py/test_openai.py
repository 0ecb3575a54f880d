"""POST /v1/audio/transcriptions driven by the real `openai` Python SDK.

Starts the real binary (`GIGASTT_BIN`, else target/debug/gigastt) on port 0
with the tiny random test model and checks every response format, streaming
and the OpenAI-shaped errors. Run: `cargo build` then
`.venv-test/bin/pytest -q tests/py/test_openai.py`.
"""

import os
import re
import socket
import subprocess
import threading
import time
import wave
from pathlib import Path

import openai
import pytest
import requests
import srt
import webvtt
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[2]
WAV = ROOT / "tests" / "fixtures" / "golos" / "golos_00.wav"
# What the tiny test model transcribes golos_00.wav to (the engine's transcript).
EXPECTED = "Шестьдесят тысяч тенге сколько будет стоить?"
START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def gigastt_server():
    binary = os.environ.get("GIGASTT_BIN", str(ROOT / "target" / "debug" / "gigastt"))
    proc = subprocess.Popen(
        [binary, "serve", "--port", "0",
         "--model-dir", str(ROOT / "models" / "gigaam-v3-tiny-random"),
         "--precision", "fp32", "--log-level", "info"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError(f"gigastt exited early with {proc.wait()}")
            found = re.search(r"listening on (http://\S+)", line)
            url = found and found.group(1)
        assert url, "no 'listening on http://' line"
        # Keep draining stderr so a full pipe never blocks the server.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("/ready never turned 200")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(gigastt_server):
    return OpenAI(base_url=f"{gigastt_server}/v1", api_key="unused", max_retries=0)


def transcribe(client, **kwargs):
    with open(WAV, "rb") as f:
        return client.audio.transcriptions.create(model="gigaam-v3", file=f, **kwargs)


@pytest.fixture(scope="module")
def engine_json(gigastt_server):
    """Our own /v1/transcribe on the same file: the reference transcript."""
    r = requests.post(f"{gigastt_server}/v1/transcribe", data=WAV.read_bytes(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_json_matches_engine(client, engine_json):
    result = transcribe(client)
    assert result.text == EXPECTED
    assert result.text == engine_json["text"]


def test_json_is_text_plus_usage_and_no_model_echo(gigastt_server):
    with open(WAV, "rb") as f:
        r = requests.post(f"{gigastt_server}/v1/audio/transcriptions",
                          files={"file": ("a.wav", f, "audio/wav")},
                          data={"model": "whisper-1"}, timeout=60)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["text"] == EXPECTED
    assert body["usage"]["type"] == "duration"
    assert "whisper-1" not in r.text


def test_text(client):
    result = transcribe(client, response_format="text")
    assert isinstance(result, str)
    assert result.strip() == EXPECTED


def test_srt_parses_with_valid_times(client, engine_json):
    body = transcribe(client, response_format="srt")
    cues = list(srt.parse(body))
    assert cues, body
    assert [c.index for c in cues] == list(range(1, len(cues) + 1))
    previous_end = 0.0
    for cue in cues:
        start, end = cue.start.total_seconds(), cue.end.total_seconds()
        assert previous_end <= start < end <= engine_json["duration"] + 1e-3
        previous_end = end
    assert " ".join(c.content.replace("\n", " ") for c in cues) == EXPECTED


def vtt_seconds(t):
    """A webvtt-py timestamp in seconds, milliseconds kept."""
    return t.hours * 3600 + t.minutes * 60 + t.seconds + t.milliseconds / 1000


def test_vtt_parses_with_valid_times(client, engine_json):
    body = transcribe(client, response_format="vtt")
    assert body.startswith("WEBVTT")
    cues = webvtt.from_string(body).captions
    assert cues, body
    previous_end = 0.0
    for cue in cues:
        start, end = vtt_seconds(cue.start_time), vtt_seconds(cue.end_time)
        assert previous_end <= start < end <= engine_json["duration"] + 1e-3
        previous_end = end
    assert " ".join(c.text.replace("\n", " ") for c in cues) == EXPECTED


def test_verbose_json_default_has_segments_only(client, engine_json):
    result = transcribe(client, response_format="verbose_json")
    assert result.text == EXPECTED
    assert result.language == "russian"
    assert result.duration == pytest.approx(engine_json["duration"])
    assert result.words is None
    assert [(s.start, s.end, s.text) for s in result.segments] == [
        (s["start"], s["end"], s["text"]) for s in engine_json["segments"]]


def test_verbose_json_word_granularity(client, engine_json):
    result = transcribe(client, response_format="verbose_json",
                        timestamp_granularities=["word"])
    assert result.segments is None
    assert [(w.word, w.start, w.end) for w in result.words] == [
        (w["word"], w["start"], w["end"]) for w in engine_json["words"]]
    assert " ".join(w.word for w in result.words) == EXPECTED


def test_verbose_json_segment_granularity(client, engine_json):
    result = transcribe(client, response_format="verbose_json",
                        timestamp_granularities=["segment"])
    assert result.words is None
    assert " ".join(s.text for s in result.segments) == EXPECTED
    for s in result.segments:
        assert 0 <= s.start < s.end <= engine_json["duration"] + 1e-3


def test_verbose_json_both_granularities(client):
    result = transcribe(client, response_format="verbose_json",
                        timestamp_granularities=["word", "segment"])
    assert result.words and result.segments


def test_stream_deltas_join_into_done_text(client):
    events = list(transcribe(client, stream=True))
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    assert len(events) >= 2
    done = events[-1]
    assert done.type == "transcript.text.done"
    assert done.text == EXPECTED
    assert "".join(e.delta for e in events[:-1]) == done.text


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """All ten fixtures twice with 1 s pauses (~80 s): several segments."""
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        for _ in range(2):
            for i in range(10):
                with wave.open(str(WAV.with_name(f"golos_{i:02d}.wav")), "rb") as w:
                    assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
                    out.writeframes(w.readframes(w.getnframes()) + b"\0\0" * 16000)
    return path


def test_stream_of_many_segments_matches_json(client, long_wav):
    with open(long_wav, "rb") as f:
        events = list(client.audio.transcriptions.create(model="m", file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) > 1
    assert not deltas[0].startswith(" ")
    assert all(d.startswith(" ") for d in deltas[1:])
    assert events[-1].type == "transcript.text.done"
    assert "".join(deltas) == events[-1].text
    with open(long_wav, "rb") as f:
        assert client.audio.transcriptions.create(model="m", file=f).text == events[-1].text


def test_stream_wire_format(gigastt_server):
    with open(WAV, "rb") as f:
        r = requests.post(f"{gigastt_server}/v1/audio/transcriptions",
                          files={"file": ("a.wav", f)}, data={"stream": "true"}, timeout=60)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    lines = [l for l in r.text.split("\n") if l and not l.startswith(":")]
    assert all(l.startswith("data: {") for l in lines), lines


def test_language_ru_is_accepted(client):
    assert transcribe(client, language="ru").text == EXPECTED


def test_language_en_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(client, language="en")
    error = caught.value.body
    assert error["param"] == "language"
    assert error["type"] == "invalid_request_error"
    assert "Russian only" in error["message"]


def test_granularities_need_verbose_json(client):
    with pytest.raises(openai.BadRequestError) as caught:
        transcribe(client, timestamp_granularities=["word"])
    assert caught.value.body["param"] == "timestamp_granularities[]"
    assert "verbose_json" in caught.value.body["message"]


def test_missing_file_is_400_in_openai_shape(gigastt_server):
    r = requests.post(f"{gigastt_server}/v1/audio/transcriptions",
                      files={"model": (None, "whisper-1")}, timeout=10)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "file"
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_unsupported_audio_is_415_naming_formats(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(
            model="gigaam-v3", file=("a.wav", b"plain text, not audio at all\n" * 8))
    assert caught.value.status_code == 415
    assert "wav" in caught.value.body["message"]


def test_not_multipart_is_415(gigastt_server):
    r = requests.post(f"{gigastt_server}/v1/audio/transcriptions",
                      data=WAV.read_bytes(), headers={"Content-Type": "audio/wav"}, timeout=10)
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_keep_alive_survives_a_field_error(gigastt_server):
    url = f"{gigastt_server}/v1/audio/transcriptions"
    with requests.Session() as s, open(WAV, "rb") as f:
        audio = f.read()
        bad = s.post(url, files={"file": ("a.wav", audio)}, data={"language": "de"}, timeout=10)
        assert bad.status_code == 400
        good = s.post(url, files={"file": ("a.wav", audio)}, timeout=60)
        assert good.status_code == 200
        assert good.json()["text"] == EXPECTED


def test_expect_100_continue(gigastt_server):
    host, port = gigastt_server.removeprefix("http://").rsplit(":", 1)
    boundary = "gigastt-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.wav\"\r\n\r\n").encode() + WAV.read_bytes() + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; "
            f"name=\"response_format\"\r\n\r\ntext\r\n--{boundary}--\r\n").encode()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            f"Connection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert reply.decode().endswith(EXPECTED + "\n")
