"""Building, reading, verifying, resuming and refusing caches, on a tiny random teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from pipeline.cache import open_cache
from pipeline.cache.reader import Cache
from pipeline.cache.directory import BuildLock
from pipeline.cache.manifest import FORMAT_VERSION
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.sequences import sequences_from_config
from pipeline.errors import PipelineError
from pipeline.sources.models import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_same_cache(a, b):
    """Two caches (folders, or open caches of any storage) hold the same manifest (shard checksums included;
    the `build` record says how each was built: its processes) and the same decoded arrays."""
    ca, cb = (c if isinstance(c, Cache) else open_cache(c) for c in (a, b))
    assert {k: v for k, v in ca.manifest.items() if k != "build"} == {k: v for k, v in cb.manifest.items() if k != "build"}
    for i in range(len(ca)):
        sa, sb = ca[i], cb[i]
        for key in ("input_ids", "topk_ids", "topk_logits"):
            assert np.array_equal(sa[key], sb[key]), (i, key)
        for t in sa["lse"]:
            assert np.array_equal(sa["lse"][t], sb["lse"][t]), (i, t)
        assert sa["hidden"].keys() == sb["hidden"].keys()
        for layer in sa["hidden"]:
            assert np.array_equal(sa["hidden"][layer], sb["hidden"][layer]), (i, layer)


def test_build_read_matches_dense_teacher(tiny_config, tiny_teacher):
    cfg_path, cache_dir = tiny_config(cache__logit_dtype="fp32", cache__hidden_codec="fp32", cache__topk=49152,
                                      data__num_sequences=10)
    r = run_cli("cache", "build", cfg_path)
    assert r.exit_code == 0, r.output
    c = open_cache(cache_dir)
    cfg = load_config(cfg_path)
    seqs = sequences_from_config(cfg.data, load_tokenizer(str(tiny_teacher)))
    assert len(c) == 10 and c.split == {"train": [0, seqs.n_train], "heldout": [seqs.n_train, 10]}
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    ids = torch.from_numpy(seqs.input_ids).long()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    logits = out.logits.float()
    for i in (0, 5, 9):  # across shards and chunks
        s = c[i]
        assert np.array_equal(s["input_ids"], seqs.input_ids[i])
        # k = V and fp32: the cache holds the full distribution, exactly
        full = np.zeros_like(s["topk_logits"])
        np.put_along_axis(full, s["topk_ids"], s["topk_logits"], axis=-1)
        np.testing.assert_allclose(full, logits[i].numpy(), rtol=1e-6, atol=1e-5)
        for t in (1.0, 2.0):
            np.testing.assert_allclose(s["lse"][t], torch.logsumexp(logits[i] / t, -1).numpy(), rtol=1e-6)
        np.testing.assert_allclose(s["hidden"][2], out.hidden_states[2][i].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s["hidden"][0], out.hidden_states[0][i].numpy(), rtol=1e-6, atol=1e-6)
    verify = run_cli("cache", "verify", cache_dir)
    assert verify.exit_code == 0 and f"OK (format {FORMAT_VERSION}," in verify.output
    info = run_cli("cache", "info", cache_dir, "--json")
    assert json.loads(info.output)["sequences"] == 10
    assert json.loads(info.output)["format_version"] == FORMAT_VERSION == 3
    assert json.loads(info.output)["hidden_compressor"] == "zstd"
    assert "format       3; fingerprint" in run_cli("cache", "info", cache_dir).output
    # a damaged id table (stored once, in the manifest) is named before anything is decoded with it
    good = (cache_dir / "manifest.json").read_text()
    manifest = json.loads(good)
    packed = manifest["id_order"]["packed"]
    manifest["id_order"]["packed"] = ("B" if packed[7] == "A" else "A").join((packed[:7], packed[8:]))
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("cache", "verify", cache_dir)
    assert r.exit_code == 2 and "the id table (id_order) is damaged" in r.output
    with pytest.raises(PipelineError, match="id table"):
        open_cache(cache_dir)
    (cache_dir / "manifest.json").write_text(good)
    # a cache of another format version: one line naming both versions and the way out
    manifest = json.loads(good)
    manifest["format_version"] = manifest["fingerprint"]["format_version"] = 2
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("cache", "verify", cache_dir)
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "holds a format-2 cache (this code reads and writes format 3)" in r.output and "--overwrite" in r.output
    # building over it says what is there; --overwrite replaces it
    r = run_cli("cache", "build", cfg_path)
    assert r.exit_code == 2 and "holds a format-2 cache (this code reads and writes format 3)" in r.output
    assert "--overwrite" in r.output and json.loads((cache_dir / "manifest.json").read_text())["format_version"] == 2
    assert run_cli("cache", "build", cfg_path, "--overwrite").exit_code == 0
    assert open_cache(cache_dir).manifest["format_version"] == 3


@pytest.mark.parametrize("logit_dtype", ["fp16", "bf16"])
def test_reader_tails_are_the_full_vocabulary_tails(tiny_config, tiny_teacher, logit_dtype):
    """Through the writer and reader: the tail implied by the stored (rounded) top-k logits and the stored
    lse is the teacher's full-softmax tail outside those ids (float64 dense forward), to the lse's float32
    rounding, at every cached temperature."""
    from tests.teacher.test_capture import check_tail_criteria, ulp

    cfg_path, cache_dir = tiny_config(data__num_sequences=4, cache__logit_dtype=logit_dtype,
                                      cache__temperatures=[1.0, 2.0, 0.5])
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    c = open_cache(cache_dir)
    seqs = sequences_from_config(load_config(cfg_path).data, load_tokenizer(str(tiny_teacher)))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(seqs.input_ids).long()).logits.double()
    for i in range(len(c)):
        s = c[i]
        ids = torch.from_numpy(s["topk_ids"])
        for t in (1.0, 2.0, 0.5):
            log_p = torch.log_softmax(logits[i] / t, -1)
            true = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1).exp().numpy()
            lse = s["lse"][t].astype(np.float64)
            implied = -np.expm1(torch.logsumexp(torch.from_numpy(s["topk_logits"]).double() / t
                                                - torch.from_numpy(lse).unsqueeze(-1), -1).numpy())
            err, bound = np.abs(implied - true), ulp(lse) + 2.0 ** -21
            assert (err <= bound).all(), f"T={t}: tail off by {err.max():.3g}"
            check_tail_criteria(f"T={t}", implied, true)


@pytest.mark.parametrize("codec", ["bf16", "fp16", "int8"])
def test_hidden_codecs_in_cache(tiny_config, codec):
    cfg_path, cache_dir = tiny_config(cache__hidden_codec=codec, data__num_sequences=8)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    c = open_cache(cache_dir)
    assert c.manifest["hidden_codec"] == codec
    h = c[3]["hidden"][4]
    assert h.dtype == np.float32 and h.shape == (32, 32) and np.isfinite(h).all()
    # a layer selection decodes only those layers, to the same values
    cached = c.layers
    assert len(cached) > 1
    some = open_cache(cache_dir, layers=[cached[-1]])
    assert some.layers == cached and list(some[3]["hidden"]) == [cached[-1]]
    assert np.array_equal(some[3]["hidden"][cached[-1]], c[3]["hidden"][cached[-1]])
    with pytest.raises(PipelineError, match="not in the cache"):
        open_cache(cache_dir, layers=[99])


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_hidden_chunk_files_read_directly_equal_zarr_reads(tiny_config, codec, monkeypatch):
    """The reader reads and Blosc-decodes the hidden chunk files itself: every layer of every sequence (edge
    chunks included, and int8's scale arrays) equals what zarr reads from the same arrays."""
    from pipeline.cache import reader as reader_module

    cfg_path, cache_dir = tiny_config(cache__hidden_codec=codec, data__num_sequences=11, cache__chunk_sequences=2,
                                      cache__shard_sequences=4)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    direct = open_cache(cache_dir)
    items = [direct[i]["hidden"] for i in range(len(direct))]
    arrays = [a for _, layers in direct._files.values() for parts in layers.values() for a in parts.values()]
    assert arrays and all(a.direct for a in arrays)
    monkeypatch.setattr(reader_module._HiddenArray, "read", lambda self, chunk, r0, n: self.array[r0:r0 + n])
    through_zarr = open_cache(cache_dir)
    for i, hidden in enumerate(items):
        for layer, h in hidden.items():
            assert np.array_equal(h, through_zarr[i]["hidden"][layer]), (i, layer)


def test_padded_sequences_store_lengths(tiny_config):
    cfg_path, cache_dir = tiny_config(data__packing=False, data__num_sequences=8)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    c = open_cache(cache_dir)
    lengths = [c[i]["length"] for i in range(len(c))]
    assert all(2 <= n <= 32 for n in lengths) and len(set(lengths)) > 1


def test_flipped_byte_fails_verify_naming_file(tiny_config):
    cfg_path, cache_dir = tiny_config(data__num_sequences=8)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    victim = next(p for p in sorted((cache_dir / "shards").rglob("*")) if p.is_file() and "layer_2" in str(p)
                  and p.name != "zarr.json")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    r = run_cli("cache", "verify", cache_dir)
    assert r.exit_code != 0
    assert str(victim.relative_to(cache_dir)) in r.output
    arrow = next((cache_dir / "shards").glob("*.arrow"))
    raw = bytearray(arrow.read_bytes())
    raw[100] ^= 0xFF
    arrow.write_bytes(bytes(raw))
    assert "shard-00000.arrow" in run_cli("cache", "verify", cache_dir).output


def test_changed_config_refused_then_overwritten(tiny_config):
    cfg_path, cache_dir = tiny_config(data__num_sequences=8)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    before = (cache_dir / "manifest.json").read_text()
    again = run_cli("cache", "build", cfg_path)  # same config: nothing to do
    assert again.exit_code == 0 and "already complete" in again.output
    r = run_cli("cache", "build", cfg_path, "--set", "cache.topk=4")
    assert r.exit_code == 2 and "--overwrite" in r.output and r.output.count("\n") == 1
    assert (cache_dir / "manifest.json").read_text() == before
    r = run_cli("cache", "build", cfg_path, "--set", "cache.topk=4", "--overwrite")
    assert r.exit_code == 0
    assert open_cache(cache_dir).manifest["topk"] == 4


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_writer_threads_write_the_same_bytes(tiny_config, tmp_path, codec):
    """Encoding on 1 thread and on 4 threads gives byte-identical shards: every file checksum (in the
    manifest) and every decoded value agree."""
    cfg_path, _ = tiny_config(data__num_sequences=24, cache__hidden_codec=codec, cache__shard_sequences=8,
                              cache__chunk_sequences=4)
    one, four = tmp_path / "one", tmp_path / "four"
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={one}", "--set", "cache.writer_threads=1").exit_code == 0
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={four}", "--set", "cache.writer_threads=4").exit_code == 0
    assert_same_cache(one, four)
    assert len(open_cache(one).manifest["shards"]) == 3


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_encoding_on_the_device_writes_the_same_bytes(tiny_config, tmp_path, codec):
    """cache.encode_on device (the teacher's device, here the CPU) vs the writer threads: identical shard
    files and values; the train-split mean squares agree to the device's float32 sums of squares: d = 32
    positive terms, each squared with one rounding and summed in any order with d - 1 more, so at most
    d * 2^-24 relative to the sum (the writer's are float64)."""
    cfg_path, _ = tiny_config(data__num_sequences=24, cache__hidden_codec=codec, data__heldout_fraction=0.25)
    dev, host = tmp_path / "dev", tmp_path / "host"
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={dev}", "--set", "cache.encode_on=device").exit_code == 0
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={host}", "--set", "cache.encode_on=writer").exit_code == 0
    md, mh = open_cache(dev).manifest, open_cache(host).manifest
    assert [s["checksum"] for s in md["shards"]] == [s["checksum"] for s in mh["shards"]]
    assert md["hidden_mean_square"].keys() == mh["hidden_mean_square"].keys()
    for layer, v in mh["hidden_mean_square"].items():
        assert abs(md["hidden_mean_square"][layer] - v) <= 32 * 2.0**-24 * v
    md.pop("hidden_mean_square"), mh.pop("hidden_mean_square")
    assert md == mh


def test_lz4_hidden_states_read_back_the_same(tiny_config, tmp_path):
    """cache.hidden_compressor lz4 changes the bytes on disk, never the decoded values; it is part of the
    fingerprint (another config for a finished zstd cache)."""
    cfg_path, cache_dir = tiny_config(data__num_sequences=16)
    lz4 = tmp_path / "lz4"
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={lz4}", "--set", "cache.hidden_compressor=lz4").exit_code == 0
    a, b = open_cache(cache_dir), open_cache(lz4)
    zarr_json = json.loads((lz4 / "shards" / "shard-00000.zarr" / "layer_2" / "zarr.json").read_text())
    assert "lz4" in json.dumps(zarr_json["codecs"])
    assert a.manifest["shards"][0]["checksum"] != b.manifest["shards"][0]["checksum"]
    for i in range(len(a)):
        for layer in a[i]["hidden"]:
            assert np.array_equal(a[i]["hidden"][layer], b[i]["hidden"][layer])
    r = run_cli("cache", "build", cfg_path, "--set", "cache.hidden_compressor=lz4")
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_zstd_side_data_reads_back_the_same(tiny_config, tmp_path):
    """cache.side_compressor zstd changes the top-k blobs, never the decoded ids, logits or lse; it is part
    of the fingerprint and the manifest, and `cache info` names it. auto is zstd when hidden layers are
    cached, brotli when the side data is the whole cache."""
    cfg_path, cache_dir = tiny_config(data__num_sequences=8, cache__logit_dtype="fp16")
    other, bare = tmp_path / "zstd", tmp_path / "no-layers"
    assert run_cli("cache", "build", cfg_path, "--set", "cache.side_compressor=brotli").exit_code == 0
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={other}").exit_code == 0  # auto, layers cached
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={bare}", "--set", "cache.layers=[]").exit_code == 0
    a, b = open_cache(cache_dir), open_cache(other)
    assert a.layers and (a.manifest["side_compressor"], b.manifest["side_compressor"]) == ("brotli", "zstd")
    assert open_cache(bare).manifest["side_compressor"] == "brotli"
    assert a.manifest["fingerprint_digest"] != b.manifest["fingerprint_digest"]
    for i in range(len(a)):
        for key in ("topk_ids", "topk_logits", "input_ids"):
            assert np.array_equal(a[i][key], b[i][key])
        for t in a.temperatures:
            assert np.array_equal(a[i]["lse"][t], b[i]["lse"][t])
    assert "zstd per chunk" in run_cli("cache", "info", other).output


def test_speed_settings_keep_the_fingerprint(tiny_config):
    """The forward batch size and the writer threads are speed settings: a finished cache stays complete."""
    cfg_path, cache_dir = tiny_config(data__num_sequences=8)
    assert run_cli("cache", "build", cfg_path, "--set", "cache.batch_size=4").exit_code == 0
    before = (cache_dir / "manifest.json").read_text()
    for key in ("cache.batch_size=2", "cache.writer_threads=3", "cache.encode_on=device"):
        r = run_cli("cache", "build", cfg_path, "--set", key)
        assert r.exit_code == 0 and "already complete" in r.output, (key, r.output)
    assert (cache_dir / "manifest.json").read_text() == before
    from pipeline.cache.manifest import fingerprint_digest

    fp = json.loads(before)["fingerprint"]
    assert "batch_size" not in json.dumps(fp) and "writer_threads" not in json.dumps(fp)
    changed = json.loads(json.dumps(fp))
    changed["topk"] += 1
    assert fingerprint_digest(changed) != fingerprint_digest(fp)


def test_second_builder_refused(tiny_config):
    cfg_path, cache_dir = tiny_config(data__num_sequences=8)
    lock = BuildLock(cache_dir)
    lock.acquire()
    try:
        r = run_cli("cache", "build", cfg_path)
        assert r.exit_code == 2 and "another process" in r.output
    finally:
        lock.release()
    assert not (cache_dir / "manifest.json").exists()


def test_not_a_cache_dir_never_overwritten(tiny_config):
    cfg_path, cache_dir = tiny_config(data__num_sequences=8)
    cache_dir.mkdir()
    (cache_dir / "precious.txt").write_text("keep me")
    r = run_cli("cache", "build", cfg_path, "--overwrite")
    assert r.exit_code == 2 and "not a cache" in r.output
    assert (cache_dir / "precious.txt").read_text() == "keep me"


def _build_cmd(cfg_path, *extra):
    return [sys.executable, "-m", "pipeline.cli", "cache", "build", str(cfg_path), *extra]


def _file_identities(root: Path, names) -> dict[str, tuple[int, int, int]]:
    """{path: (inode, mtime_ns, ctime_ns)} of every file of the named shards. A rewrite, a rename or a
    copy changes it; a rebuild reproduces the same bytes, so contents alone cannot tell reuse from it."""
    shards = root / "shards"
    files = sorted(p for p in shards.rglob("*")
                   if p.is_file() and p.relative_to(shards).parts[0].split(".")[0] in names)
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in files}


