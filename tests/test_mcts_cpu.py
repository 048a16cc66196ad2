"""Tests of mcts_cpu.py: the numba backend against mcts.py's PyTorch reference, tensor for tensor.

The numba loops make the same float32 operations in the same order as the reference (mcts_cpu.py "Rounding"),
so every tree tensor must be equal, not close: whole searches (the fused loop, mcts_cpu.simulate) on the fake
models of test_mcts.py and on small real networks, exact ties everywhere, LSTM resets every other level, and
the unfused select / expand_backup step by step. (test_mcts.py runs the hand-computed trees, the oracle and the
invariants on this backend too.) Skipped where numba is not installed.
"""
import pytest
import torch

pytest.importorskip("numba")

import mcts  # noqa: E402
import mcts_cpu  # noqa: E402
from model import make_model  # noqa: E402
from test_mcts import LinearModel  # noqa: E402

FIELDS = ("visit_count", "value_sum", "value_prefix", "parent", "action", "depth", "is_reset", "children", "prior",
          "min_max", "tiebreak", "latent", "lstm_h", "lstm_c")
GAMMA = 0.997 ** 4


class TieModel(LinearModel):
    """LinearModel with uniform priors and values on a 1/2 grid: exact score ties at every node."""

    def recurrent_inference(self, latent, lstm_state, action, depth):
        out = super().recurrent_inference(latent, lstm_state, action, depth)
        return out._replace(value_prefix=torch.round(2 * out.value_prefix) / 2, value=torch.round(2 * out.value) / 2,
                            policy_logits=torch.zeros_like(out.policy_logits))


def assert_same(ref, got):
    for name in FIELDS:
        r, g = getattr(ref.tree, name), getattr(got.tree, name)
        assert r.dtype == g.dtype and torch.equal(r, g), f"tree.{name} differs at {(r != g).nonzero()[:5].tolist()}"
    assert torch.equal(ref.visit_counts, got.visit_counts) and torch.equal(ref.root_values, got.root_values)


def both(model, root, n, seed=0, **kw):
    return [mcts.search(model, root, n, generator=torch.Generator().manual_seed(seed), backend=backend,
                        **{"add_noise": True, **kw}) for backend in ("torch", "numba")]


@pytest.mark.parametrize("B,A,n,kw", [(1, 2, 1, {}), (5, 3, 16, {}), (16, 9, 50, {}), (3, 18, 7, {}),
                                      (12, 4, 50, dict(lstm_horizon_len=2)), (64, 9, 50, dict(add_noise=False)),
                                      (7, 18, 50, dict(value_delta_max=0.25, pb_c_init=2.0, gamma=0.9))])
def test_search_equals_the_reference(B, A, n, kw):
    model = LinearModel(A, seed=B + A)
    root = model.initial_inference(B, seed=n)
    ref, got = both(model, root, n, seed=A, **kw)
    assert_same(ref, got)
    assert (got.visit_counts.sum(1) == n).all()


def test_deep_trees_with_resets_and_exact_ties():
    """Uniform priors and values on a 1/2 grid: every choice is a tie broken by the keys; resets every 2 levels."""
    B, A, n = 9, 5, 40
    model = TieModel(A, seed=3)
    root = model.initial_inference(B, seed=4)
    root = root._replace(policy_logits=torch.zeros(B, A))
    ref, got = both(model, root, n, add_noise=False, lstm_horizon_len=2, value_delta_max=0.25)
    assert_same(ref, got)
    assert (got.tree.action[:, 1] == got.tree.tiebreak[:, mcts.ROOT].argmax(-1)).all()  # the first tie
    assert got.tree.is_reset.sum() > 0 and got.tree.depth.max() >= 4


@pytest.mark.parametrize("net", ["mlp", "atari"])
def test_real_networks(net):
    """model.py's networks: latents [B, 8] and [B, C, 6, 6] (flattened by the fused loop), per-depth BatchNorm."""
    torch.manual_seed(0)
    obs_shape = (6,) if net == "mlp" else (12, 32, 32)
    kw = dict(hidden=16, latent_dim=8) if net == "mlp" else dict(channels=8, reduced_channels=4, fc_hidden=8)
    model = make_model(obs_shape, 4, lstm_hidden=8, support_size=10, proj_hid=8, proj_out=8, pred_hid=8, pred_out=8,
                       **kw).eval()
    with torch.no_grad():
        root = model.initial_inference(torch.rand(5, *obs_shape))
    assert_same(*both(model, root, 12, seed=1))


