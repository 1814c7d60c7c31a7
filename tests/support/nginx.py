"""A real nginx load balancer on 127.0.0.1 in front of `timerd api` replicas.

`Nginx(tmp_path, ["127.0.0.1:8081", ...])` writes its own configuration into `tmp_path/nginx`
and runs `nginx -p <dir> -c nginx.conf -g 'daemon off;'` as a child of the test (never the
system service): pid file, temp directories and the access log live in that directory, and
its error log (`error_log stderr`) goes to `nginx.stderr` there. The upstream is round robin
over the backends with keep-alive connections; every answer carries `X-Upstream: <the backend
that served it>`, so a test can count what each replica served. `with Nginx(...) as lb:`
returns once `GET /healthz` answers through it (bounded) and stops nginx on leaving the block.

`nginx_binary()` is None when nginx is not installed (`scripts/test` installs it when it can);
tests then skip with `NGINX_MISSING` as the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.procs import HOST, free_port, wait_healthy

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_BIND_ATTEMPTS = 3  # another process may take the free port before nginx binds it
UPSTREAM_HEADER = "x-upstream"

# Debian and Ubuntu put nginx in /usr/sbin, which a non-root PATH often lacks.
_SBIN = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
NGINX_MISSING = (
    "nginx is not installed: `bash scripts/test` installs it when run as root with apt-get;"
    " otherwise install nginx to run the load-balanced tests"
)

CONF = """\
# Written by tests/support/nginx.py for one test; every path is inside {prefix}.
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    log_format upstreams '$msec $request_method $uri $status $upstream_addr';
    access_log {prefix}/access.log upstreams;

    upstream timerd_api {{
        # round robin (the default); a replica that refuses connections is set aside briefly
{servers}
        keepalive 32;
        keepalive_timeout 4s;  # below uvicorn's 5 s, so nginx never reuses a closing socket
    }}

    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://timerd_api;
            proxy_http_version 1.1;  # with the empty Connection header: upstream keep-alive
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_connect_timeout 2s;
            proxy_read_timeout 10s;
            # Try the next replica when one cannot be reached or times out. A POST that was
            # already sent is not re-sent (no `non_idempotent`): the replica may have stored it.
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 5s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """The nginx executable, or None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((path for path in _SBIN if os.access(path, os.X_OK)), None)


class Nginx:
    """One nginx master process (and its worker) balancing over `backends` (`host:port`)."""

    def __init__(self, tmp_path: Path, backends: Sequence[str]) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError(NGINX_MISSING)
        self.binary = binary
        self.backends = list(backends)
        self.prefix = tmp_path / "nginx"
        self.port = 0
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start nginx on a free port and return once it answers `GET /healthz`."""
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        for _ in range(_BIND_ATTEMPTS):
            self._spawn()
            try:
                self._wait_ready()
            except AssertionError:
                if self.running() or "address already in use" not in self.stderr().lower():
                    self.stop()
                    raise
                continue
            return
        raise AssertionError(self.describe(f"could not bind a free port in {_BIND_ATTEMPTS} tries"))

    def _spawn(self) -> None:
        self.port = free_port()
        # As root, nginx would run its worker as `nobody`, which cannot enter pytest's tmp_path.
        user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
        servers = "\n".join(
            f"        server {b} max_fails=1 fail_timeout=2s;" for b in self.backends
        )
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            CONF.format(prefix=self.prefix, user=user, servers=servers, host=HOST, port=self.port)
        )
        with (self.prefix / "nginx.stderr").open("wb") as sink:
            # -e: where errors go before the configuration is read (not /var/log/nginx)
            argv = [self.binary, "-p", str(self.prefix), "-e", "stderr", "-c", str(conf)]
            self.popen = subprocess.Popen(
                [*argv, "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def _wait_ready(self) -> None:
        assert self.popen is not None
        wait_healthy(self.base_url, self.popen, self.describe, READY_TIMEOUT_S)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        """Fast shutdown (SIGTERM) of the master and its worker; SIGKILL if it hangs."""
        if self.popen is None:
            return
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT_S)
            raise AssertionError(self.describe("did not stop on SIGTERM")) from None

    def stderr(self) -> str:
        """Everything nginx wrote to stderr: its error log."""
        path = self.prefix / "nginx.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def describe(self, what: str) -> str:
        pid = self.popen.pid if self.popen else None
        return f"nginx (pid {pid}, port {self.port}) {what}; output:\n{self.stderr()}"
