"""The shared loader: splitting, determinism, exact resume, corrupt samples, mixing."""

import io
import tarfile

import pytest

from mm.data.loader import Loader, SampleError, StreamSpec, default_collate
from mm.errors import DataError


def keys_map(raw, rng):
    return {"key": raw["__key__"] + "@" + raw["__url__"].rsplit("/", 1)[-1]}


def spec(urls, **kw):
    base = dict(urls=urls, sample_map=keys_map, collate=default_collate, batch_size=4, seed=0,
                num_workers=2, shuffle_buffer=16)
    base.update(kw)
    return StreamSpec(**base)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch["key"])
        if len(out) == n:
            break
    return out


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_epoch(shapes):
    seen = []
    for rank in range(2):
        loader = Loader(spec(shapes["train"], rank=rank, world_size=2, repeat=False, drop_last=False))
        seen += [k for batch in loader for k in batch["key"]]
    assert len(seen) == 320
    assert len(set(seen)) == 320


def test_same_seed_same_order_other_seed_other_order(shapes):
    a = take(Loader(spec(shapes["train"])), 10)
    b = take(Loader(spec(shapes["train"])), 10)
    c = take(Loader(spec(shapes["train"], seed=1)), 10)
    assert a == b
    assert a != c


@pytest.mark.parametrize("consumed", [5, 6, 83])  # odd counts rotate the workers; 83 crosses an epoch
def test_resume_continues_with_the_batches_it_would_have_seen(shapes, consumed):
    full = take(Loader(spec(shapes["train"], rank=1, world_size=2)), consumed + 8)
    first = Loader(spec(shapes["train"], rank=1, world_size=2))
    assert take(first, consumed) == full[:consumed]
    resumed = Loader(spec(shapes["train"], rank=1, world_size=2), state=first.state_dict())
    assert take(resumed, 8) == full[consumed:]


def test_endless_stream_reshuffles_each_epoch(shapes):
    batches = take(Loader(spec(shapes["train"], num_workers=0)), 160)  # two epochs of 320 samples
    first, second = [k for b in batches[:80] for k in b], [k for b in batches[80:] for k in b]
    assert sorted(first) == sorted(second)
    assert first != second


def _corrupt_shard(path, n_good=30, n_bad=6):
    import random

    from mm.data.synthetic import render_scene

    with tarfile.open(path, "w") as tar:
        for i in range(n_good + n_bad):
            scene = render_scene(random.Random(i), 32, 1.0)
            buf = io.BytesIO()
            scene.image.save(buf, "PNG")
            data = buf.getvalue() if i < n_good else b"\x89PNG not really an image"
            for ext, payload in (("png", data), ("txt", scene.caption.encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    import open_clip

    from mm.data.image_text import image_text_map

    _corrupt_shard(tmp_path / "bad-000000.tar")
    sample_map = image_text_map(open_clip.image_transform(32, False),
                                open_clip.tokenizer.SimpleTokenizer(context_length=16))
    loader = Loader(StreamSpec(urls=str(tmp_path / "bad-000000.tar"), sample_map=sample_map,
                               collate=default_collate, batch_size=5, num_workers=0, repeat=False,
                               drop_last=False))
    images = sum(len(b["image"]) for b in loader)
    assert images == 30
    assert loader.bad_counts == {"undecodable_image": 6, "total": 6}


def test_mostly_corrupt_data_stops_with_a_clear_error(tmp_path):
    _corrupt_shard(tmp_path / "bad-000000.tar", n_good=10, n_bad=30)

    def strict(raw, rng):
        if raw["png"].startswith(b"\x89PNG not"):
            raise SampleError("undecodable_image")
        return {"key": raw["__key__"]}

    loader = Loader(spec(str(tmp_path / "bad-000000.tar"), sample_map=strict, num_workers=0, batch_size=2),
                    max_bad_fraction=0.5, min_samples_for_check=20)
    with pytest.raises(DataError, match="unusable.*undecodable_image=.*max_bad_fraction"):
        take(loader, 100)


def test_too_few_shards_for_ranks_and_workers_is_an_error(shapes):
    with pytest.raises(DataError, match="write at least 8 shards"):
        Loader(spec(shapes["train_shards"][0] + "::" + shapes["train_shards"][1], world_size=4, num_workers=2))


def test_weighted_mixing_draws_sources_in_proportion(shapes):
    a = "::".join(shapes["train_shards"][:4])
    b = "::".join(shapes["train_shards"][4:])
    with pytest.raises(DataError, match="needs data.resampled"):
        Loader(spec(a + "::" + b, weights=[1.0] * 8))
    # 8 sources of one shard each, the first four 9x as likely as the last four.
    mixed = Loader(spec(a + "::" + b, weights=[9.0] * 4 + [1.0] * 4, resampled=True, num_workers=0))
    keys = [k for batch in take(mixed, 200) for k in batch]
    from_a = sum(any(s.rsplit("/", 1)[-1] in k for s in shapes["train_shards"][:4]) for k in keys)
    assert 0.8 < from_a / len(keys) < 0.98
