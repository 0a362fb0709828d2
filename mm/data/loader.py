"""The one WebDataset pipeline every trainer and evaluator reads through.

Order of work inside each data-loader worker:
  shard list (deterministic shuffle by seed + epoch, or weighted resampling)
  -> split by node and by worker (explicit, by global worker index)
  -> tar members grouped into raw samples (webdataset)
  -> sample shuffle buffer (seeded by seed, epoch, worker)
  -> skip what a resumed run already consumed (raw bytes, before any decoding)
  -> task's sample map (decode, transform; a corrupt sample raises SampleError and is counted)
  -> batches, each carrying the worker's position and its corrupt-sample counts.

Resume: every batch carries (worker, epoch, raw samples consumed, shards lost this epoch). The main
process keeps the newest position per worker and the number of batches taken; a loader started from
that state skips the raw samples already consumed and rotates worker roles so batches arrive in the
same order as in the uninterrupted run (torch's DataLoader takes batches round-robin from its workers,
starting at 0).

Shards that cannot be read whole: a remote shard (http(s)://, pipe:, s3:...) whose request fails or
whose connection drops is retried `retries` times, each retry reading past the samples already
delivered; a shard still failing, or a damaged local file (never retried), is lost from that point
and counted once by kind (url_error: nothing could be read; connection_lost: the transfer stopped
part-way; zero_byte_shard, truncated_tar, unreadable_tar: the file itself). The position records each
lost shard with the number of samples it gave, so a resumed run replays exactly what the interrupted
one saw (a shard lost then is cut at the same sample now, even if the server has recovered) and does
not count those losses twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception

from mm.errors import DataError


class SampleError(Exception):
    """Raised by a sample map for a sample that cannot be used; `kind` names the problem for counts."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


SampleMap = Callable[[dict, random.Random], dict]
Collate = Callable[[list[dict]], dict]


def expand_sources(urls: str) -> list[list[str]]:
    """'a/{0..3}.tar::b/x.tar' -> [[a/0.tar, ..., a/3.tar], [b/x.tar]] (brace patterns, pipe:, http)."""
    try:
        sources = [wds.shardlists.expand_urls(part) for part in urls.split("::") if part.strip()]
    except ValueError as e:  # a malformed brace pattern
        raise DataError(f"{urls!r}: not a shard pattern ({e})") from None
    if not sources or not all(sources):
        raise DataError(f"no shards in {urls!r}")
    return sources


def check_local_shards(urls: str, key: str = "data.train") -> None:
    """Fail before any compute when a local shard is missing or is not a file (a run would otherwise
    count every sample of it as unreadable). Remote shards (pipe:, http:, s3:) are not checked."""
    from pathlib import Path

    for url in (u for src in expand_sources(urls) for u in src):
        if not is_local(url):
            continue
        path = Path(url.removeprefix("file:"))
        if not path.exists():
            raise DataError(f"{key}: no such shard {path}")
        if not path.is_file():
            raise DataError(f"{key}: {path} is not a shard file (a .tar)")


def is_local(url: str) -> bool:
    """A path or file: URL (as opposed to http(s)://, pipe:, s3:, ... which are fetched)."""
    return url.startswith("file:") or ":" not in url.split("/", 1)[0]


class _CountingStream:
    """A read-only stream that counts the bytes it gave (to tell 'nothing arrived' from 'cut short')."""

    def __init__(self, stream: Any):
        self.stream, self.bytes = stream, 0

    def read(self, *args: Any) -> bytes:
        data = self.stream.read(*args)
        self.bytes += len(data)
        if not data and getattr(self.stream, "length", None):
            # http.client returns b"" when the server closes before Content-Length bytes arrived.
            raise http.client.IncompleteRead(b"", self.stream.length)
        return data

    def close(self) -> None:
        # A pipe's exit status was checked on read; closing one early (a shard cut off) may raise.
        with contextlib.suppress(Exception):
            self.stream.close()


