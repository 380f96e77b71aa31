"""The app as users launch it (``python app.py``), for the tests that drive it: started on a free port, offline,
reached through gradio_client. The server itself is a session fixture (conftest.py), shared by the test modules."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imse.app.ui import START_OUTPUTS

ROOT = Path(__file__).resolve().parent.parent


def output(outputs, name: str):
    """One of /start's outputs by name (an update's value when it comes as an update)."""
    value = outputs[START_OUTPUTS.index(name)]
    return value["value"] if isinstance(value, dict) and "value" in value else value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(root: Path = ROOT, **settings):
    """``python app.py`` of the checkout at ``root`` on a free port (offline, no analytics, fast tab-close
    detection); (process, url)."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    env.update(GRADIO_HEARTBEAT_INTERVAL="1", **{k: str(v) for k, v in settings.items()})
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 150  # a cold start on 2 busy cores: imports, two warm workers, the Teach tab
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"app exited: {process.stdout.read()}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app did not start within 150 s")
    return process, f"http://127.0.0.1:{port}/"


def stop_app(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)
