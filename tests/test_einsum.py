"""``torch.einsum`` read as matmul-like dims: a feature index kept in the output passes its
group on, one summed over couples every operand that has it and gates them, and the MACs
are measured per index (torch sums an index only one operand has before its matmul)."""
import pytest
import torch
from torch import nn

import dcopt

from checks import assert_exact_export, converted_exactly

D, HEADS = 12, 3


class Model(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.dh = how, D // HEADS
        self.inp = nn.Linear(6, D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        if how == "param":
            self.w = nn.Parameter(torch.randn(D, D))

    def forward(self, x):
        h = self.inp(x)
        B, T, _ = h.shape
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.how == "heads":
            q, k, v = (a.view(B, T, HEADS, self.dh) for a in (q, k, v))
            a = torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1)
            y = torch.einsum("bhij,bjhd->bihd", a, v).reshape(B, T, D)
        elif self.how == "list_operands":
            a = torch.einsum("bid,bjd->bij", [q, k]).softmax(-1)
            y = torch.einsum("bij,bjd->bid", [a, v])
        elif self.how == "ellipsis":
            a = torch.einsum("...id,...jd->...ij", q, k).softmax(-1)
            y = torch.einsum("...ij,...jk", a, v)            # implicit output: ..., i, k
        elif self.how == "dot":                              # a per-frame similarity, broadcast back
            y = v * torch.einsum("btd,btd->bt", q, k).unsqueeze(-1)
        elif self.how == "sum_one_side":                     # v's features summed alone: no coupling
            y = q * torch.einsum("btd,bte->bt", v, k).unsqueeze(-1)
        elif self.how == "permute":
            y = torch.einsum("btd->bdt", v).transpose(1, 2)
        elif self.how == "param":                            # contracted against a parameter
            y = torch.einsum("btd,de->bte", v, self.w)
        elif self.how == "outer":
            y = torch.einsum("btd,bte->btde", q, k).sum(-1)
        else:
            raise ValueError(self.how)
        return self.head(h + self.o(y))


X = (torch.randn(2, 5, 6),)
OTHERS = [(torch.randn(3, 9, 6),), (torch.randn(1, 1, 6),)]


def _exact(model):
    return converted_exactly(model, X, OTHERS)


@pytest.mark.parametrize("how", ["heads", "list_operands", "ellipsis"])
def test_attention_written_with_einsum(how):
    dm = _exact(Model(how))
    q = next(g for g in dm.plan.groups if g.name.startswith("q"))
    v = next(g for g in dm.plan.groups if g.name.startswith("v"))
    dm.set_sizes({q.name: 1, v.name: 2})
    small = dcopt.export(dm)
    n = HEADS if how == "heads" else 1
    assert small.q.out_features == small.k.out_features == n * 1
    assert small.v.out_features == small.o.in_features == n * 2


def test_a_dot_product_couples_and_a_lone_sum_does_not():
    dm = _exact(Model("dot"))
    assert {"q", "v"} <= set(dm.group_names) and "k" not in dm.group_names   # q and k one group
    dm = _exact(Model("sum_one_side"))
    assert {"q", "v", "k"} <= set(dm.group_names)


def test_a_single_operand_permute():
    dm = _exact(Model("permute"))
    assert "v" in dm.group_names


@pytest.mark.parametrize("how, reason", [("param", "fixed-width tensor"), ("outer", "outer product")])
def test_rejected_with_a_reason(how, reason):
    a = dcopt.analyze(Model(how), X)
    assert any(reason in r.reason for r in a.rejections)
    _exact(Model(how))


def test_equation_parsing():
    from dcopt.rules.einsum import _parse
    ins, out = _parse("...ij,...jk", [4, 3])
    assert ins[0] == [("...", 1), ("...", 0), "i", "j"] and ins[1] == [("...", 0), "j", "k"]
    assert out == [("...", 1), ("...", 0), "i", "k"]
    assert _parse("ij,jk->ik", [2, 3]) is None            # wrong rank
    assert _parse("i.j->ij", [2]) is None
    assert _parse("ba,cb", [2, 2])[1] == ["a", "c"]       # implicit: once-used letters, sorted


def test_an_affine_count_is_not_taken_for_a_product():
    """``btd,btd,bt->b`` costs B·T·d + B·T: off a product of widths by B·T, which rounds away
    at 1, N−1 and N when B·T < N/2 — compared exactly, it keeps the features."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.w = nn.Linear(6, 64), nn.Linear(6, 64), nn.Linear(6, 1)

        def forward(self, x):
            return torch.einsum("btd,btd,bt->b", self.q(x), self.k(x), self.w(x)[..., 0]).unsqueeze(-1)

    a = dcopt.analyze(M(), (torch.randn(1, 8, 6),))
    assert not a.dynamic_groups and any("not a product" in r.reason for r in a.rejections)


def test_the_sublist_form_is_named():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(1, 2)

        def forward(self, x):
            return self.o(torch.einsum(self.q(x), [0, 1, 2], self.k(x), [0, 1, 2], [0, 1]).unsqueeze(-1))

    a = dcopt.analyze(M(), X)
    reasons = {r.reason for r in a.rejections if r.group in ("q", "k")}
    assert reasons == {"einsum's sublist form (operand, [indices], ...) is not read; write the equation string"}


def test_a_constant_einsum_is_not_dynamic_macs():
    """``btd,btj->bj`` sums q's features away before its matmul: its MACs do not scale with
    q, so they count as constant, not as q's."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = nn.Linear(6, 8), nn.Linear(6, 2)

        def forward(self, x):
            return self.o(torch.einsum("btd,btj->bj", self.q(x), x))

    a = dcopt.analyze(M(), X)
    einsum_macs = a.macs - 2 * 5 * 6 * 8 - 2 * 6 * 2
    assert einsum_macs > 0 and a.dynamic_fraction == pytest.approx(1 - einsum_macs / a.macs - 2 * 6 * 2 / a.macs)
    _exact(M())