def _open(url: str, timeout: float) -> Any:
    # urllib rather than webdataset's curl pipe for http(s): curl retries some failures by itself (30
    # times, 2 s apart) and reports every failure as an exit code; here a retry is ours to count.
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout)
    return gopen(url)


def _read_shard(url: str, stream: _CountingStream) -> Iterator[dict]:
    files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
    yield from tariterators.group_by_keys(files, handler=reraise_exception)


_TRANSPORT_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                     TimeoutError)


def _loss_kind(exn: Exception, received: int, local: bool) -> str:
    """What a failed shard counts as in the bad-sample counts."""
    text = str(exn).lower()
    if not local and (isinstance(exn, _TRANSPORT_ERRORS) or "exit" in text):  # exit: a pipe: command failed
        return "url_error" if received == 0 else "connection_lost"
    if "empty file" in text:
        return "zero_byte_shard"
    if any(t in text for t in ("unexpected end", "truncated", "empty header")):
        return "truncated_tar"
    return "unreadable_tar"


@dataclasses.dataclass
class StreamSpec:
    """What a pipeline reads and how; identical on every rank apart from `rank`."""

    urls: str
    sample_map: SampleMap
    collate: Collate
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 1000
    repeat: bool = True  # True: endless stream of epochs (training); False: one pass (evaluation)
    resampled: bool = False
    weights: list[float] = dataclasses.field(default_factory=list)
    drop_last: bool = True  # only for one-pass streams; endless streams always give full batches
    retries: int = 2  # further attempts at a remote shard whose request fails or whose connection drops
    retry_delay: float = 1.0  # seconds before the first retry; doubles with each further one
    timeout: float = 60.0  # seconds without data before a remote request counts as failed


def _rng(*parts: int) -> random.Random:
    # A tuple hash of ints is stable across processes (no string hashing, so PYTHONHASHSEED is moot).
    return random.Random(hash(tuple(parts)))


