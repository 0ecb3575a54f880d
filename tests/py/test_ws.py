"""WebSocket `/v1/ws` driven by real Python `websockets` clients against the
real binary (SPEC.md "WebSocket /v1/ws"): the ready/configure handshake, PCM16
streaming at every supported rate, VAD endpointing (partials, one final per
utterance, the 1 s pre-roll), protocol errors that keep the session alive,
frame cap (1009), idle timeout and shutdown (1001), session cap (1008), the
origin check, ping/pong and pool saturation.

The tiny random model is extremely sensitive to where a piece of audio starts
and ends, so exact-text checks only use audio whose extent is known: a whole
golos clip (its golden text) or the very samples the server kept, transcribed
over REST for comparison.

Run: `cargo build` then `.venv-test/bin/pytest -q tests/py/test_ws.py`.
"""

from __future__ import annotations

import array
import asyncio
import io
import json
import signal
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import FIXTURES, LONG_70S, ROOT, Gigastt, golden_text, golos, pcm16_of

RATE = 16000
FRAME_16K = RATE // 10 * 2  # 100 ms of 16 kHz PCM16, in bytes
SESSION_TIMEOUT_S = 30
# src/speech/stream.rs: before any speech only the last PRE_ROLL_SECS are kept;
# the VAD scores 512-sample windows and speech starts at p >= 0.5.
PRE_ROLL_SAMPLES = RATE
VAD_WINDOW = 512
VAD_THRESHOLD = 0.5
VAD = json.loads((ROOT / "tests" / "golden" / "vad.json").read_text())
CLOSE_NORMAL, CLOSE_AWAY, CLOSE_POLICY, CLOSE_TOO_BIG = 1000, 1001, 1008, 1009


# ---------------------------------------------------------------- helpers


def ws_url(server: Gigastt) -> str:
    return f"ws://{server.addr}/v1/ws"


def connect(server: Gigastt, **kwargs):
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 5)
    kwargs.setdefault("max_size", None)
    return websockets.connect(ws_url(server), **kwargs)


