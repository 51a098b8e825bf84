"""A real ``python -m sglang.launch_server`` on this machine, for tests, demos and benchmarks.

:class:`SGLangServer` starts one server on a free loopback port in its own
process group, waits for ``/health``, offers a small HTTP client
(:meth:`~SGLangServer.generate`, :meth:`~SGLangServer.chat`, ...) and stops the
whole process group by the PID it started (SIGTERM, then SIGKILL). Every
server must be given ``--max-total-tokens``: without it SGLang sizes the KV
pool from free memory (many GB on CPU). On a machine without a GPU the server
runs SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``, ``--device cpu``) with
this package's attention backend unless the caller picks another, and with
``--sleep-on-idle``: an idle SGLang scheduler otherwise busy-polls a core, which
on a 2-core machine slows down everything else running there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["CPU_ENV", "STOP_ENV", "SGLangServer", "SGLangServerError", "free_port"]

CPU_ENV: dict[str, str] = {"SGLANG_USE_CPU_ENGINE": "1"}
"""Environment that makes SGLang run its CPU engine."""

STOP_ENV: dict[str, str] = {
    "SGLANG_PYSPY_DUMP_BEFORE_CRASH": "0",
    "SGLANG_CUDA_COREDUMP_BEFORE_CRASH": "0",
}
"""A stop by :meth:`SGLangServer.stop` is no crash: without these, SGLang's SIGTERM handler
waits 5 s for the GPU to settle before dumping py-spy traces and CUDA core dumps."""

DEFAULT_CPU_ARGS: tuple[str, ...] = ("--device", "cpu", "--attention-backend", "cacheflow_cpu")


class SGLangServerError(RuntimeError):
    """The server did not come up, died, or answered an HTTP error."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


@dataclass
class SGLangServer:
    """One SGLang HTTP server process (see the module doc).

    ``args`` are extra ``launch_server`` arguments and must contain
    ``--max-total-tokens``. ``cpu`` adds :data:`CPU_ENV` and, unless ``args``
    already set them, ``--device cpu --attention-backend cacheflow_cpu``;
    ``sleep_on_idle`` adds ``--sleep-on-idle``.
    """

    model_path: str | Path
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cpu: bool = True
    sleep_on_idle: bool = True
    host: str = "127.0.0.1"
    port: int | None = None
    log_path: Path | None = None
    startup_timeout: float = 300.0
    request_timeout: float = 600.0

    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_file: Any = field(default=None, init=False, repr=False)
    startup_seconds: float | None = field(default=None, init=False)
    """Seconds from process start to the first healthy ``/health``."""

    def __post_init__(self) -> None:
        if not _has_flag(self.args, "--max-total-tokens"):
            raise ValueError("an SGLang server needs --max-total-tokens (RAM sizes it otherwise)")

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise SGLangServerError("server not started")
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """The full ``launch_server`` command line (port included once started)."""
        args = list(self.args)
        if self.cpu:
            for flag, value in zip(DEFAULT_CPU_ARGS[::2], DEFAULT_CPU_ARGS[1::2], strict=True):
                if not _has_flag(args, flag):
                    args += [flag, value]
        if self.sleep_on_idle and not _has_flag(args, "--sleep-on-idle"):
            args.append("--sleep-on-idle")
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model_path)]
        cmd += ["--host", self.host, "--port", str(self.port), *args]
        return cmd

    def start(self) -> SGLangServer:
        """Start the server and wait until ``/health`` answers; raises with the log tail."""
        if self._process is not None:
            raise SGLangServerError("server already started")
        if self.port is None:
            self.port = free_port()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"sglang-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, **STOP_ENV, **(CPU_ENV if self.cpu else {}), **self.env}
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        self._process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self._process is not None
        while True:
            code = self._process.poll()
            if code is not None:
                raise SGLangServerError(
                    f"SGLang exited with code {code} during start-up:\n{self.log_tail()}"
                )
            if time.monotonic() - started > self.startup_timeout:
                raise SGLangServerError(
                    f"SGLang not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server's process group (SIGTERM, then SIGKILL); returns its exit code."""
        process = self._process
        code = None
        if process is not None:
            code = process.poll()
            if code is None:
                self._signal_group(process.pid, signal.SIGTERM)
                try:
                    code = process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(process.pid, signal.SIGKILL)
                    code = process.wait(timeout=timeout)
            # Children (scheduler, detokenizer) share the group: make sure none is left.
            self._signal_group(process.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """The server's combined stdout and stderr so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- client ------------------------------------------------------------------------

    def request(self, method: str, path: str, payload: Any = None) -> Any:
        """One HTTP request; the JSON reply (or text), raising on HTTP errors."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            f"{self.base_url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise SGLangServerError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        try:
            return json.loads(body)
        except ValueError:
            return body

    def generate(
        self,
        *,
        input_ids: Sequence[int] | None = None,
        text: str | None = None,
        max_new_tokens: int = 8,
        temperature: float = 0.0,
        return_logprob: bool = True,
        top_logprobs_num: int = 0,
        **sampling: Any,
    ) -> dict[str, Any]:
        """``POST /generate`` for one prompt (token ids or text); greedy by default;
        ``top_logprobs_num``: that many most likely tokens' logprobs at each output position
        (``meta_info["output_top_logprobs"]``)."""
        if (input_ids is None) == (text is None):
            raise ValueError("give exactly one of input_ids and text")
        payload: dict[str, Any] = {
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                **sampling,
            },
            "return_logprob": return_logprob,
        }
        if top_logprobs_num:
            payload["top_logprobs_num"] = top_logprobs_num
        if input_ids is not None:
            payload["input_ids"] = list(input_ids)
        else:
            payload["text"] = text
        return self.request("POST", "/generate", payload)

    def chat(self, messages: Sequence[Mapping[str, str]], **params: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions``; greedy unless ``temperature`` is given."""
        payload = {"model": "default", "messages": list(messages), "temperature": 0.0, **params}
        return self.request("POST", "/v1/chat/completions", payload)

    def flush_cache(self, wait_s: float = 0.0) -> None:
        """Drop the radix cache (device and host). SGLang refuses while requests or HiCache
        transfers are in flight: ``wait_s`` > 0 retries until then."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.request("POST", "/flush_cache")
                return
            except SGLangServerError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
