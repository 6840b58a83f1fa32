"""Caches on object stores: build, kill + resume, verify, info and train against a real S3-compatible
server (moto's server mode on a free local port, in this process), plus memory:// and bad URLs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from moto.server import ThreadedMotoServer

from pipeline.cache import open_cache
from pipeline.cache.directory import ObjectLock, finished_record
from pipeline.cache.manifest import FORMAT_VERSION
from pipeline.cache.storage import Storage
from pipeline.cli import main
from pipeline.errors import PipelineError
from tests.cache.test_build import assert_same_cache

REPO = Path(__file__).resolve().parents[2]
BUCKET = "distill-cache"
VERSIONED = "distill-cache-versioned"  # every overwrite keeps the old version: shows what was rewritten
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    def __init__(self, endpoint: str, client):
        self.endpoint, self.client = endpoint, client

    def options(self) -> dict:
        return {"endpoint_url": self.endpoint}

    def url(self, bucket: str = BUCKET) -> str:
        return f"s3://{bucket}/{uuid.uuid4().hex[:8]}"

    def keys(self, url: str) -> list[str]:
        """Every object under the URL's prefix, relative to it."""
        bucket, prefix = url[len("s3://"):].split("/", 1)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        return sorted(o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            client.create_bucket(Bucket=VERSIONED)
            client.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
            yield S3(endpoint, client)
        finally:
            server.stop()


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _options_arg(options: dict) -> str:
    return "cache.storage_options=" + json.dumps(options)


@pytest.fixture
def endpoint_from_fsspec_config(s3, monkeypatch):
    """The endpoint through fsspec's own config (what FSSPEC_S3_ENDPOINT_URL sets), not storage_options."""
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3.endpoint})


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_build_verify_info_read_match_a_local_build(tiny_config, tmp_path, s3, where, monkeypatch):
    cfg_path, local = tiny_config(data__num_sequences=16, cache__hidden_codec="int8")  # int8: layer_<i>_scale arrays too
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    if where == "s3":
        url, options = s3.url(), s3.options()
    else:
        url, options = f"memory://distill-test/{uuid.uuid4().hex[:8]}", {}
    r = run_cli("cache", "build", cfg_path, "--set", f"cache.dir={url}", "--set", _options_arg(options))
    assert r.exit_code == 0, r.output
    assert f"{url}: 16 sequences, 2 shards, manifest written" in r.output

    remote = open_cache(url, storage_options=options)
    assert_same_cache(open_cache(local), remote)  # same manifest and checksums: the same bytes as locally
    store = Storage(url, options)
    names = store.files("")
    assert "manifest.json" in names and ".lock" not in names and "build.json" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    local_names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != ".lock")
    assert names == local_names
    assert remote.verify() == []

    if where == "s3":  # the CLI on the URL, with the endpoint from fsspec's config (as FSSPEC_S3_ENDPOINT_URL sets it)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3.endpoint})
    verify = run_cli("cache", "verify", url)
    assert verify.exit_code == 0 and f"{url}: OK (format {FORMAT_VERSION}, 2 shards, 16 sequences)" in verify.output
    info = json.loads(run_cli("cache", "info", url, "--json").output)
    assert info["sequences"] == 16 and info["bytes"] == json.loads(run_cli("cache", "info", local, "--json").output)["bytes"]
    assert f"cache        {url}" in run_cli("cache", "info", url).output

    # a flipped byte in one stored object: verify names it
    victim = next(n for n in names if "/layer_2/c." in n)
    data = bytearray(store.open(victim).read())
    data[len(data) // 2] ^= 0x01
    with store.open(victim, "wb") as f:
        f.write(bytes(data))
    r = run_cli("cache", "verify", url)
    assert r.exit_code != 0 and victim in r.output and r.output.count("\n") == 1
    if where == "memory":
        store.remove("")


def _build_cmd(cfg_path, *extra):
    return [sys.executable, "-m", "pipeline.cli", "cache", "build", str(cfg_path), *extra]


def test_killed_build_is_invisible_and_resumes_to_the_uninterrupted_result(tiny_config, s3, endpoint_from_fsspec_config):
    # 24 sequences in 3 shards of 8, chunks of 4: SIGKILLed (the writer's crash-test hook) with shard 0
    # committed and the first chunk of shard 1 written straight to its final object names
    url = s3.url(VERSIONED)
    cfg_path, local = tiny_config(data__num_sequences=24, cache__batch_size=4, cache__storage_options=s3.options())
    assert run_cli("cache", "build", cfg_path).exit_code == 0  # the uninterrupted reference, locally
    env = dict(os.environ, PYTHONPATH=str(REPO), **CREDENTIALS)
    env.pop("DISTILL_CACHE_KILL_AFTER_SHARDS", None)
    killed = subprocess.run(_build_cmd(cfg_path, "--set", f"cache.dir={url}"), capture_output=True, text=True,
                            env=dict(env, DISTILL_CACHE_KILL_AFTER_SHARDS="1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    killed_pid = Storage(url, s3.options()).read_json(".lock")["pid"]

    keys = s3.keys(url)
    assert "shards/shard-00000.json" in keys and "shards/shard-00001.json" not in keys
    half = [k for k in keys if k.startswith("shards/shard-00001.zarr/") and "/c." in k]
    assert half  # the half-written shard's chunks are there, at their final names...
    assert "shards/shard-00001.arrow" not in keys  # (its Arrow upload never completed: no object)
    assert "manifest.json" not in keys and "build.json" in keys and ".lock" in keys
    with pytest.raises(PipelineError, match="not a finished cache: no manifest.json .an unfinished build"):
        open_cache(url, storage_options=s3.options())  # ...and invisible: no manifest, no shard record
    assert run_cli("cache", "verify", url).exit_code != 0
    store = Storage(url, s3.options())
    assert finished_record(store, 0, 0, 8) is not None and finished_record(store, 1, 8, 8) is None

    r = run_cli("cache", "build", cfg_path, "--set", f"cache.dir={url}")  # the rerun, in this process
    assert r.exit_code == 0, r.output
    assert f"removing the lock left by pid {killed_pid}" in r.output  # the killed builder's lock object, taken over
    assert "resuming, 1 of 3 shards already written" in r.output
    assert_same_cache(open_cache(local), open_cache(url, storage_options=s3.options()))
    keys = s3.keys(url)
    assert ".lock" not in keys and "build.json" not in keys
    # shard 0 was reused as stored (one version of each object), the half-written shard 1 replaced
    bucket, prefix = url[len("s3://"):].split("/", 1)
    versions = s3.client.list_object_versions(Bucket=bucket, Prefix=prefix + "/shards/")["Versions"]
    count: dict[str, int] = {}
    for v in versions:
        count[v["Key"][len(prefix) + 1:]] = count.get(v["Key"][len(prefix) + 1:], 0) + 1
    assert all(count[k] == 1 for k in keys if k.startswith("shards/shard-00000")), count
    assert any(count[k] > 1 for k in half if k in count)
    assert open_cache(url, storage_options=s3.options()).verify() == []


def test_second_builder_refused_on_an_object_store(tiny_config, s3):
    url = s3.url()
    cfg_path, _ = tiny_config(data__num_sequences=8, cache__storage_options=s3.options())
    store = Storage(url, s3.options())
    lock = ObjectLock(store)
    lock.acquire()  # a live builder (this process)
    try:
        r = run_cli("cache", "build", cfg_path, "--set", f"cache.dir={url}")
        assert r.exit_code == 2 and "being built by another process" in r.output and r.output.count("\n") == 1
        assert f"{url}/.lock" in r.output and f"pid {os.getpid()}" in r.output
    finally:
        lock.release()
    assert s3.keys(url) == []
    # a lock left on another host is never taken over: the error says to delete it
    with store.open(".lock", "wb") as f:
        f.write(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "since": "then"}).encode())
    r = run_cli("cache", "build", cfg_path, "--set", f"cache.dir={url}")
    assert r.exit_code == 2 and "pid 1 on elsewhere" in r.output and "delete it" in r.output
    assert s3.keys(url) == [".lock"]


def test_train_from_an_s3_cache_equals_training_from_a_local_one(tmp_path, s3):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "tests" / "train" / "conftest.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    teacher, student = tiny.tiny_pair(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text("loss: {alpha: 0.5, beta: 0.3, gamma: 0.2, temperature: 1.0}\n")
    url = s3.url()
    options = dict(s3.options(), key="testing", secret="testing")
    logs = {}
    for name, cache_dir in (("local", str(tmp_path / "cache")), ("s3", url)):
        overrides = tiny.base_overrides(tmp_path, teacher, student, cache_dir) + [_options_arg(options)]
        sets = [x for o in overrides for x in ("--set", o)]
        r = run_cli("cache", "build", config, *sets)
        assert r.exit_code == 0, r.output
        out = tmp_path / f"run-{name}"
        training = tiny.training_overrides(out, max_steps=2)
        r = run_cli("train", config, *sets, *[x for o in training for x in ("--set", o)])
        assert r.exit_code == 0, r.output
        run = json.loads((out / "run.json").read_text())
        assert run["mode"] == "cache" and run["cache"]["dir"] == cache_dir
        assert run["config"]["cache"]["storage_options"] == {"endpoint_url": s3.endpoint, "key": "***", "secret": "***"}
        state = json.loads((out / "trainer_state.json").read_text())
        logs[name] = [{k: v for k, v in h.items() if k.startswith("loss")} for h in state["log_history"] if "loss" in h]
    assert logs["s3"] == logs["local"] and len(logs["s3"]) == 2

    # DataLoader workers (forked after the parent opened the cache) each open their own filesystem
    import torch

    from pipeline.train.dataset import CacheDataset

    remote = CacheDataset(url, "train", [2, 4], 1.0, storage_options=options)
    local = CacheDataset(str(tmp_path / "cache"), "train", [2, 4], 1.0)
    loader = torch.utils.data.DataLoader(remote, batch_size=1, num_workers=2, collate_fn=lambda rows: rows[0],
                                         multiprocessing_context="fork")
    items = list(loader)
    assert len(items) == len(local) > 2
    for i, item in enumerate(items):
        assert item.keys() == local[i].keys()
        assert all(np.array_equal(item[k], local[i][k]) for k in item), i


def test_bad_urls_one_line_nothing_written(tiny_config, s3, monkeypatch, endpoint_from_fsspec_config):
    import importlib.util

    from pipeline import phase_one as build

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded before the URL was checked")

    monkeypatch.setattr(build.models, "load_weights", no_teacher)
    cfg_path, _ = tiny_config(data__num_sequences=8, cache__storage_options=s3.options())
    buckets = sorted(b["Name"] for b in s3.client.list_buckets()["Buckets"])
    cases = [("s3://no-such-bucket/cache", "cache.dir: bucket no-such-bucket does not exist"),
             ("nope://somewhere/cache", "cache.dir: unknown storage protocol nope://")]
    if importlib.util.find_spec("gcsfs") is None:
        cases.append(("gs://some-bucket/cache", "cache.dir: no fsspec backend for gs:// is installed (Please install gcsfs"))
    for url, message in cases:
        r = run_cli("cache", "build", cfg_path, "--set", f"cache.dir={url}")
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: ") and message in r.output and r.output.count("\n") == 1, r.output
    assert sorted(b["Name"] for b in s3.client.list_buckets()["Buckets"]) == buckets  # never created
    # reading: a missing cache or bucket is one line too
    for url in ("s3://no-such-bucket/cache", s3.url()):
        r = run_cli("cache", "verify", url)
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    with pytest.raises(PipelineError, match="cache directory not found: s3://no-such-bucket/cache"):
        open_cache("s3://no-such-bucket/cache", storage_options=s3.options())
    # options the backend rejects: its own words, on one line, not "bucket does not exist"
    r = run_cli("cache", "build", cfg_path, "--set", f"cache.dir={s3.url()}", "--set", "cache.storage_options={bogus_option: 1}")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert f"cache.dir: cannot reach bucket {BUCKET} (TypeError: " in r.output and "bogus_option" in r.output


def test_changed_config_refused_then_overwritten_on_an_object_store(tiny_config, s3):
    url = s3.url()
    cfg_path, _ = tiny_config(data__num_sequences=8, cache__storage_options=s3.options(), cache__dir=url)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    before = s3.keys(url)
    store = Storage(url, s3.options())
    manifest = store.read_json("manifest.json")
    again = run_cli("cache", "build", cfg_path)
    assert again.exit_code == 0 and "already complete" in again.output
    r = run_cli("cache", "build", cfg_path, "--set", "cache.topk=4")
    assert r.exit_code == 2 and "--overwrite" in r.output and r.output.count("\n") == 1
    assert store.read_json("manifest.json") == manifest and s3.keys(url) == before
    r = run_cli("cache", "build", cfg_path, "--set", "cache.topk=4", "--overwrite")
    assert r.exit_code == 0, r.output
    c = open_cache(url, storage_options=s3.options())
    assert c.manifest["topk"] == 4 and c.verify() == [] and s3.keys(url) == before  # nothing of the old build left
