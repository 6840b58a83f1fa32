"""A cache build on a disk that fills up: one line that says what is written, what the rest needs and that a
rerun resumes; no manifest; the rerun after freeing space completes and equals a build that never ran short.
On small tmpfs mounts (root only; skipped, with the reason, where none can be mounted)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from tests.cache.test_build import assert_same_cache
from tests.tmpfs import resize, tmpfs
from tests.train.conftest import base_overrides, tiny_pair

def used(path: Path) -> int:
    return shutil.disk_usage(path).used


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, --set overrides without cache.dir, reference cache folder, bytes it takes on a tmpfs)."""
    root = tmp_path_factory.mktemp("diskfull")
    teacher, student = tiny_pair(root)
    overrides = [o for o in base_overrides(root, teacher, student, "unused") if not o.startswith("cache.dir=")]
    overrides += ["data.num_sequences=48", "cache.topk=8", "cache.logit_dtype=fp16", "cache.hidden_codec=bf16"]
    config = root / "cache.yaml"
    config.write_text("cache: {shard_sequences: 8, chunk_sequences: 4}\n")
    ref = root / "ref"
    with tmpfs(root / "measure", 64 * 2**20) as mnt:
        r = build(config, overrides, mnt / "cache")
        assert r.exit_code == 0, r.output
        size = used(mnt)
        shutil.copytree(mnt / "cache", ref)
    return config, overrides, ref, size


def build(config, overrides, cache_dir):
    sets = [x for o in [*overrides, f"cache.dir={cache_dir}"] for x in ("--set", o)]
    return run_cli("cache", "build", config, *sets)


def full_disk_error(line: str, cache: Path) -> int:
    """The number of finished shards the full-disk error line reports, after checking the line and the folder:
    no manifest, no partial file left, one shard summary per finished shard."""
    m = re.fullmatch(rf"error: cache\.dir {re.escape(str(cache))}: no space left on device: "
                     r"([\d.]+ [KM]?i?B) written, (\d) of 6 shards finished; the other (\d+) sequences need "
                     r"about ([\d.]+ [KM]?i?B) more \(([\d.]+ [KM]?i?B) per sequence, measured on the finished "
                     r"shards\); free that much and rerun the same command: it resumes from the finished shards",
                     line)
    assert m, line
    finished = int(m.group(2))
    assert int(m.group(3)) == 48 - 8 * finished
    assert not (cache / "manifest.json").exists()
    assert sorted(p.name for p in (cache / "shards").iterdir() if p.name.endswith(".tmp")) == []  # freed
    assert len(list((cache / "shards").glob("*.json"))) == finished
    return finished


@pytest.mark.parametrize("fraction", [0.4, 0.9])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(setup, tmp_path, fraction):
    config, overrides, ref, size = setup
    with tmpfs(tmp_path / "mnt", int(size * fraction)) as mnt:
        cache = mnt / "cache"
        r = build(config, overrides, cache)
        assert r.exit_code == 2, r.output
        errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in r.output, r.output
        finished = full_disk_error(errors[0], cache)
        assert 1 <= finished < 6

        if fraction < 0.5:  # rerun on the same full disk: the finished shards' measure warns first, then it fails again
            r = build(config, overrides, cache)
            assert r.exit_code == 2 and f"resuming, {finished} of 6 shards already written" in r.output, r.output
            warning = [line for line in r.output.splitlines() if line.startswith("warning: ")]
            assert len(warning) == 1 and ", the rest needs about " in warning[0], r.output
            assert warning[0].endswith(f"per sequence x {48 - 8 * finished} sequences, measured on the finished "
                                       "shards); the build may stop on a full disk (rerunning it then resumes)"), warning
            # Where the disk fills depends on the order in which the writer's threads finish their chunks, so
            # this run may finish a shard more than the first before it stops.
            errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, r.output
            again = full_disk_error(errors[0], cache)
            assert finished <= again < 6
            finished = again

        resize(mnt, 2 * size)  # space freed: the same command resumes and completes
        r = build(config, overrides, cache)
        assert r.exit_code == 0, r.output
        assert f"resuming, {finished} of 6 shards already written" in r.output
        assert "warning" not in r.output
        assert run_cli("cache", "verify", cache).exit_code == 0
        assert_same_cache(cache, ref)


def test_clearly_short_space_is_a_warning_first(setup, tmp_path):
    """Free space under half the config's uncompressed estimate: one warning line before the first shard; the
    disk then fills before any shard is finished, and the error's estimate is the config's."""
    config, overrides, _, size = setup
    with tmpfs(tmp_path / "mnt", size // 10) as mnt:
        r = build(config, overrides, mnt / "cache")
        assert r.exit_code == 2, r.output
        lines = [line.split("\r")[-1] for line in r.output.splitlines()]
        warnings = [line for line in lines if line.startswith("warning: ")]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(warnings) == 1 and len(errors) == 1, r.output
        # 170 B/token before compression: 2 (id) + 2 x 4 (lse) + 8 x (2 + 2) (top-k) + 2 x 32 x 2 (layers 2, 4 in bf16)
        assert re.fullmatch(rf"warning: cache\.dir {re.escape(str(mnt / 'cache'))}: [\d.]+ KiB free, the cache needs "
                            r"about 255\.0 KiB \(5\.3 KiB per sequence x 48 sequences, an uncompressed estimate from "
                            r"the config\); the build may stop on a full disk \(rerunning it then resumes\)", warnings[0])
        assert errors[0].endswith(": no space left on device: 0 B written, 0 of 6 shards finished; the other 48 "
                                  "sequences need about 255.0 KiB more (5.3 KiB per sequence, an uncompressed estimate "
                                  "from the config); free that much and rerun the same command: it resumes from the "
                                  "finished shards")
        assert not (mnt / "cache" / "manifest.json").exists()
        assert not [p for p in (mnt / "cache" / "shards").iterdir() if p.name.endswith(".tmp")]
