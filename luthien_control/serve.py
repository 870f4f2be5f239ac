"""``luthien-control serve``: prepare the database, announce demo mode, run uvicorn."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import uvicorn

from luthien_control.exceptions import ConfigurationError
from luthien_control.settings import DEFAULT_HOST, DEFAULT_PORT, Settings, load_settings

DEMO_KEY_NAME = "demo"
DEMO_MODEL = "gpt-4o-mini"


def log_config(level: str) -> dict[str, Any]:
    """Logging for the proxy and uvicorn, the same in every worker process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "luthien_control": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def start_mock_backend() -> tuple[subprocess.Popen[bytes], str]:
    """Start the built-in mock backend on a free loopback port; wait until it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "luthien_control.mock_backend", "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigurationError("the built-in mock backend did not start")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return process, f"{url}/v1"
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise ConfigurationError("the built-in mock backend did not answer within 20 seconds")


async def _prepare_database(settings: Settings, demo_key: str | None) -> None:
    """Make sure the schema is current, then store the demo key (if any).

    A database already at ``SCHEMA_REVISION`` costs one query. Otherwise the upgrade runs
    in a child process, ``python -m luthien_control.db.init_db``: Alembic (some 12 MB)
    is then never loaded into this process, which goes on to serve requests.
    """
    from luthien_control.db.engine import create_engine
    from luthien_control.db.init_db import SCHEMA_REVISION, current_revision
    from luthien_control.db.keys import replace_key

    engine = create_engine(settings.database_url)
    try:
        if await current_revision(engine) != SCHEMA_REVISION:
            await engine.dispose()  # hold no connection while the child migrates
            await _upgrade_in_child_process(settings.database_url)
        if demo_key is not None:
            await replace_key(engine, DEMO_KEY_NAME, demo_key)
    finally:
        await engine.dispose()


async def _upgrade_in_child_process(database_url: str) -> None:
    """Run ``python -m luthien_control.db.init_db`` on ``database_url``, in this process's
    environment and working directory; its error becomes a ``ConfigurationError``."""
    from luthien_control.db.init_db import PROG

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "luthien_control.db.init_db",
        env={**os.environ, "DATABASE_URL": database_url},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # "database ready: ...": serve has never printed it
        stderr=subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    if process.returncode == 0:
        return
    lines = stderr.decode(errors="replace").splitlines()
    prefix = f"{PROG}: error: "
    for line in reversed(lines):
        if line.startswith(prefix):
            raise ConfigurationError(line.removeprefix(prefix))
    sys.stderr.write("".join(f"{line}\n" for line in lines))  # a traceback: show it
    raise ConfigurationError(
        f"the database schema upgrade failed (exit status {process.returncode})"
    )


def demo_banner(proxy_url: str, backend_url: str, key: str) -> str:
    body = f'{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    sdk = (
        f'python -c "from openai import OpenAI; '
        f"c = OpenAI(base_url='{proxy_url}/v1', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{DEMO_MODEL}', "
        f"messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\""
    )
    return f"""
======================================================================
 Luthien Control is running in DEMO MODE
 No BACKEND_URL or OPENAI_API_KEY is set, so requests are answered by
 the built-in mock backend at {backend_url}.
 Set BACKEND_URL (and OPENAI_API_KEY) to proxy a real backend.

 Client API key: {key}

 Try it with curl:
   curl -N {proxy_url}/v1/chat/completions \\
     -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
     -d '{body}'

 Or with the OpenAI SDK (pip install openai):
   {sdk}
======================================================================
"""


class _Terminated(Exception):
    """SIGTERM arrived after uvicorn's graceful shutdown."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def serve(host: str | None = None, port: int | None = None, workers: int = 1) -> int:
    """Run the proxy until interrupted. Returns the exit status."""
    settings = load_settings()
    from luthien_control.upstream.connect import check_network

    check_network(settings.network)  # a TLS file or proxy URL that cannot be used: now
    host = host or DEFAULT_HOST
    port = DEFAULT_PORT if port is None else port
    if workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    if settings.policy_filepath is not None:
        from luthien_control.policies.loader import load_policy_file

        load_policy_file(settings.policy_filepath)  # fail now, with the path, not per worker
    mock: subprocess.Popen[bytes] | None = None
    demo_key: str | None = None
    metrics_dir: str | None = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="luthien-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # workers add up their metrics
    try:
        if settings.demo_mode:
            from luthien_control.db.keys import generate_key

            mock, backend_url = start_mock_backend()
            os.environ["BACKEND_URL"] = backend_url
            demo_key = settings.test_client_api_key or generate_key()
        asyncio.run(_prepare_database(settings, demo_key))
        if demo_key is not None:
            print(
                demo_banner(f"http://{host}:{port}", os.environ["BACKEND_URL"], demo_key),
                flush=True,
            )
        # uvicorn shuts down gracefully on SIGTERM and then raises the signal again; this
        # handler turns that into a clean exit, so the mock backend is stopped as well.
        signal.signal(signal.SIGTERM, _terminated)
        uvicorn.run(
            "luthien_control.server:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop",
            # httptools, with head timeouts and the connection cap (protocol.py)
            http="luthien_control.protocol:ProxyProtocol",
            lifespan="on",
            access_log=False,
            log_config=log_config(settings.log_level),
            # Then what still runs is cut, each stream with its error event (relay.py).
            timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        )
    except _Terminated:
        pass
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if mock is not None:
            mock.terminate()
            mock.wait(timeout=10)
    return 0
