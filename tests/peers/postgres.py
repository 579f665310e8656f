"""A throwaway PostgreSQL server on 127.0.0.1 for the tests: the distribution's own binaries
(``initdb``/``postgres`` on the PATH or under /usr/lib/postgresql), a fresh data folder, a free port.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the ``postgres``
system user (``runuser``), which owns the temporary data folder.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.peers.servers import PeerUnavailable, free_port


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if not found:
        raise PeerUnavailable(f"{name} not found: apt-get install postgresql")
    return found


class PostgresServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="chartsight-postgres-"))
        self.data = self.tmp / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.tmp, "postgres")
            os.chmod(self.tmp, 0o700)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PeerUnavailable(f"{cmd[0]} failed: {done.stderr[-2000:]}")

    def start(self, timeout: float = 60.0) -> None:
        self._run(
            _binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"
        )
        self.resume(timeout)

    def pause(self, mode: str = "fast") -> None:
        """Shut the server down, keeping its data folder and port for ``resume``: ``fast``
        (SIGINT: connections are cut, transactions in flight rolled back) or ``immediate``
        (SIGQUIT: no shutdown checkpoint; crash recovery on the next start)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode])
        self.proc.wait(30)

    def resume(self, timeout: float = 60.0) -> None:
        """Start the server on its data folder and port; returns once it accepts connections."""
        log = self.tmp / "server.log"
        cmd = [
            *self.as_user,
            _binary("postgres"),
            "-D", str(self.data),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.tmp),
            "-c", "fsync=off",
            "-c", "max_connections=50",
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"postgres exited: {log.read_text()[-2000:]}")
            try:
                psycopg.connect(self.url(driver="postgresql"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.2)
        self.stop()
        raise PeerUnavailable(f"postgres not ready after {timeout:g} s: {log.read_text()[-2000:]}")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(driver="postgresql"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
