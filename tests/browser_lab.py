"""Helpers for tests/test_browser.py: a throwaway JupyterLab server and a headless Debian Chromium.

Nothing is downloaded: Chromium is the system's /usr/bin/chromium (apt package `chromium`,
installed by .ci/run when missing) driven by the `playwright` package through
`executable_path`; JupyterLab is the one installed with the dev extras.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running JupyterLab: its base URL, token and a JSON view of its REST API."""

    def __init__(self, url: str, token: str, process: subprocess.Popen, log: Path):
        self.url, self.token, self.process, self.log = url, token, process, log

    def api(self, path: str):
        request = urllib.request.Request(f"{self.url}/api/{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def kernels(self) -> list[dict]:
        return self.api("kernels")

    def wait_for_connected_idle_kernel(self, timeout: float) -> dict:
        """JupyterLab shows "idle" before the browser's websocket is up: wait for the server's word.

        A kernel is ready for Run All when the server counts a connection to it and reports it idle.
        """
        deadline = time.monotonic() + timeout
        kernels = []
        while time.monotonic() < deadline:
            try:
                kernels = self.kernels()
            except urllib.error.HTTPError as error:
                # jupyter_server answers 500 when asked while a kernel is still starting (its
                # last_activity is not set yet): not ready, ask again
                if error.code != 500:
                    raise
                kernels = []
            if len(kernels) == 1 and kernels[0]["connections"] >= 1 and kernels[0]["execution_state"] == "idle":
                return kernels[0]
            time.sleep(0.5)
        raise AssertionError(f"no connected idle kernel after {timeout} s: {kernels}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "JupyterLab log:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def jupyter_lab(root: Path, workdir: Path, timeout: float = 90):
    """Start `jupyter lab` serving `root` with its own config, data and runtime folders; stop it after."""
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env["LONGNET_REF_LIVE_WIDGETS"] = "1"  # a browser is attached: live widgets even under SMOKE (widgets.live_widgets)
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        folder = workdir / name.lower()
        folder.mkdir(exist_ok=True)
        env[name] = str(folder)
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(workdir / "workspaces")
    # No "would you like news?" toast over the notebook, no update check (no network use).
    settings = Path(env["JUPYTER_CONFIG_DIR"]) / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    quiet = {"fetchNews": "false", "checkForUpdates": False}
    (settings / "notification.jupyterlab-settings").write_text(json.dumps(quiet))
    log = workdir / "jupyterlab.log"
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",  # CI runs as root
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands by name
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--ServerApp.terminals_enabled=False",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    lab = Lab(f"http://127.0.0.1:{port}", token, process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {process.returncode}\n{lab.log_tail()}")
            try:
                lab.api("status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"jupyter lab not up after {timeout} s\n{lab.log_tail()}") from None
                time.sleep(0.5)
        yield lab
    finally:
        process.terminate()  # the process this helper started, by its handle
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
