"""Start real servers on loopback for integration tests, and stop them again.

Each ``start_*`` helper returns a :class:`Server` ``(url, stop)`` (a named tuple, so
``url, stop = start_redis(tmp)`` works). ``stop()`` is idempotent and is also registered
with :mod:`atexit`; in addition a small watchdog process stops Postgres and Redis if the
process that started them dies without stopping them (pytest killed by a signal, say).

* :func:`start_postgres` — ``postgresql+psycopg://postgres@127.0.0.1:PORT/robustact``:
  a throw-away cluster (``initdb -A trust``) of the newest Debian PostgreSQL found under
  ``/usr/lib/postgresql/*/bin`` (or ``initdb`` on ``PATH``), with fsync off. As root the
  binaries run as the ``postgres`` user via ``runuser`` in a directory it owns.
* :func:`start_redis` — ``redis://127.0.0.1:PORT/0``: ``redis-server`` as a child process
  (not daemonised), no persistence.
* :func:`start_s3` — ``http://127.0.0.1:PORT``: moto's S3-compatible server in a thread of
  this process. Use :func:`s3_client` / :func:`create_bucket` to talk to it.

If ``ROBUSTACT_TEST_POSTGRES_URL``, ``ROBUSTACT_TEST_REDIS_URL`` or
``ROBUSTACT_TEST_S3_ENDPOINT`` is set, that server is used instead and ``stop`` does
nothing.

Only the standard library is imported at module level; psycopg, moto and boto3 are
imported when needed.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

ENV_POSTGRES_URL = "ROBUSTACT_TEST_POSTGRES_URL"
ENV_REDIS_URL = "ROBUSTACT_TEST_REDIS_URL"
ENV_S3_ENDPOINT = "ROBUSTACT_TEST_S3_ENDPOINT"

HOST = "127.0.0.1"
DATABASE = "robustact"

# Credentials for the moto server (it accepts any); a real endpoint given through
# ROBUSTACT_TEST_S3_ENDPOINT uses the usual AWS_* variables instead.
MOTO_ACCESS_KEY = "testing"
MOTO_SECRET_KEY = "testing"
S3_REGION = "us-east-1"


class ServerError(RuntimeError):
    """A test server could not be found, started or reached."""


class Server(NamedTuple):
    url: str
    stop: Callable[[], None]
    #: seconds from the call to a server that answers (0.0 for an external one)
    startup_seconds: float = 0.0


def _noop() -> None:
    pass


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """Make ``fn`` idempotent and thread-safe, and run it at interpreter exit too."""
    lock = threading.Lock()
    done = False

    def stop() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        try:
            fn()
        finally:
            try:
                atexit.unregister(stop)
            except Exception:  # pragma: no cover - interpreter shutting down
                pass

    atexit.register(stop)
    return stop


# A watchdog process cleans up after servers whose owner died without stopping them (pytest
# killed by SIGKILL/SIGTERM, say): it holds the read end of a pipe from this process and, at
# EOF, runs the clean-up actions of every server still registered. ``stop`` unregisters.
_WATCHDOG_CODE = r"""
import json, os, shutil, signal, subprocess, sys
entries = {}
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg["op"] == "add":
        entries[msg["key"]] = msg["actions"]
    else:
        entries.pop(msg["key"], None)
for actions in entries.values():
    for kind, *args in actions:
        try:
            if kind == "kill":
                pid, name = args
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if name.encode() in f.read():
                        os.kill(pid, signal.SIGTERM)
            elif kind == "cmd":
                subprocess.run(args[0], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=60, cwd=args[1])
            elif kind == "rmtree":
                shutil.rmtree(args[0], ignore_errors=True)
        except Exception:
            pass
"""

_watchdog_lock = threading.Lock()
_watchdog: subprocess.Popen | None = None


def _watchdog_send(msg: dict) -> None:
    import json

    global _watchdog
    with _watchdog_lock:
        if _watchdog is None or _watchdog.poll() is not None:
            if msg["op"] != "add":
                return
            import sys

            _watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG_CODE],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # not hit by a Ctrl-C meant for the test run
                text=True,
            )
        try:
            _watchdog.stdin.write(json.dumps(msg) + "\n")
            _watchdog.stdin.flush()
        except (BrokenPipeError, OSError):  # pragma: no cover - watchdog gone
            pass


def _guard(actions: list) -> Callable[[], None]:
    """Register clean-up ``actions`` with the watchdog; return a function that unregisters."""
    key = uuid.uuid4().hex
    _watchdog_send({"op": "add", "key": key, "actions": actions})
    return lambda: _watchdog_send({"op": "del", "key": key})


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _wait_tcp(port: int, deadline: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll until something accepts TCP connections on HOST:port."""
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- Postgres