class _Stream(IterableDataset):
    def __init__(self, spec: StreamSpec, start: dict[int, tuple], rotation: int, bad: Counter):
        self.spec = spec
        self.sources = expand_sources(spec.urls)
        self.start = start  # logical worker -> (epoch, raw samples consumed, {shard index: samples} lost)
        self.rotation = rotation
        self.initial_bad = bad
        if spec.batch_size < 1 or spec.num_workers < 0 or spec.retries < 0 or spec.shuffle_buffer < 0:
            raise DataError(f"batch size must be >= 1 and workers, retries, shuffle buffer >= 0; got "
                            f"{spec.batch_size}, {spec.num_workers}, {spec.retries}, {spec.shuffle_buffer}")
        if spec.weights and len(spec.weights) != len(self.sources):
            raise DataError(f"{len(spec.weights)} weights for {len(self.sources)} sources in {spec.urls!r}")
        if spec.weights and not spec.resampled:
            raise DataError("weighted mixing of sources needs data.resampled: true")
        if spec.weights and (min(spec.weights) < 0 or not sum(spec.weights) > 0 or sum(spec.weights) == float("inf")):
            raise DataError(f"data.train_weights {spec.weights}: weights must be >= 0 with a positive, finite sum")
        n_shards = sum(len(s) for s in self.sources)
        workers = spec.world_size * max(1, spec.num_workers)
        if spec.repeat and not spec.resampled and n_shards < workers:
            raise DataError(
                f"{n_shards} shard(s) in {spec.urls!r} for {spec.world_size} rank(s) x "
                f"{max(1, spec.num_workers)} worker(s): write at least {workers} shards (mm-shards --shard-size)"
            )

    def _shards(self, epoch: int, worker: int, n_workers: int) -> list[str]:
        spec = self.spec
        if spec.resampled:
            weights = spec.weights or [1.0] * len(self.sources)
            flat = [(u, w / len(src)) for src, w in zip(self.sources, weights) for u in src]
            count = max(1, len(flat) // n_workers)
            rng = _rng(spec.seed, epoch, worker, 1)
            return rng.choices([u for u, _ in flat], weights=[w for _, w in flat], k=count)
        flat = [u for src in self.sources for u in src]
        _rng(spec.seed, epoch).shuffle(flat)
        return flat[worker::n_workers]

    def _samples(self, urls: list[str], bad: Counter, lost: dict[int, int],
                 replay: dict[int, int]) -> Iterator[dict]:
        """The raw samples of `urls` in order. `lost` receives {index: samples given} for each shard lost
        (and its loss is counted in `bad`); `replay` holds the losses a resumed run already counted."""
        for index, url in enumerate(urls):
            yield from self._shard_samples(url, index, bad, lost, replay.get(index))

    def _shard_samples(self, url: str, index: int, bad: Counter, lost: dict[int, int],
                       limit: int | None) -> Iterator[dict]:
        local = is_local(url)
        # A loss the interrupted run counted is replayed as it happened: cut at the same sample, no retry.
        retries = 0 if local or limit is not None else max(0, self.spec.retries)
        delivered = 0
        for attempt in range(retries + 1):
            stream = None
            try:
                stream = _CountingStream(_open(url, self.spec.timeout))
                for i, sample in enumerate(_read_shard(url, stream)):
                    if limit is not None and i >= limit:
                        break
                    if i < delivered:  # given before the connection dropped: a retry reads past it
                        continue
                    delivered += 1
                    yield sample
                if limit is not None:
                    lost[index] = limit
                return
            except Exception as exn:  # noqa: BLE001 -- any failure of one shard costs that shard, never the run
                if limit is not None:
                    lost[index] = limit
                    return
                kind = _loss_kind(exn, stream.bytes if stream else 0, local)
                if attempt < retries:
                    print(f"warning: {url}: {kind} ({exn}); retry {attempt + 1} of {retries}", file=sys.stderr,
                          flush=True)
                    time.sleep(self.spec.retry_delay * 2 ** attempt)
                    continue
                bad[kind] += 1
                bad["total"] += 1
                lost[index] = delivered
                return
            finally:
                if stream is not None:
                    stream.close()

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        size = self.spec.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for sample in samples:
            buf.append(sample)
            if len(buf) >= size:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        info = get_worker_info()
        n_local = info.num_workers if info else 1
        physical = info.id if info else 0
        local = (physical + self.rotation) % n_local
        worker = spec.rank * n_local + local  # global logical worker index
        n_workers = spec.world_size * n_local
        epoch, skip, *rest = self.start.get(worker, (0, 0, {}))
        replay = {int(k): int(v) for k, v in (rest[0] if rest else {}).items()}
        bad = Counter(self.initial_bad.get(worker, {}))
        batch: list[dict] = []
        good = 0  # samples of this worker's current epoch that decoded
        while True:
            consumed, good, bad_at_start, full_epoch = 0, 0, bad["total"], skip == 0
            lost: dict[int, int] = {}
            stream = self._shuffled(self._samples(self._shards(epoch, worker, n_workers), bad, lost, replay),
                                    _rng(spec.seed, epoch, worker, 2))
            for raw in stream:
                consumed += 1
                if consumed <= skip:
                    continue
                sample_rng = _rng(spec.seed, epoch, worker, consumed)
                # torchvision's random transforms draw from the default CPU generator. (torch.manual_seed
                # would also queue seeds for every accelerator backend, costing ~0.3 ms a sample.)
                torch.default_generator.manual_seed(sample_rng.getrandbits(63))
                try:
                    batch.append(spec.sample_map(raw, sample_rng))
                    good += 1
                except SampleError as e:
                    bad[e.kind] += 1
                    bad["total"] += 1
                    continue
                if len(batch) == spec.batch_size:
                    out = spec.collate(batch)
                    out["__pos__"] = (worker, epoch, consumed, dict(lost), dict(bad))
                    yield out
                    batch = []
            skip, replay = 0, {}
            if not spec.repeat:
                if batch and not spec.drop_last:
                    out = spec.collate(batch)
                    out["__pos__"] = (worker, epoch, consumed, dict(lost), dict(bad))
                    yield out
                return
            if consumed == 0 and bad["total"] == bad_at_start:
                raise DataError(f"worker {worker} read no samples from its shards of {spec.urls!r}")
            if full_epoch and good == 0:
                # A worker whose every sample is bad never yields a batch: without this the main process
                # would wait on it for ever instead of reaching its data.max_bad_fraction check.
                kinds = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()) if k != "total")
                raise DataError(f"none of the samples of worker {worker}'s shards of {spec.urls!r} is usable "
                                f"({kinds})")
            epoch += 1


