"""A throwaway PostgreSQL server for the tests (Debian's package; installed here when missing and we may).

``PgServer.start()`` finds Debian's server binaries (``/usr/lib/postgresql/<version>/bin``). When they are missing,
and this process is root on a machine with ``apt-get`` (CI: a fresh machine), it installs the ``postgresql``
package first. It then makes a cluster in a fresh temporary directory (``initdb``, trust auth, fsync off), run as
the ``postgres`` system user when we are root (``initdb`` refuses root), and starts it on a free localhost TCP port
with its unix socket in that directory. ``new_database()`` returns an SQLAlchemy URL of a fresh, empty database;
``stop()`` stops the server (``pg_ctl stop -m fast``) and removes the directory.

``Unavailable`` says why no server can be had here (the caller skips); any other error is a real failure.
Set ``NOFLASH_TUNE_NO_POSTGRES=1`` to skip the PostgreSQL tests on purpose.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_USER = "postgres"
APT_INSTALL = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
               "-o DPkg::Lock::Timeout=300 --no-install-recommends postgresql")


class Unavailable(Exception):
    """No PostgreSQL server can be had on this machine (the reason is the message)."""


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL server bin dir that has initdb and pg_ctl, or None."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        version = bindir.parent.name
        if (bindir / "pg_ctl").exists() and version.replace(".", "").isdigit():
            found.append((tuple(int(x) for x in version.split(".")), bindir))
    return max(found)[1] if found else None


def install() -> Path:
    """Install Debian's ``postgresql`` package (root and apt-get only); returns its bin dir."""
    if os.geteuid() != 0:
        raise Unavailable("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin) and not root, so they "
                          "cannot be installed here: `sudo apt-get install postgresql` to run these tests")
    if shutil.which("apt-get") is None:
        raise Unavailable("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin) and no apt-get to "
                          "install them with")
    proc = subprocess.run(["sh", "-c", APT_INSTALL], capture_output=True, text=True, timeout=900)
    bindir = find_bindir()
    if proc.returncode != 0 or bindir is None:
        # Root with apt-get (as CI is) and still no server: a real failure, not a skip.
        raise RuntimeError(f"installing PostgreSQL failed (exit {proc.returncode}): {APT_INSTALL}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return bindir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self):
        self.bindir: Path | None = None
        self.root: Path | None = None
        self.port: int | None = None
        self.running = False
        self._names = itertools.count()

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _as_owner(self, *cmd) -> subprocess.CompletedProcess:
        """Run a server binary as the cluster's owner: ``postgres`` when we are root, else ourselves."""
        argv = [str(self.bindir / cmd[0]), *map(str, cmd[1:])]
        if os.geteuid() == 0:
            argv = (["runuser", "-u", PG_USER, "--", *argv] if shutil.which("runuser") else
                    ["su", PG_USER, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)])
        # cwd: a directory the owner can enter (initdb complains about one it cannot).
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=str(self.root))

    def start(self) -> "PgServer":
        if os.environ.get("NOFLASH_TUNE_NO_POSTGRES") == "1":
            raise Unavailable("NOFLASH_TUNE_NO_POSTGRES=1")
        try:
            import psycopg2  # noqa: F401 - the driver SQLAlchemy needs for postgresql+psycopg2://
        except ImportError:
            raise Unavailable("psycopg2 is not installed (pip install -e '.[test]')") from None
        self.bindir = find_bindir() or install()
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(PG_USER)
            except KeyError:
                raise RuntimeError(f"PostgreSQL is installed but there is no {PG_USER!r} user to run it as "
                                   "(initdb refuses root)") from None
        self.root = Path(tempfile.mkdtemp(prefix="noflash-pg-"))
        if os.geteuid() == 0:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        os.chmod(self.root, 0o700)
        res = self._as_owner("initdb", "-D", self.data, "-U", PG_USER, "-A", "trust", "-E", "UTF8",
                             "--locale=C", "--no-sync")
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        for _ in range(5):  # a free port can be taken between our probe and the server's bind: try another
            self.port = free_port()
            opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            res = self._as_owner("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o", opts, "start")
            if res.returncode == 0:
                self.running = True
                return self
            self._as_owner("pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        log_tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        self.stop()
        raise RuntimeError(f"pg_ctl start failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{log_tail}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "noflash") -> str:
        """A fresh empty database; returns its SQLAlchemy URL."""
        import psycopg2

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.running:
            self._as_owner("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
            self.running = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