def run(coro, timeout: float = SESSION_TIMEOUT_S):
    """Runs one client coroutine; a hung session fails instead of blocking."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def frames(pcm: bytes, size: int, first: int | None = None) -> list[bytes]:
    """`pcm` cut into `size`-byte frames (the first one `first` bytes if given)."""
    out, i = [], 0
    if first:
        out.append(pcm[:first])
        i = first
    out.extend(pcm[j:j + size] for j in range(i, len(pcm), size))
    return out


def wav_pcm16_mono(path: Path) -> tuple[int, bytes]:
    """(rate, PCM16 LE mono) of a s16 WAV; stereo is downmixed by averaging."""
    with wave.open(str(path), "rb") as r:
        assert r.getsampwidth() == 2, path
        rate, channels = r.getframerate(), r.getnchannels()
        data = r.readframes(r.getnframes())
    samples = array.array("h")
    samples.frombytes(data)
    if channels > 1:
        samples = array.array(
            "h",
            (sum(samples[i:i + channels]) // channels
             for i in range(0, len(samples), channels)),
        )
    return rate, samples.tobytes()


def wav_bytes(pcm: bytes, rate: int = RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def rest_text(server: Gigastt, pcm: bytes) -> str:
    """The REST transcript of 16 kHz PCM16 (one piece, no streaming)."""
    r = requests.post(f"{server.url}/v1/transcribe", data=wav_bytes(pcm), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def vad_onset_end(name: str) -> int:
    """End sample of the first VAD window with speech (tests/golden/vad.json)."""
    probs = VAD["files"][f"fixtures/golos/{name}.wav"]["probs"]
    first = next(i for i, p in enumerate(probs) if p >= VAD_THRESHOLD)
    return (first + 1) * VAD_WINDOW


def kept_from(name: str, frame_samples: int) -> int:
    """First sample of the utterance the server transcribes when the clip is
    sent in `frame_samples` frames: until a frame completes the first speech
    window, only the last second of audio is kept, trimmed after each frame."""
    onset_end, total, start = vad_onset_end(name), 0, 0
    while True:
        total += frame_samples
        if total >= onset_end:
            return start
        start = max(0, total - PRE_ROLL_SAMPLES)


@dataclass
class Session:
    """What one client saw: `ready`, then every message in order."""
    ready: dict
    messages: list[dict] = field(default_factory=list)
    before_stop: int = 0  # messages that arrived before `stop` was sent
    close_code: int | None = None
    close_reason: str = ""
    seconds: float = 0.0

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def finals(self) -> list[dict]:
        return self.of("final")

    @property
    def text(self) -> str:
        return " ".join(f["text"] for f in self.finals)

    @property
    def error_codes(self) -> list[str]:
        return [m["code"] for m in self.of("error")]


async def stream(
    server: Gigastt,
    chunks: list[bytes | str],
    rate: int | None = RATE,
    delay: float = 0.0,
    stop: bool = True,
    **connect_kwargs,
) -> Session:
    """One session: ready, optional configure, `chunks` (bytes = audio, str =
    a text message) with `delay` between them, then `stop`; collects every
    message until the server closes."""
    started = time.monotonic()
    async with connect(server, **connect_kwargs) as ws:
        session = Session(ready=json.loads(await ws.recv()))
        assert session.ready["type"] == "ready", session.ready
        if rate is not None:
            await ws.send(json.dumps({"type": "configure", "sample_rate": rate}))
            assert json.loads(await ws.recv()) == {"type": "configured", "sample_rate": rate}

        async def reader():
            try:
                async for m in ws:
                    assert isinstance(m, str), f"binary message from the server: {m!r}"
                    session.messages.append(json.loads(m))
            except ConnectionClosed:
                pass

        reading = asyncio.create_task(reader())
        try:
            for chunk in chunks:
                await ws.send(chunk)
                if delay:
                    await asyncio.sleep(delay)
            session.before_stop = len(session.messages)
            if stop:
                await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        await reading
        session.close_code = ws.close_code
        session.close_reason = ws.close_reason or ""
    session.seconds = time.monotonic() - started
    return session


def check_words(finals: list[dict], duration: float, offset: float = 0.0) -> None:
    """Each final's words spell its text; times are monotonic, within the audio."""
    prev_start = prev_end = offset
    for final in finals:
        assert set(final) == {"type", "text", "words"}, final
        words = final["words"]
        assert words and " ".join(w["word"] for w in words) == final["text"], final
        for w in words:
            assert set(w) == {"word", "start", "end", "confidence"}, w
            assert w["word"] and not w["word"].isspace(), w
            assert 0.0 <= w["start"] <= w["end"] <= duration + 1e-3, (w, duration)
            assert w["start"] >= prev_start and w["end"] >= prev_end, (w, final)
            assert 0.0 <= w["confidence"] <= 1.0, w
            prev_start, prev_end = w["start"], w["end"]


