"""Reading sample ranges of a shard: samples outside the range are passed over by tar header, never kept."""

from __future__ import annotations

import io
import sys
import tarfile
import time
from pathlib import Path

import pytest
from fixtures import make_shards
from httpserver import FaultyServer

from ssv2prep.data.source import iter_samples, read_samples, resolve_source
from ssv2prep.errors import ShardError


@pytest.fixture(scope="module")
def shard(synth_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One frames-format train shard holding all 12 tiny train videos. Read-only."""
    out = tmp_path_factory.mktemp("source-shards")
    make_shards(synth_tiny.videos_dir, synth_tiny.labels_dir, out, videos_per_shard=12, splits=("train",))
    return out / "ssv2-train-000000.tar"


class CountingStream(io.BytesIO):
    """An in-memory stream that counts the bytes `read` returns (seeks are free) and can refuse to seek."""

    def __init__(self, data: bytes, *, seekable: bool) -> None:
        super().__init__(data)
        self.bytes_read = 0
        self._can_seek = seekable

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def seekable(self) -> bool:
        return self._can_seek


def _layout(path: Path) -> list[tuple[str, int]]:
    """(sample key, padded data bytes) of every member in order, read with tarfile (independent of our reader)."""
    with tarfile.open(path) as tar:
        return [(m.name.split(".", 1)[0], m.size + (-m.size % 512)) for m in tar.getmembers()]


def _members(path: Path) -> list[tuple[str, int]]:
    with tarfile.open(path) as tar:
        return [(m.name.split(".", 1)[0], m.size) for m in tar.getmembers()]


@pytest.mark.parametrize(("start", "stop"), [(0, None), (0, 1), (3, 7), (11, None), (11, 12), (5, 5), (12, None)])
def test_a_range_is_the_slice_of_the_whole_shard_from_any_opener(shard: Path, start: int, stop: int | None) -> None:
    full = list(iter_samples(str(shard)))
    assert len(full) == 12
    want = full[start:stop]
    assert list(iter_samples(str(shard), start=start, stop=stop)) == want
    assert list(iter_samples(f"pipe:cat {shard}", start=start, stop=stop)) == [
        type(s)(s.key, s.members, f"pipe:cat {shard}") for s in want
    ]
    with FaultyServer(shard.parent) as srv:
        url = srv.url_for(shard.name)
        got = list(iter_samples(url, start=start, stop=stop))
    assert [(s.key, s.members) for s in got] == [(s.key, s.members) for s in want]


@pytest.mark.parametrize("seekable", [True, False])
def test_skipped_samples_are_passed_by_header_only(shard: Path, seekable: bool) -> None:
    # take sample 7 only: samples 0..6 cost their headers (their data is seeked past, or drained and dropped),
    # sample 7 its headers and data, and reading stops at the first header of sample 8
    data = shard.read_bytes()
    layout = _layout(shard)
    keys = list(dict.fromkeys(key for key, _ in layout))
    stream = CountingStream(data, seekable=seekable)
    got = list(read_samples(stream, "mem", start=7, stop=8))
    assert [s.key for s in got] == [keys[7]]
    before = [size for key, size in layout if keys.index(key) < 7]
    own = [size for key, size in layout if key == keys[7]]
    headers = 512 * (len(before) + len(own) + 1)
    if seekable:
        assert stream.bytes_read == headers + sum(own)
    else:
        assert stream.bytes_read == headers + sum(before) + sum(own)
    assert sum(len(v) for v in got[0].members.values()) == sum(size for key, size in _members(shard) if key == keys[7])


def test_read_samples_returns_how_many_samples_the_stream_holds(shard: Path) -> None:
    def drained(stop: int | None) -> int | None:
        gen = read_samples(CountingStream(shard.read_bytes(), seekable=True), "mem", start=2, stop=stop)
        while True:
            try:
                next(gen)
            except StopIteration as end:
                return end.value

    assert drained(None) == 12 and drained(12) == 12 and drained(20) == 12
    assert drained(4) is None  # stopped at sample 4's first header, before the end


def test_a_shard_shorter_than_its_range_is_a_shard_error(shard: Path) -> None:
    with pytest.raises(ShardError, match=r"ssv2-train-000000\.tar: holds 12 samples, fewer than the 15 its index"):
        list(iter_samples(str(shard), start=10, stop=15))


def test_a_pipe_closed_early_is_stopped_not_drained(shard: Path) -> None:
    # the command writes the shard and then lingers: leaving after sample 1 must not wait for it to finish
    write = f"sys.stdout.buffer.write(open({str(shard)!r}, 'rb').read())"
    code = f"import sys, time; {write}; sys.stdout.flush(); time.sleep(30)"
    url = f"pipe:{sys.executable} -c {code!r}"
    begin = time.monotonic()
    got = list(iter_samples(url, start=0, stop=1))
    assert len(got) == 1 and time.monotonic() - begin < 15


def test_resolve_then_range_of_the_index_shards(shard: Path) -> None:
    src = resolve_source(str(shard.parent / "ssv2-train.json"))
    assert src.nsamples == (12,)
    keys = [s.key for s in iter_samples(src.urls[0], start=4, stop=9)]
    assert keys == [s.key for s in iter_samples(src.urls[0])][4:9]
