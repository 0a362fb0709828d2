"""Remote shards as users stream them: http:// from a local server (started here, on 127.0.0.1) that
answers 404 for one shard and drops the connection part-way through others, and pipe: commands. The
run goes on, retries as configured, counts what it lost by kind, and a resumed run sees exactly the
batches the uninterrupted run saw."""

from __future__ import annotations

import collections
import http.server
import json
import tarfile
import threading
from pathlib import Path

import pytest

from mm.data.loader import Loader, StreamSpec, _Stream, default_collate


class ShardServer:
    """Serves `root`'s files; `missing` answer 404, `drops[name]` requests of a file are cut half-way
    (headers promise the whole file). Counts requests per file. Stops by itself after `lifetime` s."""

    def __init__(self, root: Path, lifetime: float = 300.0):
        self.root, self.missing, self.drops = root, set(), {}
        self.requests: collections.Counter = collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests[name] += 1
                path = server.root / name
                if name in server.missing or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if server.drops.get(name, 0) > 0:
                    server.drops[name] -= 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.timer = threading.Timer(lifetime, self.httpd.shutdown)  # bounded even if a test hangs
        self.timer.daemon = True
        self.timer.start()

    def stop(self) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(shapes):
    s = ShardServer(Path(shapes["train_shards"][0]).parent)
    yield s
    s.stop()


def names(shapes) -> list[str]:
    return [Path(p).name for p in shapes["train_shards"]]


def keys_map(raw, rng):
    return {"key": raw["__key__"] + "@" + raw["__url__"].rsplit("/", 1)[-1]}


def shard_keys(path) -> list[str]:
    """Independent reference: the sample keys of a local shard, in order, read with tarfile."""
    with tarfile.open(path) as tar:
        keys = [m.name.split(".", 1)[0] for m in tar.getmembers()]
    return list(dict.fromkeys(keys))


def spec(urls, **kw) -> StreamSpec:
    base = {"urls": urls, "sample_map": keys_map, "collate": default_collate, "batch_size": 4, "seed": 0,
            "num_workers": 2, "shuffle_buffer": 16, "retry_delay": 0.01}
    base.update(kw)
    return StreamSpec(**base)


@pytest.mark.parametrize("retries", [0, 2])
def test_one_pass_goes_on_retries_and_counts_losses_by_kind(shapes, server, retries, capfd):
    shard = names(shapes)
    server.missing.add(shard[3])  # 404 every time
    server.drops[shard[5]] = 99  # cut half-way every time
    server.drops[shard[6]] = 1  # cut once: a retry gets it whole
    urls = f"{server.url}/shapes-{{000000..000007}}.tar"
    loader = Loader(spec(urls, repeat=False, drop_last=False, retries=retries))
    seen = [k for batch in loader for k in batch["key"]]

    kinds = {k: v for k, v in loader.bad_counts.items() if k != "total"}
    if retries:
        assert kinds == {"url_error": 1, "connection_lost": 1}
    else:  # the shard cut once is lost too
        assert kinds == {"url_error": 1, "connection_lost": 2}
    assert loader.bad_counts["total"] == sum(kinds.values())
    assert server.requests[shard[3]] == retries + 1 and server.requests[shard[5]] == retries + 1
    assert server.requests[shard[6]] == min(2, retries + 1)
    err = capfd.readouterr().err  # printed by the loader's worker processes
    assert ("retry 1 of 2" in err and "connection_lost" in err) if retries else "retry" not in err

    by_shard = collections.defaultdict(list)
    for key in seen:
        k, name = key.split("@")
        by_shard[name].append(k)
    assert len(seen) == len(set(seen))  # a retry never repeats what it already gave
    expected_whole = [0, 1, 2, 4, 7] + ([6] if retries else [])
    for i in expected_whole:
        assert sorted(by_shard[shard[i]]) == sorted(shard_keys(shapes["train_shards"][i]))
    assert shard[3] not in by_shard
    # The cut shard gave what arrived before the cut: some of its samples, never all.
    for i in [5] + ([] if retries else [6]):
        got, whole = by_shard[shard[i]], shard_keys(shapes["train_shards"][i])
        assert 0 < len(got) < len(whole) and set(got) <= set(whole)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch["key"])
        if len(out) == n:
            break
    return out