def find_postgres_bindir() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl``: the newest ``/usr/lib/postgresql/N/bin``
    (Debian layout), else wherever ``initdb`` is on ``PATH``."""
    override = os.environ.get("ROBUSTACT_TEST_PG_BINDIR")
    if override:
        if not all(os.access(os.path.join(override, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            raise ServerError(f"ROBUSTACT_TEST_PG_BINDIR={override} has no initdb and pg_ctl")
        return Path(override)

    def version(p: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([0-9.]+)/bin", p)
        return tuple(int(x) for x in m.group(1).split(".") if x) if m else (0,)

    candidates = [
        os.path.dirname(p)
        for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
        if os.access(os.path.join(os.path.dirname(p), "pg_ctl"), os.X_OK)
    ]
    if candidates:
        return Path(max(candidates, key=version))
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    raise ServerError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under "
        "/usr/lib/postgresql/*/bin or on PATH: install the Debian package `postgresql` "
        "(apt-get install -y --no-install-recommends postgresql), or set "
        f"{ENV_POSTGRES_URL} to an existing server."
    )


def _as_postgres_user() -> list[str]:
    """Command prefix that runs the Postgres binaries as a non-root user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if not runuser:
        raise ServerError("running as root but `runuser` (util-linux) is not installed")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root and there is no `postgres` user to run the server as: "
            "install the Debian package `postgresql` (it creates the user)"
        ) from None
    return [runuser, "-u", "postgres", "--"]


