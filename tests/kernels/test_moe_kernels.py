"""Grouped expert kernels (issue #15): the reference against a pair-by-pair oracle on the awkward grid,
the routing's pair order, and QuantExperts' forward against one expert at a time."""

import torch

from conformance import GroupedConformance
from quantkern.kernels import Backend
from quantkern.kernels.moe import route


class TestGroupedReference(GroupedConformance):
    backend = Backend.REFERENCE
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    OP = "quantkern::moe_wna16_ref"


def test_route_sorts_pairs_by_expert_in_token_order_without_a_sync():
    idx = torch.tensor([[2, 0], [0, -1], [3, 2], [0, 7]])  # 7 and -1: not experts of a 4-expert module
    r = route(idx, 4)
    assert r.offsets.tolist() == [0, 3, 3, 5, 6]
    assert r.rows[:6].tolist() == [0, 1, 3, 0, 2, 2]  # expert 0: tokens 0, 1, 3; expert 2: 0, 2; expert 3: 2
    assert r.order[:6].tolist() == [1, 2, 6, 0, 5, 4]
    assert sorted(r.order[6:].tolist()) == [3, 7]  # the two invalid pairs sort last
    assert torch.equal(r.rows, r.order // 2)