def test_resume_sees_the_batches_of_the_uninterrupted_run_with_lost_shards(shapes, server):
    urls = f"{server.url}/shapes-{{000000..000007}}.tar"
    s = spec(urls, retries=1)
    stream = _Stream(s, {}, 0, collections.Counter())
    first_of = [Path(stream._shards(0, w, 2)[0]).name for w in range(2)]
    second_of_1 = Path(stream._shards(0, 1, 2)[1]).name
    # Worker 0's first shard drops part-way (transiently: the server recovers later); worker 1's
    # second shard is gone for good.
    server.drops[first_of[0]] = 2
    server.missing.add(second_of_1)
    full = take(Loader(s), 50)

    server.requests.clear()
    server.drops[first_of[0]] = 2
    first = Loader(s)
    assert take(first, 30) == full[:30]
    counted = dict(first.bad_counts)
    assert counted == {"connection_lost": 1, "url_error": 1, "total": 2}

    server.drops.clear()  # the flaky server has recovered by the time the run resumes
    state = first.state_dict()
    resumed = Loader(s, state=state)
    assert take(resumed, 20) == full[30:]
    # The losses replayed from the saved position are not counted again, and not retried.
    assert resumed.bad_counts == counted
    assert server.requests[first_of[0]] == 2 + 1  # 2 attempts before, 1 replay read now


def test_pipe_shards_and_a_failing_command(shapes, tmp_path):
    paths = shapes["train_shards"][:2]
    urls = f"pipe:cat {paths[0]}::pipe:cat {paths[1]}::pipe:exit 3"
    loader = Loader(spec(urls, repeat=False, drop_last=False, num_workers=0, retries=1, resampled=False))
    seen = {k.split("@")[0] for batch in loader for k in batch["key"]}
    assert seen == set(shard_keys(paths[0])) | set(shard_keys(paths[1]))
    assert loader.bad_counts == {"url_error": 1, "total": 1}


# --- end to end: CLIP training from the server (one rank, subprocesses), interrupted and resumed

CLIP_TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "data.batch_size=8", "data.num_workers=1", "optim.warmup_steps=1",
    "train.log_every=1", "train.ckpt_every=4", "eval.zeroshot_data=", "data.retries=1",
]


def _train(out: Path, urls: str, steps: int, kill_at: int = 0):
    """A one-rank CLIP run; `kill_at` SIGKILLs it just before the checkpoint of that step is saved
    (the test hook of mm.engine.checkpoint), as a preempted job dies. Returns (stderr, log records)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    sets = CLIP_TINY + [f"data.train={urls}", f"train.out_dir={out}", f"train.steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MM_FAULT_KILL"):
        env.pop(key, None)
    if kill_at:
        env["MM_FAULT_KILL"] = f"before_save:{kill_at}:0"
    proc = subprocess.run([sys.executable, "train/clip.py", "--config", "configs/clip/tiny.yaml",
                           *[a for s in sets for a in ("--set", s)]], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == (-9 if kill_at else 0), proc.stderr[-3000:]
    return proc.stderr, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_from_a_flaky_server_goes_on_and_resumes_exactly(shapes, server, tmp_path):
    shard = names(shapes)
    urls = f"{server.url}/shapes-{{000000..000007}}.tar"
    server.missing.add(shard[2])
    server.drops[shard[4]] = 10**6
    # Killed before its step-8 checkpoint: steps 1-8 logged, the newest checkpoint is step 4's.
    err, records = _train(tmp_path / "run", urls, 8, kill_at=8)
    assert "retry 1 of 1" in err
    first = {r["step"]: r for r in records if "loss" in r}
    assert sorted(first) == list(range(1, 9))
    assert first[8]["bad/url_error"] == 1 and first[8]["bad/connection_lost"] == 1

    server.drops.clear()  # the connection problem is gone when the run resumes
    _, records = _train(tmp_path / "run", urls, 8)
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9)) + list(range(5, 9))  # resumed from step 4
    again = {r["step"]: r for r in logged[8:]}
    for step in range(5, 9):  # the batches, hence the losses, of the run that was killed
        assert abs(again[step]["loss"] - first[step]["loss"]) < 1e-5, step
    # The losses replayed from the checkpoint are not counted twice.
    assert again[8]["bad/connection_lost"] == 1 and again[8]["bad/url_error"] == 1