class Loader:
    """Iterates batches from a StreamSpec and keeps the state needed to resume exactly.

    `state_dict()` after k batches, passed to a new Loader, yields batch k+1 onwards.
    `max_bad_fraction` stops a run whose data is mostly corrupt instead of training on nothing.
    """

    def __init__(self, spec: StreamSpec, state: dict | None = None, max_bad_fraction: float = 1.0,
                 min_samples_for_check: int = 200):
        self.spec = spec
        state = state or {}
        self.batches = int(state.get("batches", 0))
        # (epoch, consumed, lost shards); a state saved before lost shards were recorded has no third item
        self.positions: dict[int, tuple] = {int(k): tuple(v) for k, v in state.get("positions", {}).items()}
        self.bad: dict[int, dict] = {int(k): dict(v) for k, v in state.get("bad", {}).items()}
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_check = min_samples_for_check
        self.good = int(state.get("good", 0))
        n_local = max(1, spec.num_workers)
        stream = _Stream(spec, dict(self.positions), self.batches % n_local, Counter())
        stream.initial_bad = {w: Counter(c) for w, c in self.bad.items()}
        self.loader = DataLoader(stream, batch_size=None, num_workers=spec.num_workers, collate_fn=_as_collated,
                                 persistent_workers=False, prefetch_factor=4 if spec.num_workers else None)

    def __iter__(self) -> Iterator[dict]:
        given = 0
        for batch in self.loader:
            given += 1
            worker, epoch, consumed, lost, bad = batch.pop("__pos__")
            self.batches += 1
            self.positions[worker] = (epoch, consumed, lost)
            self.bad[worker] = bad
            self.good += self.spec.batch_size
            self._check_bad_share()
            yield batch
        if not given and not self.spec.repeat and not self.batches and self.spec.world_size == 1:
            # An evaluation over nothing would fail later on an empty concatenation, or report on 0 items.
            # (With several ranks one may rightly get no shard of a small set: only the total counts.)
            raise DataError(f"no usable samples in {self.spec.urls!r}: its shards are empty, damaged or not "
                            "tar files")

    @property
    def bad_counts(self) -> dict[str, int]:
        """Corrupt samples skipped so far on this rank, per kind, with 'total'."""
        total: Counter = Counter()
        for counts in self.bad.values():
            total.update(counts)
        return dict(total)

    def _check_bad_share(self) -> None:
        bad = self.bad_counts.get("total", 0)
        seen = bad + self.good
        if seen >= self.min_samples_for_check and bad / seen > self.max_bad_fraction:
            kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_counts.items()) if k != "total")
            raise DataError(
                f"{bad} of {seen} samples in {self.spec.urls!r} are unusable ({kinds}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction}"
            )

    def state_dict(self) -> dict:
        return {"batches": self.batches, "positions": dict(self.positions), "bad": dict(self.bad),
                "good": self.good}


def _as_collated(batch: dict) -> dict:
    # The stream yields batches its collate already built; DataLoader's default (default_convert) would
    # walk every list of keys and metadata of every batch again for numpy arrays that are never there.
    return batch


def default_collate(samples: list[dict]) -> dict[str, Any]:
    """Stack tensors, keep everything else (keys, metadata) as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
