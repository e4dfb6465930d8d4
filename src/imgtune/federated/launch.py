"""The Flower processes of a federation on this machine: a SuperLink, SuperNodes, and ``flwr run``.

Each party is a separate process in its own process group, started with the executables of the Python
environment imgtune runs in, on loopback or the address given, and stopped (TERM, then KILL) when the
command ends for any reason, Ctrl-C and errors included: no process outlives the command. The Flower App
submitted to the SuperLink is a folder holding only a ``pyproject.toml`` that names imgtune's apps
(``imgtune.federated.apps`` and ``.client``) and carries the coordinator's settings as its run config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FederationError, UsageError
from .coordinator import Settings

log = logging.getLogger(__name__)

APP_NAME = "imgtune-federation"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def executable(name: str) -> str:
    """A Flower executable of this Python environment (the one imgtune was started with)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise UsageError(f"{name} not found beside {sys.executable}: install the federated extra, "
                         "pip install 'imgtune[federated]'")
    return str(path)


def flower_env() -> dict:
    """This environment, with its executables first on PATH: the SuperLink and SuperNodes start Flower's
    own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def write_app(folder: Path, settings: Settings) -> Path:
    """The Flower App folder: a pyproject.toml naming imgtune's ServerApp and ClientApp."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": APP_NAME, "version": "1.0.0", "license": "Apache-2.0",
                    "description": "imgtune federated training (imgtune federate)"},
        "tool": {"flwr": {"app": {"publisher": "imgtune",
                                  "components": {"serverapp": "imgtune.federated.apps:server",
                                                 "clientapp": "imgtune.federated.client:client"},
                                  "config": settings.to_run_config()}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def write_connection(home: Path, address: str, root_certificate: Path | None) -> str:
    """The Flower configuration (``$FLWR_HOME/config.toml``) naming the SuperLink's Control API."""
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    connection: dict = {"address": address}
    if root_certificate is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificate).resolve())
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "imgtune", "imgtune": connection}}))
    return "imgtune"


