"""A damaged cache is never trained on: every kind of cache file, flipped, cut in half or deleted, is refused in one
line that names the file (the reader, `cache verify`, training), locally and on a remote store; verify names the
file that changed, never a sound neighbour; the rebuild the errors name really repairs the cache.

One small cache (the tiny teacher of tests/train, cache.logits topk+sampled+exact, so every file kind exists) is
built once per module; each case damages a copy."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import open_cache
from pipeline.cache.manifest import shard_paths
from pipeline.cache.storage import Storage
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from tests.train.conftest import base_overrides, tiny_pair, training_overrides

TARGETS = ["cache.logits=topk+sampled+exact", "cache.topk=8", "cache.samples=8"]
# one file of each kind (shard 1 of 2; its chunk 1 of 2)
FILES = {
    "arrow": "shards/shard-00001.arrow",
    "hidden chunk": "shards/shard-00001.zarr/layer_2/c.1.0.0",
    "array metadata": "shards/shard-00001.zarr/layer_2/zarr.json",
    "group metadata": "shards/shard-00001.zarr/zarr.json",
    "shard record": "shards/shard-00001.json",
    "manifest": "manifest.json",
    "head": "teacher_head.safetensors",
}


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> dict:
    """{root, cache, overrides, items}: the tiny pair, a sound cache and every item read from it."""
    root = tmp_path_factory.mktemp("damage")
    teacher, student = tiny_pair(root)
    overrides = base_overrides(root, teacher, student, str(root / "cache")) + TARGETS
    from pipeline.recipes.cache import build_cache

    build_cache(load_config(None, overrides), progress=False)
    cache = root / "cache"
    assert {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()} >= set(FILES.values())
    c = open_cache(cache, exact=True)
    return {"root": root, "cache": cache, "overrides": overrides, "items": [c[i] for i in range(len(c))]}


def damage(path: Path, how: str) -> None:
    """flip: one byte XOR 0xFF in the middle (a JSON file is no longer UTF-8); cut: the first half; delete."""
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


def copy(sound: dict, dst: Path) -> Path:
    shutil.copytree(sound["cache"], dst)
    return dst


def read_everything(root, **kw) -> None:
    c = open_cache(root, exact=True, **kw)
    for i in range(len(c)):
        c[i]
    c.teacher_head()


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def remedy_of(rel: str, cache: Path) -> str:
    """What the one line must say to do."""
    if rel.startswith("shards/"):
        return f"delete its record {cache / shard_paths(1)[2]} and rerun `distill cache build CONFIG`"
    if rel == FILES["head"]:
        return "rerun `distill cache build CONFIG`"
    return "--overwrite"


@pytest.mark.parametrize("how", ["flip", "cut", "delete"])
@pytest.mark.parametrize("kind", list(FILES))
def test_reader_and_verify_refuse_a_damaged_file_naming_it(sound, tmp_path, kind, how):
    rel = FILES[kind]
    cache = copy(sound, tmp_path / "cache")
    damage(cache / rel, how)
    with pytest.raises(PipelineError) as e:
        read_everything(cache)
    msg = str(e.value)
    assert "\n" not in msg and rel in msg and remedy_of(rel, cache) in msg, msg
    if rel != FILES["manifest"]:
        assert str(cache / rel) in msg and "distill cache verify" in msg, msg
    r = run_cli("cache", "verify", cache)
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert "Traceback" not in r.output
    if rel == FILES["manifest"]:
        assert "manifest.json" in r.output
    else:  # the damaged file itself comes first, no sound neighbour
        assert f"1 bad file(s), first: {rel} " in r.output, r.output


@pytest.mark.parametrize("how", ["cut", "delete"])
@pytest.mark.parametrize("kind", [k for k in FILES if k != "manifest"])
def test_without_checks_a_file_that_cannot_be_decoded_is_still_one_line(sound, tmp_path, kind, how):
    """check=False (DISTILL_CACHE_CHECKS=0) computes no checksum, but a file that is missing or does not decode is
    the same one-line error naming it, never a traceback or a fill value."""
    rel = FILES[kind]
    cache = copy(sound, tmp_path / "cache")
    damage(cache / rel, how)
    with pytest.raises(PipelineError) as e:
        read_everything(cache, check=False)
    msg = str(e.value)
    assert "\n" not in msg and str(cache / rel) in msg and remedy_of(rel, cache) in msg, msg
    assert ("is missing" if how == "delete" else re.search("cannot be decoded|is damaged|not valid JSON", msg)), msg


def test_checks_off_by_environment_reads_the_same(sound, monkeypatch):
    from pipeline.cache.reader import CHECKS_ENV

    monkeypatch.setenv(CHECKS_ENV, "0")
    c = open_cache(sound["cache"])
    assert c.check is False and open_cache(sound["cache"], check=True).check is True
    for i, want in enumerate(sound["items"]):
        got = c[i]
        for key in ("input_ids", "topk_ids", "topk_logits", "sample_ids", "sample_counts"):
            assert np.array_equal(got[key], want[key]), (i, key)
        assert all(np.array_equal(got["hidden"][layer], h) for layer, h in want["hidden"].items())


def test_checks_hash_each_file_once(sound, monkeypatch):
    """Every file is checked the first time it is read, and only then: a second pass over the cache (every chunk
    decoded again) hashes nothing."""
    from pipeline.cache import reader

    hashed = []
    original = reader.Cache._checked

    def counted(self, rel, data, expected, record):
        hashed.append(rel)
        return original(self, rel, data, expected, record)

    monkeypatch.setattr(reader.Cache, "_checked", counted)
    c = reader.Cache(sound["cache"], chunk_cache=0)  # no decoded chunk kept: every read goes to the files
    for i in range(len(c)):
        c[i]
    files = {rel for record in c._records.values() for rel in record["files"]}
    assert len(hashed) == len(set(hashed)) and set(hashed) == files
    for i in range(len(c)):
        c[i]
    assert len(hashed) == len(files)


def test_verify_names_a_damaged_record_not_its_sound_files(sound, tmp_path):
    """One checksum digit changed in a shard record: the record is named (its files match the manifest), by verify
    and by the reader; one digit of a shard checksum in the manifest: the manifest is named."""
    cache = copy(sound, tmp_path / "cache")
    record_path = cache / shard_paths(0)[2]
    text = record_path.read_text()
    digest = json.loads(text)["files"][shard_paths(0)[0]]
    changed = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    record_path.write_text(text.replace(digest, changed))
    r = run_cli("cache", "verify", cache)
    assert r.exit_code == 2 and "1 bad file(s), first: shards/shard-00000.json is damaged" in r.output, r.output
    with pytest.raises(PipelineError, match=r"shard-00000.json is damaged: its checksums differ from the files"):
        read_everything(cache)
    record_path.write_text(text)

    manifest = cache / "manifest.json"
    good = manifest.read_text()
    shard = json.loads(good)["shards"][1]["checksum"]
    manifest.write_text(good.replace(shard, shard[:-1] + ("0" if shard[-1] != "0" else "1")))
    r = run_cli("cache", "verify", cache)
    assert r.exit_code == 2
    assert "1 bad file(s), first: manifest.json is damaged: its checksum of shard-00001" in r.output, r.output
    with pytest.raises(PipelineError, match=r"manifest.json is damaged: its checksum of shard-00001 .*--overwrite"):
        read_everything(cache)


def test_verify_never_crashes_on_json_that_is_not_utf8(sound, tmp_path):
    from pipeline.cache.reader import Cache

    cache = copy(sound, tmp_path / "cache")
    metadata = "shards/shard-00000.zarr/layer_2/zarr.json"
    for rel in (metadata, FILES["shard record"]):
        path = cache / rel
        path.write_bytes(path.read_bytes().replace(b'"', b'\xff', 1))
    r = run_cli("cache", "verify", cache)
    assert r.exit_code == 2 and f"2 bad file(s), first: {metadata} is damaged" in r.output, r.output
    found = Cache(cache).verify()
    assert len(found) == 2
    assert found[0] == f"{metadata} is damaged: it does not match its checksum in shards/shard-00000.json"
    assert found[1].startswith("shards/shard-00001.json is damaged: not UTF-8 text at byte ")
    with pytest.raises(PipelineError) as e:
        Storage(cache).read_json(FILES["shard record"])
    assert "not valid JSON (not UTF-8 text" in str(e.value)


def test_the_named_rebuild_repairs_the_cache(sound, tmp_path):
    """What the errors say to do is true: deleting a damaged shard's record and rerunning the same build
    rewrites the damaged shards (every shard is checked) and keeps the sound ones; the cache is the sound one."""
    from pipeline.recipes.cache import build_cache

    cache = copy(sound, tmp_path / "cache")
    overrides = [o for o in sound["overrides"] if not o.startswith("cache.dir=")] + [f"cache.dir={cache}"]
    damage(cache / FILES["hidden chunk"], "flip")
    damage(cache / "shards/shard-00000.zarr/layer_4/c.0.0.0", "cut")
    damage(cache / FILES["head"], "flip")
    build_cache(load_config(None, overrides), progress=False)  # complete: nothing lacks, nothing is rewritten
    assert run_cli("cache", "verify", cache).exit_code == 2
    kept = (cache / "shards/shard-00001.arrow").stat().st_mtime_ns
    (cache / FILES["shard record"]).unlink()
    build_cache(load_config(None, overrides), progress=False)
    assert run_cli("cache", "verify", cache).exit_code == 0
    assert (cache / "manifest.json").read_text() == (sound["cache"] / "manifest.json").read_text()
    assert (cache / "shards/shard-00001.arrow").stat().st_mtime_ns != kept  # shard 1 rewritten, as was shard 0
    def files_of(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != ".lock")

    files = files_of(sound["cache"])
    assert files == files_of(cache)
    for rel in files:  # the repaired cache is the sound one, byte for byte
        assert (cache / rel).read_bytes() == (sound["cache"] / rel).read_bytes(), rel


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_a_remote_damaged_file_is_refused(sound, how):
    url = f"memory://distill-damage/{uuid.uuid4().hex[:8]}"
    store = Storage(url)
    for path in sorted(p for p in sound["cache"].rglob("*") if p.is_file() and p.name != ".lock"):
        store.write_bytes(path.relative_to(sound["cache"]).as_posix(), path.read_bytes())
    try:
        read_everything(url)  # sound
        rel = FILES["hidden chunk"]
        if how == "delete":
            store.remove(rel)
        else:
            data = bytearray(store.read_bytes(rel))
            data[len(data) // 2] ^= 0xFF
            store.write_bytes(rel, bytes(data))
        with pytest.raises(PipelineError) as e:
            read_everything(url)
        msg = str(e.value)
        assert "\n" not in msg and f"{url}/{rel} is " in msg, msg
        assert f"delete its record {url}/shards/shard-00001.json" in msg, msg
        r = run_cli("cache", "verify", url)
        assert r.exit_code == 2 and f"first: {rel} is" in r.output and r.output.count("\n") == 1
    finally:
        store.remove("")


def _with_cache(overrides: list[str], cache: Path) -> list[str]:
    return [o for o in overrides if not o.startswith("cache.dir=")] + [f"cache.dir={cache}"]


def test_training_refuses_a_damaged_cache_in_one_line(sound, tmp_path):
    """`distill train` on a cache whose hidden chunks have one flipped byte each (values it would otherwise train
    on): one line naming a damaged chunk file, exit code 2."""
    cache = copy(sound, tmp_path / "cache")
    for path in cache.glob("shards/*.zarr/layer_2/c.*"):
        damage(path, "flip")
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    sets = [a for o in _with_cache(sound["overrides"], cache) + training_overrides(tmp_path / "run")
            for a in ("--set", o)]
    r = run_cli("train", config, *sets)
    errors = [line[line.index("error: "):] for line in r.output.splitlines() if "error: " in line]  # after progress
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert r.output.endswith(errors[0] + "\n")
    assert re.match(rf"error: {re.escape(str(cache))}/shards/shard-0000[01].zarr/layer_2/c.[01].0.0 is damaged: it "
                    r"does not match its checksum in shards/shard-0000[01].json; run `distill cache verify", errors[0])


def test_a_dataloader_worker_refuses_in_one_line(sound, tmp_path):
    """In DataLoader workers (the default on a GPU) the worker's error reaches the CLI as the same one line."""
    from torch.utils.data import DataLoader

    from pipeline.train.dataset import CacheDataset, collate

    cache = copy(sound, tmp_path / "cache")
    for path in cache.glob("shards/*.zarr/layer_2/c.*"):
        path.unlink()
    ds = CacheDataset(str(cache), "train", [2], 2.0)
    with pytest.raises(PipelineError) as e:
        list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate))
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert re.match(rf"{re.escape(str(cache))}/shards/shard-0000[01].zarr/layer_2/c.[01].0.0 is missing; run `distill "
                    "cache verify", msg), msg
