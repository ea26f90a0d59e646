"""The flat global state (lightning_diloco/flat.py): its layout, and the outer step on it against torch's SGD."""

from functools import partial
from typing import Any, Optional

import pytest
import torch
from torch import nn

from lightning_diloco.flat import PIECE, FlatLayout, fast_sgd, nesterov_
from lightning_diloco.outer import OuterState


def test_layout_puts_each_bucket_in_one_range_with_aligned_parameters():
    numels = [5, 300, 7, 1000, 2, 64]
    layout = FlatLayout([[0, 1, 2], [3, 4, 5]], numels, alignment=16, bucket_cap_mb=1050 * 4 / 2**20)
    seen = []
    end = 0
    for fragment, params in enumerate([[0, 1, 2], [3, 4, 5]]):
        for bucket in layout.buckets(fragment):
            assert bucket.start == end  # buckets follow each other
            for segment, index in zip(bucket.bucket.segments, bucket.params):
                assert index == params[segment.index] and segment.numel == numels[index]
                assert segment.offset % 16 == 0 and layout.offsets[index] == bucket.start + segment.offset
                seen.append(index)
            end = bucket.start + bucket.numel
    assert sorted(seen) == list(range(6)) and layout.numel == end
    assert len(layout.buckets(1)) == 2  # 1008 + 16 + 64 padded elements do not fit one bucket of 1050


def test_global_parameters_are_views_of_one_buffer_and_keep_their_identity():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    outer = OuterState(module, partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True), "cpu")
    before = [p for p in outer.params]
    values = [p.detach().clone() for p in outer.params]
    outer.arrange(FlatLayout([[0, 1, 2, 3]], [p.numel() for p in outer.params], 8, 1.0))
    assert all(p is q for p, q in zip(outer.params, before))
    for p, value in zip(outer.params, values):
        assert p.untyped_storage().data_ptr() == outer.flat.untyped_storage().data_ptr()
        assert torch.equal(p, value)


def sgd_reference(theta: torch.Tensor, grads: list[torch.Tensor], **options: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    param = nn.Parameter(theta.clone())
    optimizer = torch.optim.SGD([param], **options)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach(), optimizer.state[param].get("momentum_buffer")


@pytest.mark.parametrize("options", [
    {"lr": 0.7, "momentum": 0.9, "nesterov": True},
    {"lr": 0.7, "momentum": 0.9, "nesterov": False},
    {"lr": 1.0, "momentum": 0.0},
])
def test_nesterov_on_flat_buffers_is_torch_sgd_bit_for_bit(options):
    """Over several pieces (a length that is not a multiple of ``PIECE``) and several steps, first one included."""
    generator = torch.Generator().manual_seed(0)
    n = 2 * PIECE + 12345
    theta = torch.randn(n, generator=generator)
    grads = [torch.randn(n, generator=generator) * 1e-2 for _ in range(3)]
    expected, expected_momentum = sgd_reference(theta, grads, **options)
    flat, mu = theta.clone(), options["momentum"]
    momentum = torch.zeros(n) if mu else None
    squared = []
    for step, grad in enumerate(grads):
        squared.append(nesterov_(flat, momentum, grad.clone(), options["lr"], mu, options.get("nesterov", False),
                                 first=step == 0))
    assert torch.equal(flat, expected)
    if mu:
        assert torch.equal(momentum, expected_momentum)
    assert squared[-1] == pytest.approx(float(grads[-1].double().square().sum()), rel=1e-5)


def test_only_plain_sgd_takes_the_fast_path():
    p = [nn.Parameter(torch.zeros(3))]
    assert fast_sgd(torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True)) is not None
    assert fast_sgd(torch.optim.SGD(p, lr=0.7, momentum=0.9, weight_decay=0.1)) is None
    assert fast_sgd(torch.optim.Adam(p)) is None