def test_sigkill_then_resume_equals_uninterrupted(tiny_config, tmp_path, monkeypatch):
    # 48 sequences in 6 shards of 8, written in chunks of 4: killed (SIGKILL, by the writer's crash-test
    # hook) with shards 0-1 committed and the first chunk of shard 2 in its *.tmp files
    # The killed build is a child process (the hook kills its own process); the uninterrupted reference and the
    # resuming rerun run in this process (as in test_object_store), the child on this process's thread count.
    cfg_path, cache_dir = tiny_config(data__num_sequences=48, cache__batch_size=2)
    ref = tmp_path / "ref"
    monkeypatch.delenv("DISTILL_CACHE_KILL_AFTER_SHARDS", raising=False)
    assert run_cli("cache", "build", cfg_path, "--set", f"cache.dir={ref}").exit_code == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    killed = subprocess.run(_build_cmd(cfg_path), env=dict(env, DISTILL_CACHE_KILL_AFTER_SHARDS="2"),
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    shards = cache_dir / "shards"
    done = ["shard-00000", "shard-00001"]
    assert sorted(p.stem for p in shards.glob("*.json")) == done
    assert (shards / "shard-00002.arrow.tmp").is_file()
    assert any(p.is_file() and p.name != "zarr.json" for p in (shards / "shard-00002.zarr.tmp").rglob("*"))
    assert not (shards / "shard-00002.arrow").exists() and not (cache_dir / "manifest.json").exists()
    assert run_cli("cache", "verify", cache_dir).exit_code != 0  # unfinished: not a cache yet
    before = _file_identities(cache_dir, done)
    assert len(before) > 2 * 3  # per shard: the record, the Arrow file and the Zarr store's files

    r = run_cli("cache", "build", cfg_path)  # the rerun, in this process
    assert r.exit_code == 0, r.output[-3000:]
    assert "resuming, 2 of 6 shards already written" in r.stderr
    assert _file_identities(cache_dir, done) == before  # reused as they were, not rebuilt
    assert run_cli("cache", "verify", cache_dir).exit_code == 0
    assert_same_cache(cache_dir, ref)
    assert not list(shards.rglob("*.tmp"))


def test_two_process_build_equals_one_process(tiny_config, tmp_path):
    cfg_path, cache_dir = tiny_config(data__num_sequences=40)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    one = tmp_path / "one"
    r1 = subprocess.run(_build_cmd(cfg_path, "--set", f"cache.dir={one}"), env=env, capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "pipeline.cli", "cache", "build", str(cfg_path),
           "--set", f"cache.dir={two}"]
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert_same_cache(one, two)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"data__sources": [{"path": "EMPTY"}]}, "corpus is empty"),
        ({"data__sources": [{"path": "missing/nowhere.jsonl"}]}, "not found"),
        ({"data__sources": [{"path": "no-such-corpus"}]}, "cannot load dataset 'no-such-corpus'"),
        ({"teacher__model": "no-such-teacher"}, "not a packaged name"),
        ({"cache__topk": 50000}, "vocabulary size"),
        ({"data__seq_len": 1}, "data.seq_len"),
        ({"cache__layers": [0, 9]}, "beyond the teacher's depth"),
        ({"cache__temperatures": [1.0, 0.0]}, "cache.temperatures"),
        ({"cache__hidden_codec": "zip"}, "unknown hidden codec"),
        ({"cache__layers": "auto"}, "needs student.model"),
    ],
)
def test_bad_input_one_line_no_cache(tiny_config, tmp_path, overrides, message):
    if overrides.get("data__sources") == [{"path": "EMPTY"}]:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        overrides = {"data__sources": [{"path": str(empty)}]}
    cfg_path, cache_dir = tiny_config(**overrides)
    r = run_cli("cache", "build", cfg_path)
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.startswith("error: ") and r.output.count("\n") == 1
    assert "Traceback" not in r.output
    assert not cache_dir.exists()


def test_seq_len_beyond_positions_refused_before_the_teacher_loads(tiny_config, monkeypatch):
    from pipeline import phase_one as build

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded before data.seq_len was checked")

    monkeypatch.setattr(build.models, "load_weights", no_teacher)
    cfg_path, cache_dir = tiny_config(data__seq_len=100000)
    r = run_cli("cache", "build", cfg_path)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "max_position_embeddings" in r.output, r.output
    assert not cache_dir.exists()


def test_cache_dir_that_is_a_file_refused_in_one_line(tiny_config):
    cfg_path, cache_dir = tiny_config(data__num_sequences=8)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    cache_dir.write_text("not a folder\n")
    r = run_cli("cache", "build", cfg_path)
    assert r.exit_code == 2 and r.output == f"error: cache.dir: {cache_dir} is a file, not a folder; choose another cache.dir\n"
    assert cache_dir.read_text() == "not a folder\n"  # untouched