def similar_length(text: str, reference: str) -> bool:
    """tests/cli.rs `resampled_and_stereo_wavs_transcribe_to_text_of_similar_length`."""
    n, ref = len(text), len(reference)
    return 0.5 * ref <= n <= 2.0 * ref


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def limits_server(gigastt_factory):
    """Small frame cap, 1 s idle timeout and a 2 s session cap, all on one server
    (each test below trips exactly one of them)."""
    server = gigastt_factory(
        "--ws-frame-max-bytes", "4096", "--idle-timeout-secs", "1", "--max-session-secs", "2"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def saturated_server(gigastt_factory):
    server = gigastt_factory("--pool-size", "1", "--pool-checkout-timeout-secs", "0")
    yield server
    server.stop()


# ---------------------------------------------------------------- full sessions


@pytest.mark.parametrize("name", ["golos_00", "golos_01", "golos_02", "golos_03", "golos_04"])
def test_full_session_gives_the_golden_text(gigastt, name):
    pcm = pcm16_of(golos(name))
    duration = len(pcm) / 2 / RATE
    session = run(stream(gigastt, frames(pcm, FRAME_16K)))

    ready = session.ready
    assert set(ready) == {"type", "model", "sample_rate", "version", "supported_rates"}, ready
    assert "TEST-MODEL" in ready["model"], ready
    assert ready["sample_rate"] == 48000
    assert isinstance(ready["version"], str) and ready["version"], ready
    assert ready["supported_rates"] == [8000, 16000, 24000, 44100, 48000], ready

    assert session.close_code == CLOSE_NORMAL, session
    assert session.error_codes == [], session.messages
    assert {m["type"] for m in session.messages} <= {"partial", "final"}, session.messages
    assert session.messages == [] or session.messages[-1]["type"] == "final", session.messages
    for partial in session.of("partial"):
        assert set(partial) == {"type", "text"} and partial["text"], partial
    check_words(session.finals, duration)

    start = kept_from(name, FRAME_16K // 2)
    if start == 0:
        assert session.text == golden_text(name), session.messages
    else:
        # Speech starts after the 1 s pre-roll: the server transcribes only the
        # last second before it, which the random model reads differently.
        assert session.text == rest_text(gigastt, pcm[2 * start:]), (start, session.messages)
        # With the whole lead-in in the first frame nothing is trimmed.
        lead_in = -(-vad_onset_end(name) // (FRAME_16K // 2)) * FRAME_16K
        whole = run(stream(gigastt, frames(pcm, FRAME_16K, first=lead_in)))
        assert whole.close_code == CLOSE_NORMAL, whole
        assert whole.text == golden_text(name), whole.messages
        check_words(whole.finals, duration)


def test_stop_without_audio_closes_normally(gigastt):
    session = run(stream(gigastt, []))
    assert session.messages == [] and session.close_code == CLOSE_NORMAL, session


# ---------------------------------------------------------------- sample rates


def test_default_48k_without_configure(gigastt):
    rate, pcm = wav_pcm16_mono(FIXTURES / "extra" / "golos_00_48k_stereo.wav")
    assert rate == 48000
    session = run(stream(gigastt, frames(pcm, rate // 10 * 2), rate=None))
    assert session.ready["sample_rate"] == 48000
    assert session.close_code == CLOSE_NORMAL, session
    assert session.error_codes == [] and session.of("configured") == [], session.messages
    assert session.finals, session.messages
    assert similar_length(session.text, golden_text("golos_00")), session.text
    check_words(session.finals, len(pcm) / 2 / rate)


@pytest.mark.parametrize("file, rate", [("golos_00_44k1.wav", 44100), ("golos_00_8k.wav", 8000)])
def test_configured_rates(gigastt, file, rate):
    got, pcm = wav_pcm16_mono(FIXTURES / "extra" / file)
    assert got == rate
    session = run(stream(gigastt, frames(pcm, rate // 10 * 2), rate=rate))
    assert session.close_code == CLOSE_NORMAL, session
    assert session.error_codes == [], session.messages
    assert session.finals, session.messages
    assert similar_length(session.text, golden_text("golos_00")), session.text
    check_words(session.finals, len(pcm) / 2 / rate)


@pytest.mark.parametrize("name", ["golos_00", "golos_03"])
@pytest.mark.parametrize("size", [3333, 1001])
def test_odd_frame_boundaries_give_the_same_final(gigastt, name, size):
    pcm = pcm16_of(golos(name))
    even = run(stream(gigastt, frames(pcm, FRAME_16K)))
    odd = run(stream(gigastt, frames(pcm, size)))
    assert odd.close_code == CLOSE_NORMAL, odd
    assert odd.error_codes == [], odd.messages
    assert odd.text == even.text == golden_text(name), (odd.messages, even.messages)
    assert odd.finals == even.finals


# ---------------------------------------------------------------- protocol errors


def test_bad_messages_get_errors_and_the_session_goes_on(gigastt):
    pcm = pcm16_of(golos("golos_00"))
    bad = [
        "{not json",
        json.dumps({"type": "transcribe"}),
        json.dumps({"sample_rate": 16000}),
        json.dumps([1, 2]),
        "42",
    ]
    audio = frames(pcm, FRAME_16K)
    # Half the audio, the bad messages, then the rest: nothing is lost.
    chunks = audio[:10] + bad + audio[10:]
    session = run(stream(gigastt, chunks))
    errors = session.of("error")
    assert [e["code"] for e in errors] == ["bad_message"] * len(bad), session.messages
    for e in errors:
        assert set(e) == {"type", "code", "message"} and e["message"], e
    assert "transcribe" in errors[1]["message"], errors[1]
    assert session.close_code == CLOSE_NORMAL, session
    assert session.text == golden_text("golos_00"), session.messages


def test_configure_after_audio_is_refused_and_the_rate_stays(gigastt):
    pcm = pcm16_of(golos("golos_00"))
    audio = frames(pcm, FRAME_16K)
    late = json.dumps({"type": "configure", "sample_rate": 8000})
    session = run(stream(gigastt, audio[:5] + [late] + audio[5:]))
    assert session.error_codes == ["configure_after_audio"], session.messages
    assert session.of("configured") == [], session.messages
    assert session.close_code == CLOSE_NORMAL, session
    # Still 16 kHz: the exact golden text.
    assert session.text == golden_text("golos_00"), session.messages


def test_unsupported_rate_is_refused_and_the_rate_stays(gigastt):
    pcm = pcm16_of(golos("golos_00"))
    bad_rate = json.dumps({"type": "configure", "sample_rate": 22050})
    # configure 16000 (accepted by `stream`), then 22050: refused, still 16 kHz.
    session = run(stream(gigastt, [bad_rate, *frames(pcm, FRAME_16K)]))
    errors = session.of("error")
    assert [e["code"] for e in errors] == ["unsupported_sample_rate"], session.messages
    assert "22050" in errors[0]["message"], errors
    assert session.close_code == CLOSE_NORMAL, session
    assert session.text == golden_text("golos_00"), session.messages


def test_unsupported_rate_before_any_configure(gigastt):
    async def go():
        async with connect(gigastt) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "configure", "sample_rate": 22050}))
            first = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "configure", "sample_rate": 16000}))
            second = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "stop"}))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return first, second, ws.close_code

    first, second, code = run(go())
    assert first["type"] == "error" and first["code"] == "unsupported_sample_rate", first
    assert second == {"type": "configured", "sample_rate": 16000}
    assert code == CLOSE_NORMAL


