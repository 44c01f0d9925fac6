"""Shared pytest set-up: tests/ on sys.path (so helpers import by name) and session-wide generated data."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one test process per core (pytest-xdist): one compute thread each, and in the commands they
    # start, so that two torch thread pools do not spin against each other on the same cores (set before torch loads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from fixtures import TINY, make_shards, make_synth

from ssv2prep.prep.shard import WriterSettings


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic SSv2 (4 classes in 2 mirror pairs, 20 videos at 48 px). Read-only: copy before changing."""
    return make_synth(tmp_path_factory.mktemp("synth-tiny"), TINY)


@pytest.fixture(scope="session")
def tiny_shards(synth_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards (train/validation/test) of `synth_tiny`, 3 videos per shard. Read-only."""
    return make_shards(synth_tiny.videos_dir, synth_tiny.labels_dir, tmp_path_factory.mktemp("shards-tiny"))


@pytest.fixture(scope="session")
def tiny_video_shards(synth_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Validation shards of `synth_tiny` in `--format video` (the webm bytes), 3 videos per shard. Read-only."""
    return make_shards(
        synth_tiny.videos_dir,
        synth_tiny.labels_dir,
        tmp_path_factory.mktemp("shards-tiny-video"),
        splits=("validation",),
        writer=WriterSettings(format="video"),
    )


@pytest.fixture(scope="session")
def s3():
    """A real S3 API server (moto, server mode) on 127.0.0.1; AWS_* variables point at it for the session."""
    from s3server import s3_server

    with s3_server() as server:
        yield server
