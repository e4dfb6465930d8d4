"""Running the app under uvicorn: where it may listen, one or several worker processes, and graceful
shutdown.

Loopback by default; any other address needs an API key (or ``--insecure``, which warns). On SIGTERM the
server drains: requests in flight finish, new ones get 503 with ``Retry-After``, ``/readyz`` says
``shutting-down``; once none is left in flight (or after ``DRAIN_TIMEOUT_S``) uvicorn's own shutdown runs.
With ``--workers N`` each worker process loads the model and batches its own requests; the settings reach
the workers through :data:`SETTINGS_ENV` (the API key stays in the variable the user named).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from ..errors import UsageError
from .limits import Limits, ServerState
from .service import ServeOptions

log = logging.getLogger(__name__)

SETTINGS_ENV = "IMGTUNE_SERVE_SETTINGS"
DRAIN_TIMEOUT_S = 30.0
MIN_KEY_CHARS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def api_key_from_env(name: str | None) -> str | None:
    """The key in the environment variable ``name`` (never on the command line, where ``ps`` shows it)."""
    if name is None:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise UsageError(f"--api-key-env {name}: the environment variable {name} is not set or empty; "
                         f"export {name}=A_LONG_RANDOM_KEY (e.g. from `openssl rand -hex 24`)")
    if len(key) < MIN_KEY_CHARS:
        log.warning("the API key in %s has %d characters; use at least %d random ones", name, len(key),
                    MIN_KEY_CHARS)
    return key


def check_address(host: str, key: str | None, insecure: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless the user said ``--insecure``."""
    if is_loopback(host) or key is not None:
        return
    if not insecure:
        raise UsageError(f"--host {host} is reachable from other machines and no API key is set: pass "
                         "--api-key-env NAME (the key in that environment variable), or --insecure to serve "
                         "without one")
    log.warning("serving on %s WITHOUT an API key (--insecure): anyone who can reach it can use it", host)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, engine: str = "auto",
          device: str = "auto", options: ServeOptions = ServeOptions(), api_key_env: str | None = None,
          workers: int = 1, insecure: bool = False, log_level: str = "info") -> None:
    """Serve ``run`` until SIGTERM or SIGINT; the key, if any, is read from the environment variable
    ``api_key_env``. The model is loaded before the port is bound, so a bad run folder is an error at once."""
    import uvicorn

    key = api_key_from_env(api_key_env)
    check_address(host, key, insecure)
    listening = bind(host, port)  # before the model loads: a port in use is an error at once
    settings = {"run": str(run), "engine": engine, "device": device, "options": _options_dict(options),
                "api_key_env": api_key_env}
    try:
        app = app_from_settings(settings, key)  # with several workers, this checks the run before they start
    except BaseException:
        listening.close()
        raise
    common = dict(host=host, port=port, log_config=None, log_level=log_level, timeout_graceful_shutdown=5,
                  server_header=False)
    if workers > 1:
        del app
        os.environ[SETTINGS_ENV] = json.dumps(settings)
        config = uvicorn.Config("imgtune.serve.server:app_from_env", factory=True, workers=workers, **common)
        from uvicorn.supervisors import Multiprocess

        # as uvicorn.run does, on the socket bound here; uvicorn before 0.50 (which Flower's pins keep) also
        # wants the function each worker runs
        target = {"target": uvicorn.Server(config).run} \
            if "target" in inspect.signature(Multiprocess).parameters else {}
        Multiprocess(config, sockets=[listening], **target).run()
        return
    log.info("serving %s on http://%s:%d (engine %s)", run, host, port, engine)
    uvicorn.Server(uvicorn.Config(app, **common)).run(sockets=[listening])


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, or a UsageError that says what to do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (with proto 0, Nagle's
    # algorithm and delayed ACKs add about 40 ms to every answer)
    listening = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as exc:
        listening.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program uses the port, "
                         "or the address is not this machine's; choose another --port or --host") from exc
    listening.set_inheritable(True)
    return listening


def _options_dict(options: ServeOptions) -> dict:
    values = dataclasses.asdict(options)
    values["api_key"] = None  # never into the environment of the workers; see api_key_env
    return values


def app_from_settings(settings: dict, api_key: str | None = None):
    from ..ort_predict import open_predictor
    from .app import create_app
    from .service import Service

    values = dict(settings["options"])
    values["limits"] = Limits(**values["limits"])
    options = ServeOptions(**{**values, "api_key": api_key or values.get("api_key")})
    predictor = open_predictor(settings["run"], settings["engine"], settings["device"])
    return create_app(Service(predictor, options))


def app_from_env():
    """The app of one worker process (``--workers N``), from :data:`SETTINGS_ENV`."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    return app_from_settings(settings, api_key_from_env(settings.get("api_key_env")))


def drain_on_sigterm(state: ServerState, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Called when the app starts, inside uvicorn's server: SIGTERM first drains (see the module's
    docstring), then hands over to the handler uvicorn installed. Only the main thread may handle
    signals: elsewhere (a test client) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return
    loop = asyncio.get_running_loop()

    def handler(signum, frame):
        if state.draining:  # a second SIGTERM: stop now
            previous(signum, frame)
            return
        state.draining = True
        log.info("SIGTERM: finishing %d request(s) in flight; new ones get 503", state.in_flight)
        loop.call_soon_threadsafe(lambda: loop.create_task(_hand_over(state, timeout_s, previous, signum)))

    signal.signal(signal.SIGTERM, handler)


async def _hand_over(state: ServerState, timeout_s: float, previous, signum: int) -> None:
    deadline = time.monotonic() + timeout_s
    while state.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if state.in_flight:
        log.warning("%d request(s) still in flight after %.0f s; stopping anyway", state.in_flight, timeout_s)
    previous(signum, None)