# ---------------------------------------------------------------- limits


def test_frame_at_the_cap_is_accepted(limits_server):
    session = run(stream(limits_server, [b"\0" * 4096]))
    assert session.error_codes == [] and session.close_code == CLOSE_NORMAL, session


def test_oversized_frame_closes_1009(limits_server):
    session = run(stream(limits_server, [b"\0" * 10000], stop=False))
    assert session.close_code == CLOSE_TOO_BIG, session
    assert session.error_codes in ([], ["frame_too_large"]), session.messages
    assert limits_server.proc.poll() is None


def test_idle_timeout_closes_1001(limits_server):
    async def go():
        async with connect(limits_server) as ws:
            await ws.recv()
            started = time.monotonic()
            messages = []
            try:
                async for m in ws:
                    messages.append(json.loads(m))
            except ConnectionClosed:
                pass
            return messages, ws.close_code, time.monotonic() - started

    messages, code, waited = run(go())
    assert code == CLOSE_AWAY, (code, messages)
    assert [m.get("code") for m in messages] in ([], ["idle_timeout"]), messages
    assert 0.8 <= waited <= 5.0, waited


def test_session_cap_closes_1008(limits_server):
    silence = b"\0" * FRAME_16K  # 3200 bytes: under the 4096-byte cap
    # Up to 6 s of frames every 100 ms (never idle); the 2 s cap ends it first.
    session = run(stream(limits_server, [silence] * 60, delay=0.1, stop=False))
    assert session.close_code == CLOSE_POLICY, session
    assert session.error_codes == ["session_limit"], session.messages
    assert 1.8 <= session.seconds <= 5.0, session.seconds


# ---------------------------------------------------------------- live streaming


def test_partials_come_before_finals_in_a_live_stream(gigastt):
    """16 s of long_70s.wav (golos_00, 01, 02 and the start of 03, 1 s of
    silence between clips) at 4x real time: a partial while each utterance goes
    on, and one final per finished utterance before `stop`."""
    pcm = pcm16_of(LONG_70S)[: 2 * RATE * 16]
    session = run(stream(gigastt, frames(pcm, FRAME_16K), delay=0.025))
    assert session.close_code == CLOSE_NORMAL, session
    assert session.error_codes == [], session.messages
    kinds = [m["type"] for m in session.messages]
    early = session.messages[: session.before_stop]
    early_finals = [m for m in early if m["type"] == "final"]
    # golos_00, 01 and 02 end before 16 s; a final with no words is skipped.
    assert 2 <= len(early_finals) <= 3, kinds
    first_final = kinds.index("final")
    assert "partial" in kinds[:first_final], kinds
    # The first utterance starts at sample 0: all of golos_00 and its pause.
    assert early_finals[0]["text"] == golden_text("golos_00"), session.messages
    check_words(session.finals, len(pcm) / 2 / RATE)
    # The second utterance starts after golos_00 (4 s).
    assert early_finals[1]["words"][0]["start"] >= 4.0, early_finals[1]


