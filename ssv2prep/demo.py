"""`ssv2prep demo`: the main job on built-in synthetic data, through the real code paths.

synth --package -> serve the package on a loopback HTTP server -> download -> extract -> shard -> verify.
(Training and evaluation join the demo once those stages exist.)
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ssv2prep.prep.download import DownloadConfig, download_manifest
from ssv2prep.prep.extract import extract_dataset
from ssv2prep.prep.manifest import load_manifest
from ssv2prep.prep.prepare import ShardConfig, shard_dataset
from ssv2prep.prep.synth import SynthConfig, synthesize
from ssv2prep.prep.verify import verify_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Sizes of the demo (defaults: the full demo; tests pass smaller ones)."""

    synth: SynthConfig = field(
        default_factory=lambda: SynthConfig(
            num_pairs=3,
            train_per_class=40,
            validation_per_class=10,
            test_per_class=10,
            height=96,
            package=True,
            num_parts=3,
            min_frames=16,
            max_frames=32,
        )
    )
    videos_per_shard: int = 40
    workers: int = 0


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve `folder` read-only on 127.0.0.1 (a free port) from a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def run_demo(out_dir: str | Path, cfg: DemoConfig, *, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage into `out_dir` and return a summary of what each produced."""
    out = Path(out_dir)
    step = on_step or (lambda _msg: None)
    step("synth: encoding the synthetic dataset and packaging it like the real distribution")
    synth = synthesize(out / "synth", cfg.synth)
    assert synth.manifest_path is not None and synth.package_dir is not None
    manifest = load_manifest(synth.manifest_path)
    with serve_folder(synth.package_dir) as url:
        step(f"download: {len(manifest.files)} files from {url}")
        downloads = download_manifest(manifest, DownloadConfig(dest=out / "download", base_url=url, backoff_s=0.1))
    step("extract: joining the parts as a stream and untarring")
    extracted = extract_dataset(out / "download", out / "data")
    step("shard: decoding videos into JPEG shards")
    sharded = shard_dataset(
        ShardConfig(
            videos_dir=extracted.videos_dir,
            labels_dir=extracted.labels_dir,
            out_dir=out / "shards",
            videos_per_shard=cfg.videos_per_shard,
            workers=cfg.workers,
        )
    )
    step("verify: re-reading every shard")
    report = verify_folder(out / "shards")
    return {
        "downloaded": {r.name: r.status.name for r in downloads},
        "extracted": {"layout": extracted.layout, "written": extracted.written, "skipped": extracted.skipped},
        "splits": {
            k: {"ok": s.ok, "failed": s.failed, "missing": s.missing, "shards": s.num_shards}
            for k, s in sharded.summaries.items()
        },
        "verify_problems": report.problems,
        "shards_dir": str(out / "shards"),
    }
