"""The real servers in front of and beside a fleet of gateways, for the tests: Redis (shared rate
limits), nginx (the load balancer) and a PostgreSQL of a test's own (to stop mid-traffic), from
Debian's packages, on 127.0.0.1."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import httpx
import redis

from .gateway_server import free_port, stop_group, wait_until_up


class RedisServer:
    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: apt-get install redis-server (.ci/install-servers)"
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "redis.log"
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.folder)],
                                        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_up(lambda: redis.Redis.from_url(self.url).ping(), self.process, "redis-server", log)
        return self

    def stop(self) -> None:
        stop_group(self.process)


class Nginx:
    """Round robin over the gateways; a connection refused goes to the next one, as load balancers do.
    Each answer says which gateway gave it (``X-Upstream``)."""

    def __init__(self, folder: Path, upstreams: list[str]):
        self.folder, self.upstreams, self.port = folder, upstreams, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def _config(self) -> str:
        servers = "".join(f"    server {u} max_fails=1 fail_timeout=5s;\n" for u in self.upstreams)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the test's private folder
        return f"""{user}worker_processes 1;
pid {self.folder}/nginx.pid;
error_log {self.folder}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {self.folder}/body;
  proxy_temp_path {self.folder}/proxy;
  upstream gateways {{
{servers}  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_buffering off;
      proxy_read_timeout 300s;
      proxy_next_upstream error timeout;
      add_header X-Upstream $upstream_addr always;
    }}
  }}
}}
"""

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        assert Path(binary).exists(), "nginx is missing: apt-get install nginx (.ci/install-servers)"
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "nginx.conf").write_text(self._config())
        log = self.folder / "error.log"
        log.touch()
        self.process = subprocess.Popen([binary, "-p", str(self.folder), "-c", str(self.folder / "nginx.conf"),
                                         "-g", "daemon off;"], stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_until_up(lambda: httpx.get(f"{self.url}/health", timeout=2).status_code < 500, self.process, "nginx", log)
        return self

    def stop(self) -> None:
        stop_group(self.process, signal.SIGQUIT)  # nginx's graceful stop


class PostgresServer:
    """A PostgreSQL server of its own (Debian's binaries, as ``.ci/start-postgres`` runs them), which a
    test may stop and start again on the same data."""

    def __init__(self):
        # Not under pytest's 0700 temporary folders: the server runs as the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="loragate-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))[-1])
        self.frozen = False

    def _run(self, tool: str, *args: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        data = self.folder / "data"
        if not data.is_dir():
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres")
            self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.folder / "log"), "-w", "-o",
                  f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    def _processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...)."""
        postmaster = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        children = [int(p.name) for p in Path("/proc").iterdir()
                    if p.name.isdigit() and _parent_pid(p) == postmaster]
        return [postmaster, *children]

    def freeze(self) -> None:
        """A server that hangs: connections stay open, the kernel acknowledges what is sent, nothing
        answers (a stalled host or disk), which no timeout on the client's socket can tell."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)
        self.frozen = False

    def remove(self) -> None:
        if self.frozen:
            self.thaw()
        if (self.folder / "data" / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _parent_pid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None  # gone meanwhile