def start_postgres(tmpdir: str | os.PathLike | None = None, *, timeout: float = 60.0) -> Server:
    """Start a throw-away PostgreSQL cluster on a free loopback port with a database
    ``robustact``; return ``(url, stop)``.

    ``tmpdir`` holds the cluster when the server user can use it; as root the cluster
    goes into a fresh directory owned by ``postgres`` under the system temp dir (pytest's
    temp dirs are private to root), removed again by ``stop``.
    """
    url = os.environ.get(ENV_POSTGRES_URL)
    if url:
        return Server(url, _noop)

    t0 = time.monotonic()
    bindir = find_postgres_bindir()
    prefix = _as_postgres_user()
    if prefix:
        base = Path(tempfile.mkdtemp(prefix="robustact-pg-"))
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    else:
        base = Path(tempfile.mkdtemp(prefix="robustact-pg-", dir=tmpdir))
    datadir, logfile = base / "data", base / "postgres.log"

    def run(*args: str, check: bool = True, timeout: float = timeout) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, *args],
            cwd=base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    pg_ctl = str(bindir / "pg_ctl")

    def abort(message: str) -> ServerError:
        """Stop whatever may have started, remove the cluster, build the error."""
        if (datadir / "postmaster.pid").exists():
            try:
                run(pg_ctl, "stop", "-D", str(datadir), "-m", "immediate", "-w", check=False)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(base, ignore_errors=True)
        return ServerError(message)

    try:
        run(str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--no-locale", "--no-sync")
    except subprocess.CalledProcessError as e:
        raise abort(f"initdb failed:\n{e.stdout}\n{e.stderr}") from None
    except subprocess.TimeoutExpired:
        raise abort(f"initdb did not finish within {timeout}s") from None

    port = 0
    for _attempt in range(3):
        port = free_port()
        opts = (
            f"-p {port} -k {base} -c listen_addresses={HOST} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        logfile.unlink(missing_ok=True)
        try:
            proc = run(pg_ctl, "start", "-D", str(datadir), "-l", str(logfile), "-w",
                       "-t", str(int(timeout)), "-o", opts, check=False, timeout=timeout + 10)
        except subprocess.TimeoutExpired:
            raise abort(f"pg_ctl start hung:\n{_tail(logfile)}") from None
        if proc.returncode == 0:
            break
        log = _tail(logfile)
        if "already in use" not in log:
            raise abort(f"pg_ctl start failed ({proc.returncode}):\n{proc.stderr}\n{log}")
    else:
        raise abort(f"pg_ctl start failed 3 times, last log:\n{_tail(logfile)}")

    unguard = _guard([
        ["cmd", [*prefix, pg_ctl, "stop", "-D", str(datadir), "-m", "immediate", "-w"], str(base)],
        ["rmtree", str(base)],
    ])

    def _stop() -> None:
        r = run(pg_ctl, "stop", "-D", str(datadir), "-m", "fast", "-w", "-t", "30",
                check=False, timeout=60)
        if r.returncode != 0 and (datadir / "postmaster.pid").exists():
            run(pg_ctl, "stop", "-D", str(datadir), "-m", "immediate", "-w", "-t", "30",
                check=False, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
        unguard()

    stop = _once(_stop)
    try:
        _create_database(port, DATABASE, deadline=time.monotonic() + timeout)
    except BaseException:
        stop()
        raise
    return Server(f"postgresql+psycopg://postgres@{HOST}:{port}/{DATABASE}", stop,
                  time.monotonic() - t0)


def _create_database(port: int, name: str, deadline: float) -> None:
    import psycopg

    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            conn = psycopg.connect(host=HOST, port=port, user="postgres", dbname="postgres",
                                   autocommit=True, connect_timeout=2)
            break
        except psycopg.OperationalError as e:
            last = e
            time.sleep(0.1)
    else:
        raise ServerError(f"Postgres on port {port} did not accept connections: {last}")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')


# --------------------------------------------------------------------------- Redis


def find_redis_server() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if not path:
        raise ServerError(
            "redis-server not found: install the Debian package `redis-server` "
            "(apt-get install -y --no-install-recommends redis-server), or set "
            f"{ENV_REDIS_URL} to an existing server."
        )
    return path


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(tmpdir: str | os.PathLike | None = None, *, timeout: float = 30.0) -> Server:
    """Start ``redis-server`` (a child process, no persistence) on a free loopback port;
    return ``(url "redis://127.0.0.1:PORT/0", stop)``."""
    url = os.environ.get(ENV_REDIS_URL)
    if url:
        return Server(url, _noop)

    t0 = time.monotonic()
    exe = find_redis_server()
    workdir = Path(tempfile.mkdtemp(prefix="robustact-redis-", dir=tmpdir))
    logpath = workdir / "redis.log"
    for _attempt in range(3):
        port = free_port()
        with open(logpath, "wb") as log:
            proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(workdir), "--logfile", ""],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not _redis_ping(port):
            time.sleep(0.05)
        if proc.poll() is None and _redis_ping(port):
            break
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
            raise ServerError(f"redis-server did not answer PING within {timeout}s:\n"
                              f"{_tail(logpath)}")
        if "already in use" not in _tail(logpath):
            shutil.rmtree(workdir, ignore_errors=True)
            raise ServerError(f"redis-server exited with {proc.returncode}:\n{_tail(logpath)}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServerError("redis-server could not bind a free port in 3 attempts")

    unguard = _guard([["kill", proc.pid, "redis-server"], ["rmtree", str(workdir)]])

    def _stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        unguard()

    return Server(f"redis://{HOST}:{port}/0", _once(_stop), time.monotonic() - t0)


# --------------------------------------------------------------------------- S3


def start_s3(*, timeout: float = 30.0) -> Server:
    """Start moto's S3-compatible server in a thread on a free loopback port; return
    ``(endpoint_url "http://127.0.0.1:PORT", stop)``."""
    url = os.environ.get(ENV_S3_ENDPOINT)
    if url:
        return Server(url, _noop)

    t0 = time.monotonic()
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise ServerError(f"moto[server] is not installed (pip install 'moto[server]'): {e}") from None

    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)  # port 0: no race
    server.start()
    _host, port = server.get_host_and_port()
    if not _wait_tcp(port, time.monotonic() + timeout):
        server.stop()
        raise ServerError(f"moto server on port {port} did not accept connections")

    def _stop() -> None:
        server.stop()
        inner = getattr(server, "_server", None)
        if inner is not None:
            inner.server_close()  # release the listening socket now, not at GC

    return Server(f"http://{HOST}:{port}", _once(_stop), time.monotonic() - t0)


def s3_client(endpoint_url: str):
    """A boto3 S3 client for ``endpoint_url`` (path-style, SigV4). Against moto it uses
    fixed dummy credentials unless AWS_ACCESS_KEY_ID is set."""
    import boto3
    from botocore.config import Config

    kwargs = {}
    if not os.environ.get("AWS_ACCESS_KEY_ID") and not os.environ.get(ENV_S3_ENDPOINT):
        kwargs = {"aws_access_key_id": MOTO_ACCESS_KEY, "aws_secret_access_key": MOTO_SECRET_KEY}
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=os.environ.get("AWS_DEFAULT_REGION", S3_REGION),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        **kwargs,
    )


def create_bucket(endpoint_url: str, name: str | None = None, *, prefix: str = "test") -> str:
    """Create a bucket (a fresh unique name unless ``name`` is given); return its name."""
    name = name or f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
    s3_client(endpoint_url).create_bucket(Bucket=name)
    return name


# --------------------------------------------------------------------------- outages


class TcpProxy:
    """A TCP forwarder from a free loopback port to ``(host, port)`` that a test can take
    down: :meth:`cut` closes every forwarded connection and the listening socket (clients
    see resets, then "connection refused", as when the server stops), :meth:`restore`
    listens again on the same port. Point the code under test at :attr:`port` and the
    real server behind it stays untouched (and shared with other tests)."""

    def __init__(self, port: int, host: str = HOST):
        self.target = (host, port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()
        atexit.register(self.close)

    def url(self, url: str) -> str:
        """``url`` with its ``:PORT`` (the target's) replaced by the proxy's."""
        return url.replace(f":{self.target[1]}", f":{self.port}", 1)

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            self._listener = socket.create_server((HOST, self.port))  # SO_REUSEADDR on POSIX
            self._listener.settimeout(0.2)
            threading.Thread(target=self._accept, args=(self._listener,), name="proxy-accept", daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            listener.close()
        for conn in conns:
            _close(conn)

    def close(self) -> None:
        self.cut()

    def outage(self, seconds: float) -> None:
        """Down for ``seconds``, then up again (blocks)."""
        self.cut()
        time.sleep(seconds)
        self.restore()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:  # cut() closed the sockets, or a side went away: the pump ends
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (any more): closing is all there is to do
        pass
    sock.close()
