"""A real S3 API server on 127.0.0.1 for tests: moto in server mode, with fake credentials in the environment.

Clients (s3fs, boto3, awscli, our subprocesses) reach it through `AWS_ENDPOINT_URL`, exactly as they would reach
a MinIO or any S3-compatible endpoint; nothing in the code under test knows it is talking to moto.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_bucket_numbers = itertools.count()


@dataclass
class S3Server:
    """A running server: its endpoint and a client to set up and inspect buckets."""

    endpoint: str
    client: object  # boto3 S3 client

    def new_bucket(self, prefix: str = "test") -> str:
        """Create an empty bucket with a name no other test uses; returns the name."""
        name = f"{prefix}-{os.getpid()}-{next(_bucket_numbers)}"
        self.client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """{key: bytes} of every object under `prefix` (listing through the API, as a reader would)."""
        out: dict[str, bytes] = {}
        paginator = self.client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                body = self.client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()  # type: ignore[attr-defined]
                out[obj["Key"]] = body
        return out

    def multipart_uploads(self, bucket: str) -> list[str]:
        """Keys of multipart uploads started but neither completed nor aborted."""
        resp = self.client.list_multipart_uploads(Bucket=bucket)  # type: ignore[attr-defined]
        return [u["Key"] for u in resp.get("Uploads", [])]


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on a free loopback port, point the AWS environment at it, stop it afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*FAKE_ENV, "AWS_ENDPOINT_URL", "AWS_PROFILE")}
    os.environ.update(FAKE_ENV, AWS_ENDPOINT_URL=endpoint)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield S3Server(endpoint, boto3.client("s3", endpoint_url=endpoint))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
