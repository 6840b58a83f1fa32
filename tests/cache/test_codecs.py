"""Round-trip bounds of every hidden codec and losslessness of the top-k side-data transform."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache.codecs import (
    HIDDEN_CODECS, compress_chunk, decode_lse, decode_topk_ids, decode_topk_logits, decompress_chunk, encode_lse,
    encode_topk_ids, encode_topk_logits, frequency_order, from_planes, host_array, pack_order, rank_table, to_planes,
    unpack_order,
)
from pipeline.errors import PipelineError


def _hidden(seed=0):
    rng = np.random.default_rng(seed)
    # block outputs: a few large outlier channels, norms growing with depth
    x = rng.normal(0, 1, (3, 16, 64)).astype(np.float32)
    x[..., 5] *= 80
    x[1] *= 300
    x[2, 3] = 0.0  # an all-zero vector
    return x


def test_fp32_lossless():
    x = _hidden()
    c = HIDDEN_CODECS.get("fp32")
    assert np.array_equal(c.decode(c.encode(x)), x)


def test_bf16_bound_and_idempotent():
    x = _hidden()
    c = HIDDEN_CODECS.get("bf16")
    y = c.decode(c.encode(x))
    assert np.all(np.abs(y - x) <= 2.0**-8 * np.abs(x))
    assert np.array_equal(c.decode(c.encode(y)), y)  # lossless for values already bf16


def test_fp16_bound():
    x = _hidden()
    c = HIDDEN_CODECS.get("fp16")
    y = c.decode(c.encode(x))
    normal = np.abs(x) >= 6.2e-5
    assert np.all(np.abs(y - x)[normal] <= 2.0**-11 * np.abs(x)[normal])


def test_int8_bound():
    x = _hidden()
    c = HIDDEN_CODECS.get("int8")
    enc = c.encode(x)
    assert enc[""].dtype == np.int8 and enc["scale"].dtype == np.float16
    y = c.decode(enc)
    absmax = np.abs(x).max(-1, keepdims=True)
    assert np.all(np.abs(y - x) <= absmax / 254 * (1 + 2**-9) + 1e-12)
    assert np.array_equal(y[2, 3], np.zeros(64, np.float32))
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-30)
    assert cos[np.linalg.norm(x, axis=-1) > 0].min() > 0.999


def test_unknown_codec_lists_valid():
    with pytest.raises(PipelineError, match="bf16, fp16, fp32, int8"):
        HIDDEN_CODECS.get("zip")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint16])
def test_topk_logit_transform_is_lossless(dtype):
    rng = np.random.default_rng(1)
    if dtype == np.uint16:  # bf16 bit patterns
        import torch

        vals = torch.from_numpy(rng.normal(5, 8, (4, 6, 10)).astype(np.float32)).bfloat16()
        x = vals.view(torch.int16).numpy().view(np.uint16)
    else:
        x = rng.normal(5, 8, (4, 6, 10)).astype(dtype)
    x = np.ascontiguousarray(np.sort(x.view(dtype), axis=-1)[..., ::-1]) if dtype != np.uint16 else x
    x[0, 0, :3] = x[0, 0, 0]  # ties
    if dtype != np.uint16:
        x[1, 0, 2] = -0.0
        x[2] = rng.normal(size=x[2].shape).astype(dtype)  # unsorted rows round-trip too
    width = x.dtype.itemsize
    bits = x.view({2: np.uint16, 4: np.uint32}[width])[..., 0].astype(np.uint64)
    negative = bits >> (8 * width - 1) == 1
    keys = np.where(negative, ~bits & ((1 << 8 * width) - 1), bits | (1 << (8 * width - 1)))
    high = (keys >> (8 * width - 8)).astype(np.uint8)  # most significant byte of each position's first key
    for slot_major in (True, False):
        planes = encode_topk_logits(x, slot_major=slot_major)
        y = decode_topk_logits(planes, x.dtype, 4, 6, 10, slot_major=slot_major)
        assert y.dtype == x.dtype
        assert np.array_equal(y.view(np.uint8), x.view(np.uint8))
        if slot_major:  # the stream opens with every position's first key
            assert np.array_equal(planes[: 4 * 6], high.reshape(-1))
        else:  # position by position: every 10th value is a position's first key
            assert np.array_equal(planes[: 4 * 6 * 10 : 10], high.reshape(-1))


def test_lse_planes_lossless():
    rng = np.random.default_rng(3)
    lse = (rng.normal(10, 5, (3, 17)) * 10.0 ** rng.integers(-3, 3, (3, 17))).astype(np.float32)
    lse[0, :2] = (-0.0, np.float32(1e-40))  # signed zero, a subnormal
    planes = encode_lse(lse)
    assert planes.dtype == np.uint8 and planes.shape == (3, 4 * 17)
    assert np.array_equal(planes[:, :17], (lse.view(np.uint32) >> 24).astype(np.uint8))  # sign/exponent plane first
    assert np.array_equal(decode_lse(planes).view(np.uint32), lse.view(np.uint32))


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65535), (np.uint32, 262143)])
def test_id_ranks_lossless(dtype, high):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, high + 1, (3, 5, 7)).astype(dtype)
    corpus = np.concatenate([np.full(50, 7), np.full(20, high), rng.integers(0, high + 1, 300)])
    order = frequency_order(corpus, high + 1, dtype)
    assert order.dtype == dtype and order[0] == 7 and order[1] == high  # most frequent first
    assert np.array_equal(np.sort(order), np.arange(high + 1))  # a permutation of the vocabulary
    counts = np.bincount(corpus, minlength=high + 1)
    assert (np.diff(counts[order]) <= 0).all()
    rank_of = rank_table(order)
    assert np.array_equal(order[rank_of], np.arange(high + 1))
    planes = encode_topk_ids(ids, rank_of)
    assert np.array_equal(from_planes(planes[None], ids.itemsize), rank_of[ids].reshape(1, -1))
    assert np.array_equal(decode_topk_ids(planes, order, 3, 5, 7), ids)
    for compressor in ("brotli", "zstd"):
        blob = compress_chunk(planes, compressor)
        assert np.array_equal(decompress_chunk(blob, planes.size, compressor), planes)
    packed = pack_order(order)
    assert np.array_equal(unpack_order(packed, high + 1, dtype), order)
    # the unused tokens follow in id order and cost almost nothing: ~ bytes per distinct corpus token
    assert len(packed) < 8 * len(np.unique(corpus)) + 256 < order.nbytes // 10
    planes = to_planes(ids.reshape(3, -1))
    assert planes.dtype == np.uint8 and np.array_equal(from_planes(planes, ids.itemsize), ids.reshape(3, -1))


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "int8"])
def test_torch_encode_is_bit_identical(name):
    """The on-device encoder writes exactly the host encoder's bytes (here on the CPU device), including
    ties in the int8 rounding, scales that need rounding up, zero vectors and fp16 overflow."""
    import torch

    x = _hidden()
    x[0, 0, :4] = [0.5, 1.5, -2.5, 127.0]  # ties at scale 1 after the absmax row below
    x[0, 0, 4] = -127.0
    x[0, 1] = np.linspace(-1e5, 1e5, x.shape[-1])  # beyond fp16's range
    rng = np.random.default_rng(1)
    y = np.concatenate([x, rng.standard_t(2, (5, 16, 64)).astype(np.float32) * 3.7])
    c = HIDDEN_CODECS.get(name)
    host = c.encode(y)
    dev = {suffix: host_array(t) for suffix, t in c.encode_torch(torch.from_numpy(y)).items()}
    assert sorted(host) == sorted(dev)
    for suffix in host:
        assert host[suffix].dtype == dev[suffix].dtype and host[suffix].shape == dev[suffix].shape
        assert host[suffix].tobytes() == dev[suffix].tobytes(), suffix
