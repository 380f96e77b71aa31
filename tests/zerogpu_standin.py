"""A stand-in for the ZeroGPU device API, on 127.0.0.1, for driving the real ``spaces`` package on a CPU machine.

The `spaces` client (``spaces/zero/api.py``, 0.51.3) calls four endpoints; this answers them as the Hub's scheduler
does, from its documented shapes:

- ``POST /startup-report`` → 200;
- ``POST /schedule?durationSeconds=N&...`` → 200 with ``ScheduleResponse`` JSON (idle, nvidiaIndex, nvidiaUUID,
  allowToken) while the visitor's quota covers ``N``; else 429 with ``QuotaInfos`` JSON (``left``, ``wait``) and
  the ``X-Approve-Result`` header: ``illegal-duration`` (``wait`` < 0) for a request above the largest allowed,
  ``quota-exceeded`` for one above what is left;
- ``POST /allow`` and ``POST /release`` → 200.

It records every call, so a test can read what was requested. The GPU itself is the part no stand-in can provide:
the launcher (``run_app``) replaces ``spaces.zero.torch.init`` / ``move`` (a ``.cuda()`` call and a
``torch.cuda.synchronize()``) and points the app's GPU calls at the CPU (``imse.app.zerogpu.GPU_DEVICE``).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

__all__ = ["DeviceAPI", "LAUNCHER"]


class DeviceAPI:
    """The scheduler: ``quota`` seconds for the visitor, ``largest`` seconds at most per request."""

    def __init__(self, quota: float = 120.0, largest: float = 120.0) -> None:
        self.quota, self.largest = quota, largest
        self.calls: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._tokens = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                params = {key: values[0] for key, values in parse_qs(url.query).items()}
                with api._lock:
                    api.calls.append((url.path, params))
                    status, headers, body = api.answer(url.path, params)
                payload = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for key, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, params: dict) -> tuple[int, dict, dict | None]:
        if path != "/schedule":
            return 200, {}, None
        requested = float(params.get("durationSeconds", 60))
        if requested > self.largest:
            return 429, {"X-Approve-Result": "illegal-duration"}, {"left": int(self.quota), "wait": -1}
        if requested > self.quota:
            return 429, {"X-Approve-Result": "quota-exceeded"}, {"left": int(self.quota), "wait": 3600}
        self.quota -= requested  # the real scheduler charges the time used; the request is a fair upper bound here
        self._tokens += 1
        body = {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-stand-in", "allowToken": f"token-{self._tokens}"}
        return 200, {"X-Approve-Result": "approved"}, body

    def requested(self) -> list[float]:
        """The durations the app asked for, in order."""
        return [float(p["durationSeconds"]) for path, p in self.calls if path == "/schedule"]

    def __enter__(self) -> DeviceAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# Run app.py as a ZeroGPU Space would, with the two CUDA-only steps of the worker's start replaced (see above).
LAUNCHER = """
import runpy, sys
import spaces.zero.torch as zero_torch
zero_torch.init = lambda nvidia_uuid: None
zero_torch.move = lambda callback=None: None
import imse.app.zerogpu as zerogpu
zerogpu.GPU_DEVICE = "cpu"
sys.argv = ["app.py"]
runpy.run_path("app.py", run_name="__main__")
"""
