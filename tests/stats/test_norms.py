import torch
from torch import nn

from gradguard.stats.layers import build_layer_map
from gradguard.stats.norms import ABSENT, LayerNorms, total_norm


def _oracle(tensors: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([t.detach().double().flatten() for t in tensors])).item()


def test_layer_norms_match_vector_norm_and_clip_grad_norm() -> None:
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    m(torch.randn(11, 5)).square().sum().backward()
    lm = build_layer_map(m, None)
    norms = LayerNorms(lm, torch.device("cpu"))([p.grad for p in lm.params])
    assert torch.allclose(norms.double(), torch.tensor([_oracle([m[0].weight.grad, m[0].bias.grad]),
                                                        _oracle([m[2].weight.grad, m[2].bias.grad])],
                                                       dtype=torch.float64), rtol=1e-6)
    expected = nn.utils.clip_grad_norm_(m.parameters(), max_norm=float("inf"))
    assert torch.allclose(total_norm(norms), expected, rtol=1e-6)


def test_absent_gradients_are_marked_not_zero() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lm = build_layer_map(m, None)
    g = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    norms = LayerNorms(lm, torch.device("cpu"))([g, None, None, None])
    assert norms.tolist() == [5.0, ABSENT]
    assert total_norm(norms).item() == 5.0


def test_low_precision_accumulates_in_fp32() -> None:
    # 4096 bf16 values of 1.0: the norm is 64 exactly; a bf16 sum of squares would stall at 256 (= 16^2).
    for dtype in (torch.bfloat16, torch.float16):
        m = nn.Linear(64, 64, bias=False).to(dtype)
        lm = build_layer_map(m, None)
        norms = LayerNorms(lm, torch.device("cpu"))([torch.ones(64, 64, dtype=dtype)])
        assert norms.dtype == torch.float32 and norms.item() == 64.0


def test_mixed_dtypes_fold_into_one_vector() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16))
    lm = build_layer_map(m, None)
    grads = [torch.randn_like(p) for p in lm.params]
    norms = LayerNorms(lm, torch.device("cpu"))(grads)
    want = [_oracle(grads[:2]), _oracle(grads[2:])]
    assert torch.allclose(norms.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5)


def test_host_pair_matches_vector_norm_per_layer_for_both_lists() -> None:
    # A sample step's update and weights after it, folded from one fused norm: each list must give its own
    # per-layer norms (mixed dtypes: one group per dtype), as torch.linalg.vector_norm computes them.
    m = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3).to(torch.float64), nn.Linear(3, 2))
    lm = build_layer_map(m, None)
    first = [torch.randn_like(p) for p in lm.params]
    second = [torch.randn_like(p) * 100 for p in lm.params]
    got_first, got_second = LayerNorms(lm, torch.device("cpu")).host_pair(first, second)
    for got, tensors in ((got_first, first), (got_second, second)):
        want = [_oracle(tensors[2 * i: 2 * i + 2]) for i in range(3)]
        assert all(abs(g - w) <= 1e-5 * w for g, w in zip(got, want)), (got, want)


def test_nonfinite_propagates() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lm = build_layer_map(m, None)
    grads = [torch.zeros(2, 2), torch.zeros(2), torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]), torch.zeros(2)]
    norms = LayerNorms(lm, torch.device("cpu"))(grads)
    assert norms[0].item() == 0.0 and torch.isnan(norms[1])
    assert torch.isnan(total_norm(norms))


def test_distributed_share_counts_replicated_parameters_on_rank_zero_only() -> None:
    """With shards about, each rank returns its share of the squares: a plain (replicated) tensor is every rank's
    whole copy, so only rank 0 may count it, or a sum over ranks would count it world-size times."""
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lm = build_layer_map(m, None)
    g = [torch.full((2, 2), 1.0), torch.full((2,), 2.0), torch.full((2, 2), 3.0), None]
    sq0, absent0 = LayerNorms(lm, torch.device("cpu"), rank=0).squares(g)
    sq1, absent1 = LayerNorms(lm, torch.device("cpu"), rank=1).squares(g)
    assert sq0.tolist() == [4 * 1.0 + 2 * 4.0, 4 * 9.0]
    assert sq1.tolist() == [0.0, 0.0]
    assert absent0 is None and absent1 is None  # presence is a host fact, the same on every rank