def test_other_latent_dtypes_take_the_unfused_loop(monkeypatch):
    """float64 latents: no numpy-compatible float32 view, so mcts.search's own loop runs with the numba select
    and expand_backup (the fused calls must not run)."""
    B, A, n = 6, 4, 30
    model = LinearModel(A, seed=5)
    root = model.initial_inference(B, seed=6)
    root = root._replace(latent=root.latent.double())

    def refuse(*args):
        raise AssertionError("the fused loop ran on float64 latents")
    monkeypatch.setattr(mcts_cpu, "_select_gather", refuse)
    ref, got = both(model, root, n)
    assert got.tree.latent.dtype == torch.float64
    assert_same(ref, got)


@pytest.mark.parametrize("B,A,S,horizon", [(9, 7, 20, 5), (4, 3, 30, 2)])
def test_select_and_expand_backup_step_by_step(B, A, S, horizon):
    """The unfused operations fed the same tree and the same random leaves at every step: same (parent, action,
    depth) and same trees, with leaf values on a 1/2 grid (ties) half of the time."""
    g = torch.Generator().manual_seed(B)
    trees = []
    for _ in range(2):
        tree = mcts.make_tree(B, S + 1, A, (1,), 1, "cpu")
        tree.visit_count[:, 0] = 1
        tree.prior[:, 0] = torch.softmax(torch.randn(B, A, generator=torch.Generator().manual_seed(1)), -1)
        tree.tiebreak.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
        trees.append(tree)
    ops = [(mcts.select, mcts.expand_backup), (mcts_cpu.select, mcts_cpu.expand_backup)]
    for i in range(1, S + 1):
        vp, v, logits = torch.randn(B, generator=g), torch.randn(B, generator=g), torch.randn(B, A, generator=g)
        if i % 2:
            vp, v, logits = torch.round(2 * vp) / 2, torch.round(2 * v) / 2, torch.zeros(B, A)
        picks = [select(tree, 19652, 1.25, GAMMA, 0.01) for tree, (select, _) in zip(trees, ops)]
        for r, k in zip(*picks):
            assert r.dtype == k.dtype == torch.int64 and torch.equal(r, k), f"step {i}"
        for tree, (_, expand_backup) in zip(trees, ops):
            expand_backup(tree, i, picks[0][0], picks[0][1], vp, v, logits, GAMMA, horizon)
        for name in FIELDS[:11]:
            assert torch.equal(getattr(trees[0], name), getattr(trees[1], name)), f"step {i}: tree.{name}"
    assert trees[1].depth.max() >= horizon and trees[1].is_reset.sum() > 0


def test_bad_input_is_refused():
    """The loops do not check their bounds, so the wrappers and the loops check what they are given."""
    tree = mcts.make_tree(2, 3, 2, (1,), 1, "cpu")
    leaf = [torch.zeros(2), torch.zeros(2), torch.zeros(2, 2), GAMMA, 5]
    with pytest.raises(ValueError, match="a parent node or an action out of range"):
        mcts_cpu.expand_backup(tree, 1, torch.tensor([0, 1]), torch.tensor([0, 1]), *leaf)  # node 1 under node 1
    with pytest.raises(ValueError, match="a parent node or an action out of range"):
        mcts_cpu.expand_backup(tree, 1, torch.tensor([0, 0]), torch.tensor([0, 2]), *leaf)  # action 2 of 2
    with pytest.raises(RuntimeError):  # 3 parents for 2 trees
        mcts_cpu.expand_backup(tree, 1, torch.tensor([0, 0, 0]), torch.tensor([0, 0, 0]), *leaf)
    tree.visit_count[1, 0] = 4  # N = 3
    with pytest.raises(ValueError, match="a visit count above N"):
        mcts_cpu.select(tree, 19652, 1.25, GAMMA, 0.01)
    tree.value_sum = tree.value_sum.double()
    with pytest.raises(ValueError, match="tree.value_sum is torch.float64"):
        mcts_cpu.select(tree, 19652, 1.25, GAMMA, 0.01)