def test_sigterm_sends_the_last_final_then_1001(gigastt_factory, gigastt):
    server = gigastt_factory()
    pcm = pcm16_of(golos("golos_00"))[: 2 * RATE * 2]  # the first 2 s of speech
    expected = rest_text(gigastt, pcm)
    assert expected, "pick audio the model transcribes to some text"

    async def go():
        async with connect(server) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "configure", "sample_rate": RATE}))
            await ws.recv()
            for chunk in frames(pcm, FRAME_16K):
                await ws.send(chunk)
            # The pong comes once the server has read every frame before the ping.
            await asyncio.wait_for(await ws.ping(), 10)
            server.proc.send_signal(signal.SIGTERM)
            messages = []
            try:
                async for m in ws:
                    messages.append(json.loads(m))
            except ConnectionClosed:
                pass
            return messages, ws.close_code

    messages, code = run(go())
    finals = [m for m in messages if m["type"] == "final"]
    assert [m["type"] for m in messages][-1:] == ["final"], messages
    assert " ".join(f["text"] for f in finals) == expected, messages
    assert code == CLOSE_AWAY, (code, messages)
    assert server.proc.wait(timeout=20) == 0, server.log


# ---------------------------------------------------------------- handshake, ping


def test_foreign_origin_is_rejected_with_403(gigastt):
    async def go():
        async with connect(gigastt, origin="http://evil.example"):
            pass

    with pytest.raises(InvalidStatus) as info:
        run(go())
    response = info.value.response
    assert response.status_code == 403
    assert json.loads(bytes(response.body))["code"] == "origin_denied"


@pytest.mark.parametrize(
    "origin", ["http://localhost:3000", "http://127.0.0.1:8080", "http://[::1]:5173"]
)
def test_loopback_origin_is_accepted(gigastt, origin):
    async def go():
        async with connect(gigastt, origin=origin) as ws:
            return json.loads(await ws.recv())

    assert run(go())["type"] == "ready"


def test_ping_gets_a_pong(gigastt):
    async def go():
        async with connect(gigastt) as ws:
            await ws.recv()
            latency = await asyncio.wait_for(await ws.ping(), 5)
            # Mid-stream too, and the session still works afterwards.
            await ws.send(json.dumps({"type": "configure", "sample_rate": RATE}))
            await ws.recv()
            await ws.send(b"\0" * FRAME_16K)
            await asyncio.wait_for(await ws.ping(b"again"), 5)
            await ws.send(json.dumps({"type": "stop"}))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return latency, ws.close_code

    latency, code = run(go())
    assert latency >= 0 and code == CLOSE_NORMAL


def test_client_close_is_echoed(gigastt):
    async def go():
        async with connect(gigastt) as ws:
            await ws.recv()
            await ws.close(1000, "bye")
            return ws.close_code

    assert run(go()) == CLOSE_NORMAL


# ---------------------------------------------------------------- pool saturation


@pytest.fixture(scope="module")
def saturated_sessions(saturated_server) -> list[Session]:
    """6 concurrent sessions, each golos_03 at full speed then stop, on one
    worker that never waits (`--pool-checkout-timeout-secs 0`)."""
    pcm = pcm16_of(golos("golos_03"))

    async def go():
        return await asyncio.gather(
            *(stream(saturated_server, frames(pcm, FRAME_16K)) for _ in range(6))
        )

    return run(go(), timeout=60)


def test_saturated_pool_every_session_ends_cleanly(saturated_server, saturated_sessions):
    for s in saturated_sessions:
        assert s.close_code == CLOSE_NORMAL, s
        errors = s.of("error")
        assert all(e["code"] == "pool_saturated" for e in errors), s.messages
        for e in errors:
            assert isinstance(e["retry_after_ms"], int) and e["retry_after_ms"] > 0, e
            assert e["message"], e
        # A final, or the error that says why there is none.
        assert s.finals or errors, s.messages
    assert saturated_server.proc.poll() is None
    # The server is still usable afterwards.
    after = run(stream(saturated_server, frames(pcm16_of(golos("golos_00")), FRAME_16K),
                       delay=0.02))
    assert after.close_code == CLOSE_NORMAL, after


def test_saturated_pool_still_delivers_some_final(saturated_sessions):
    assert any(s.finals for s in saturated_sessions), [s.messages for s in saturated_sessions]


def test_lone_session_is_not_refused_by_its_own_partial(saturated_server):
    """golos_00 in one frame starts a partial of all 4 s; `stop` right after it
    asks for the final while that partial (whose result the session already
    dropped) still runs on the only worker."""
    pcm = pcm16_of(golos("golos_00"))
    session = run(stream(saturated_server, [pcm]))
    assert session.error_codes == [], session.messages
    assert session.text == golden_text("golos_00"), session.messages