@dataclass
class Processes:
    """The processes this command started; :meth:`stop` ends each one's whole process group."""

    logs: Path
    env: dict = field(default_factory=lambda: flower_env())
    started: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        path = self.logs / f"{name}.log"
        with open(path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.started.append((name, proc, path))
        log.info("started %s (pid %d), log %s", name, proc.pid, path)
        return proc

    def check_alive(self) -> None:
        for name, proc, path in self.started:
            if proc.poll() is not None:
                raise FederationError(f"{name} stopped (exit code {proc.returncode}) before the federation "
                                      f"finished; its log, {path}, ends with:\n{tail(path)}")

    def stop(self, grace: float = 5.0) -> None:
        for _, proc, _ in reversed(self.started):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc, _ in self.started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the group: the ClientApp/ServerApp children too
            proc.wait()

    def __enter__(self) -> "Processes":
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Security:
    """TLS material; ``None`` everywhere: plain HTTP on loopback (``--insecure``)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_folder(cls, folder: str | None, server: bool = True) -> "Security":
        """The files ``imgtune federate certs`` writes (a site needs only ca.crt)."""
        from .certs import CA, SERVER, SERVER_KEY

        if folder is None:
            return cls()
        paths = [Path(folder) / name for name in ((CA, SERVER, SERVER_KEY) if server else (CA,))]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"--tls {folder}: missing {', '.join(missing)}; make test certificates with "
                             f"imgtune federate certs {folder} (docs/federated.md)")
        return cls(*(p.resolve() for p in paths)) if server else cls(paths[0].resolve())

    def superlink_flags(self) -> list[str]:
        if self.ca is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(self.cert), "--ssl-keyfile", str(self.key)]

    def supernode_flags(self) -> list[str]:
        return ["--insecure"] if self.ca is None else ["--root-certificates", str(self.ca)]


def superlink_argv(host: str, port: int, security: Security) -> list[str]:
    return [executable("flower-superlink"), *security.superlink_flags(), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]


def supernode_argv(superlink: str, port: int, node_config: dict, security: Security) -> list[str]:
    pairs = " ".join(f"{k}={json.dumps(str(v))}" for k, v in node_config.items())
    return [executable("flower-supernode"), *security.supernode_flags(), "--superlink", superlink,
            "--port", str(port), "--node-config", pairs]


def wait_for_port(host: str, port: int, processes: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        processes.check_alive()
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"the SuperLink did not listen on {host}:{port} within {timeout:.0f}s")


def submit(app: Path, home: Path, processes: Processes) -> int:
    """``flwr run`` the app on the SuperLink, following its log until the run ends; returns the run id."""
    env = processes.env | {"FLWR_HOME": str(home)}
    path = processes.logs / "flwr-run.log"
    with open(path, "ab") as out:
        proc = subprocess.Popen([executable("flwr"), "run", str(app), "imgtune", "--stream"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        processes.started.append(("flwr run", proc, path))
        while proc.poll() is None:
            time.sleep(0.5)
            for name, other, log_path in processes.started:
                if name == "superlink" and other.poll() is not None:
                    raise FederationError(f"the SuperLink stopped during the run; its log {log_path} ends "
                                          f"with:\n{tail(log_path)}")
    found = re.search(r"started run (\d+)", path.read_text(errors="replace"))
    if proc.returncode != 0 or found is None:
        raise FederationError(f"flwr run failed (exit code {proc.returncode}); {path} ends with:\n{tail(path)}")
    return int(found.group(1))


def run_status(run_id: int, home: Path, env: dict) -> str:
    """The run's final status as the SuperLink reports it (``finished:completed`` when it succeeded)."""
    out = subprocess.run([executable("flwr"), "ls", "imgtune", "--run-id", str(run_id), "--format", "json"],
                         capture_output=True, text=True, env=env | {"FLWR_HOME": str(home)}, timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return f"unknown ({out.stdout.strip()[-200:]} {out.stderr.strip()[-200:]})"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the command like Ctrl-C, so the ``finally`` that stops every party runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _logs_folder(logs: str | None) -> Path:
    return Path(logs) if logs else Path(tempfile.mkdtemp(prefix="imgtune-federation-"))


def simulate(sites: list[str], settings: Settings, logs: str | None = None, security: Security = Security(),
             node_options: dict | None = None, audit: str | None = None) -> dict:
    """A SuperLink and one SuperNode per site folder on loopback, the run, then every process stopped;
    with ``audit`` (a folder) each site appends what it sends to ``audit/NAME.jsonl``. Returns the run's
    metrics.json."""
    check_before_start(settings)
    names = site_names(sites)
    with _sigterm_as_interrupt(), Processes(_logs_folder(logs)) as procs:
        port = free_port()
        procs.start("superlink", superlink_argv("127.0.0.1", port, security))
        wait_for_port("127.0.0.1", port, procs)
        for name, data in zip(names, sites):
            config = {"data": str(Path(data).resolve()), "name": name, **(node_options or {})}
            if audit:
                Path(audit).mkdir(parents=True, exist_ok=True)
                config["audit"] = str(Path(audit).resolve() / f"{name}.jsonl")
            procs.start(f"site-{name}", supernode_argv(f"127.0.0.1:{port}", free_port(), config, security))
        return _run(settings, f"127.0.0.1:{port}", security, procs)


def serve(settings: Settings, host: str, port: int, logs: str | None = None, security: Security = Security()) -> dict:
    """The coordinator of a federation across machines: a SuperLink on ``host:port`` that the sites'
    SuperNodes join (``imgtune federate site``), and the run; returns the run's metrics.json."""
    check_before_start(settings)
    with _sigterm_as_interrupt(), Processes(_logs_folder(logs)) as procs:
        procs.start("superlink", superlink_argv(host, port, security))
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        wait_for_port(local, port, procs)
        log.info("SuperLink listening on %s:%d; start each site with: imgtune federate site DATA --server "
                 "THIS_HOST:%d", host, port, port)
        return _run(settings, f"{local}:{port}", security, procs)


def join(data: str, server: str, name: str | None = None, audit: str | None = None, logs: str | None = None,
         security: Security = Security(), node_options: dict | None = None) -> int:
    """A site: a SuperNode for ``data`` connected to the SuperLink at ``server``, until the SuperLink ends
    the run or Ctrl-C; it keeps trying to reach the SuperLink (a site that rejoins continues)."""
    from .site import class_names

    class_names(data)  # a missing or empty folder fails here, not in the first round
    config = {"data": str(Path(data).resolve()), "name": name or Path(data).resolve().name, **(node_options or {})}
    if audit:
        config["audit"] = str(Path(audit).resolve())
    with _sigterm_as_interrupt(), Processes(_logs_folder(logs)) as procs:
        proc = procs.start("supernode", supernode_argv(server, free_port(), config, security))
        log.info("site %s joined %s; Ctrl-C to leave", config["name"], server)
        return proc.wait()


def check_before_start(settings: Settings) -> None:
    from ..artifact import check_out_dir
    from .coordinator import check_settings

    check_settings(settings)
    check_out_dir(settings.out, settings.overwrite)


def site_names(sites: list[str]) -> list[str]:
    """Each site's name in the metrics: its folder's name (numbered when two are alike)."""
    from .site import class_names

    names = []
    for data in sites:
        class_names(data)  # a missing folder fails before any process starts
        base = Path(data).resolve().name or "site"
        names.append(base if base not in names else f"{base}-{len(names) + 1}")
    return names


def _run(settings: Settings, control: str, security: Security, procs: Processes) -> dict:
    folder = procs.logs
    home = folder / "flwr-home"
    write_connection(home, control, security.ca)
    app = write_app(folder / "app", settings)
    run_id = submit(app, home, procs)
    status = run_status(run_id, home, procs.env)
    metrics = Path(settings.out) / "metrics.json"
    if not status.endswith("completed") or not metrics.is_file():
        raise FederationError(f"the federation's run {run_id} ended {status}; the coordinator's log "
                              f"({folder / 'flwr-run.log'}) ends with:\n{tail(folder / 'flwr-run.log', 25)}")
    return json.loads(metrics.read_text())
