"""The rows a step's losses read, against masks written out by hand."""

from __future__ import annotations

import torch

from pipeline.train.trainer import positions


def _reference(B: int, T: int, lengths: list[int]):
    valid = torch.tensor([[t < n for t in range(T)] for n in lengths])
    nxt = torch.tensor([[t < n - 1 for t in range(T)] for n in lengths])
    return valid.long(), valid.reshape(-1).nonzero().squeeze(-1), nxt.reshape(-1).nonzero().squeeze(-1)


def test_unpadded_rows_are_built_without_a_search(monkeypatch):
    ids = torch.zeros(3, 5, dtype=torch.long)

    def no_search(*a, **k):
        raise AssertionError("an unpadded batch needs no nonzero (a host sync on a GPU)")

    monkeypatch.setattr(torch.Tensor, "nonzero", no_search)
    attention, tokens, nxt = positions(ids, None)
    monkeypatch.undo()
    assert attention is None and tokens is None
    assert torch.equal(nxt, _reference(3, 5, [5, 5, 5])[2])


def test_padded_rows():
    ids = torch.zeros(3, 5, dtype=torch.long)
    lengths = [5, 2, 1]
    got = positions(ids, torch.tensor(lengths))
    for g, r in zip(got, _reference(3, 5, lengths)):
        assert torch.equal(g, r)
