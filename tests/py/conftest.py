"""Shared pytest fixtures: the real gigastt binary on port 0, golden texts,
fixture paths and small helpers for the client and proxy tests.

The binary is `GIGASTT_BIN` if set, else target/debug/gigastt (build it first:
`cargo build`). Each server gets the tiny random test model at fp32, whose
transcripts of the golos fixtures are the goldens in tests/golden/golden.json.

`GIGASTT_REQUIRE_TOOLS=1` (set by .ci/run) turns a missing curl, caddy, nginx or
openssl into a failure instead of a skip, so CI cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY_MODEL = ROOT / "models" / "gigaam-v3-tiny-random"
START_TIMEOUT_S = 60
LISTENING = re.compile(r"listening on http://(\S+):(\d+)")


def gigastt_bin() -> Path:
    return Path(os.environ.get("GIGASTT_BIN", ROOT / "target" / "debug" / "gigastt"))


def golden_text(name: str) -> str:
    golden = json.loads((ROOT / "tests" / "golden" / "golden.json").read_text())
    return golden["inputs"][name]["rnnt"]["max_symbols_10"]["text"]


def golos(name: str) -> Path:
    return FIXTURES / "golos" / f"{name}.wav"


GOLOS = [f"golos_{i:02d}" for i in range(10)]
LONG_70S = FIXTURES / "extra" / "long_70s.wav"


def normalize(text: str) -> str:
    """Lower-case words only, for 'contains this sentence' checks."""
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(path: str | None, what: str) -> str:
    """`path` if it exists, else skip (or fail under GIGASTT_REQUIRE_TOOLS=1)."""
    if path and Path(path).exists():
        return path
    message = f"{what} not found (run scripts/proxy-env.sh)"
    if os.environ.get("GIGASTT_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def concat_wav(src: Path, copies: int, dst: Path) -> Path:
    """`copies` back-to-back copies of the WAV `src`, same format."""
    with wave.open(str(src), "rb") as r:
        params = r.getparams()
        frames = r.readframes(r.getnframes())
    with wave.open(str(dst), "wb") as w:
        w.setparams(params)
        for _ in range(copies):
            w.writeframes(frames)
    return dst


def pcm16_of(path: Path) -> bytes:
    """Raw PCM16 LE samples of a 16 kHz mono s16 WAV."""
    with wave.open(str(path), "rb") as r:
        assert (r.getframerate(), r.getnchannels(), r.getsampwidth()) == (16000, 1, 2)
        return r.readframes(r.getnframes())


class Gigastt:
    """A running `gigastt serve`; its stderr is kept line by line."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        binary = gigastt_bin()
        if not binary.exists():
            pytest.fail(f"{binary} missing: run `cargo build` (or set GIGASTT_BIN)")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GIGASTT_")}
        full_env.update(env or {})
        self.args = args
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [str(binary), "serve", "--port", "0", "--model-dir", str(TINY_MODEL),
             "--precision", "fp32", *args],
            cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._port_found = threading.Event()
        self.port = 0
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._port_found.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gigastt did not start ({self.proc.returncode}):\n{self.log}")
        self.url = f"http://127.0.0.1:{self.port}"
        self.addr = f"127.0.0.1:{self.port}"
        while True:
            # The "ready:" line, so a rate-limited server's bucket stays full.
            if any("] ready: " in line for line in self.log_lines()):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gigastt never became ready:\n{self.log}")
            time.sleep(0.05)

    def _pump(self):
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self._lock:
                self.lines.append(line)
            m = LISTENING.search(line)
            if m and not self._port_found.is_set():
                self.port = int(m.group(2))
                self._port_found.set()

    def log_lines(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines())

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> str | None:
        """First log line matching the regex `pattern`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines():
                if re.search(pattern, line):
                    return line
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def gigastt_factory():
    """`start(*args, env=None)` -> a ready Gigastt; all are stopped at the end."""
    started: list[Gigastt] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Gigastt:
        server = Gigastt(list(args), env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def gigastt(gigastt_factory) -> Gigastt:
    """One plain server shared by the tests that don't need special flags."""
    return gigastt_factory()


@pytest.fixture(scope="session")
def curl() -> str:
    return require_tool(shutil.which("curl"), "curl")


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    return Path(sys.executable).parent


def session_get(url: str, **kwargs) -> requests.Response:
    return requests.get(url, timeout=kwargs.pop("timeout", 30), **kwargs)
