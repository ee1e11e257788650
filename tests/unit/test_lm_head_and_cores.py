"""The CPU LM head (oneDNN) and the cores shared by the models' forwards (fast tier)."""

from __future__ import annotations

import threading

import pytest
import torch

from coolfusion.runtime import lm_head
from coolfusion.runtime.core_share import CoreShare


class _Tied(torch.nn.Module):
    """An input embedding whose weights the output head shares, as both embedded models do."""

    def __init__(self, vocab: int = 5000, hidden: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.head


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_the_onednn_head_gives_f_linear_values_for_every_row_count_and_leaves_the_weights_alone():
    torch.manual_seed(0)
    model = _Tied()
    keys = set(model.state_dict())
    lm_head.install(model)
    lm_head.install(model)  # idempotent
    assert model.head.forward.__func__ is lm_head._forward
    assert set(model.state_dict()) == keys and model.head.weight is model.embed.weight
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 7, 8, 9, 16, 64):
            x = torch.randn(1, rows, 64)
            got, want = model.head(x), torch.nn.functional.linear(x, model.embed.weight)
            assert got.shape == want.shape == (1, rows, 5000)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_the_head_is_left_as_it_is_where_onednn_does_not_apply():
    model = _Tied()
    model.half()  # not float32
    lm_head.install(model)
    assert getattr(model.head.forward, "__func__", None) is not lm_head._forward


def _inside(share: CoreShare, items: int, entered: threading.Event, release: threading.Event, seen: list):
    with share.forward(items) as n:
        seen.append((n, torch.get_num_threads()))
        entered.set()
        release.wait(5)


def test_a_forward_alone_takes_every_thread_one_beside_it_its_share_unless_it_carries_one_item():
    share = CoreShare(threads=4)
    share.join()
    share.join()  # two runners
    with share.forward(items=8) as n:
        assert n == 4 and torch.get_num_threads() == 4  # alone: every thread
        for items, want in ((8, 2), (1, 4)):  # beside it: its share; one item: every thread
            seen: list = []
            entered, release = threading.Event(), threading.Event()
            t = threading.Thread(target=_inside, args=(share, items, entered, release, seen))
            t.start()
            assert entered.wait(5)
            release.set()
            t.join()
            assert seen == [(want, want)]
    assert share.running == 0
    share.leave()
    share.leave()
    assert share.members == 0
