"""Tests of mcts.py: a hand-computed tree, the batched reference against the per-node oracle
(tests/mcts_oracle.py), and the search's invariants (visits sum to N, batch independence,
same seed same result, noise only when asked), the Dirichlet sampler and select_action."""
import contextlib
import importlib.util
import math
import os

import pytest
import torch

import mcts
import mcts_oracle
from model import NetworkOutput

CFG = dict(gamma=0.997**4, pb_c_base=19652, pb_c_init=1.25, value_delta_max=0.01, lstm_horizon_len=5)


class LinearModel:
    """A fake model with the recurrent_inference interface: random linear dynamics as the peer
    harness (next = tanh(W[a] @ latent)) and an LSTM-like value prefix.

    Channel 0 of the latent is a per-tree "skill" s in [0, 1] that the dynamics keeps: action 0
    earns reward 2 s and the value is 3 s plus noise, so trees with a high s grow deep chains of
    action 0. The cell c sums the rewards since the last LSTM reset and value_prefix = c[:, 0],
    so the edge reward of mcts.py is right only if the search zeroes the state where it should.
    Every output row depends on its input row only (elementwise ops and row sums, no matmul).
    """

    def __init__(self, A, D=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A, self.D = A, D
        self.W = torch.randn(A, D, D, generator=g) / math.sqrt(D)  # [A, D, D] dynamics
        self.policy_w = torch.randn(D, A, generator=g)  # [D, A]
        self.value_w = torch.randn(D, generator=g) * 0.5  # [D]
        self.reward_w = torch.randn(D, generator=g) * 0.3  # [D]

    def heads(self, latent):
        s = latent[:, 0]  # [B]
        logits = (latent[:, :, None] * self.policy_w).sum(1)  # [B, A]
        logits[:, 0] += 2 * s
        value = (latent * self.value_w).sum(1) + 3 * s  # [B]
        return logits, value

    def recurrent_inference(self, latent, lstm_state, action, depth):
        s = latent[:, :1]  # [B, 1]
        nxt = torch.tanh((self.W[action] * latent[:, None, :]).sum(-1))  # [B, D]
        nxt = torch.cat([s, nxt[:, 1:]], 1)
        reward = torch.where(action == 0, 2 * s[:, 0], (nxt * self.reward_w).sum(1))  # [B]
        h, c = lstm_state
        c = c + reward[:, None]  # [B, H] sum of rewards since the last reset
        h = torch.tanh(c + h)
        logits, value = self.heads(nxt)
        return NetworkOutput(nxt, (h, c), c[:, 0], value, logits, None, None)

    def initial_inference(self, B, seed):
        g = torch.Generator().manual_seed(seed)
        latent = torch.tanh(torch.randn(B, self.D, generator=g))
        latent[:, 0] = torch.rand(B, generator=g)  # skill
        logits, value = self.heads(latent)
        zeros = torch.zeros(B, self.D)
        return NetworkOutput(latent, (zeros, zeros.clone()), torch.zeros(B), value, logits, None, None)


def run(model, root, n, seed=0, backend="torch", **kw):
    return mcts.search(model, root, n, generator=torch.Generator().manual_seed(seed), backend=backend,
                       **{**dict(add_noise=True), **kw})


# ---------------------------------------------------------------------------------------------
# A tree worked out by hand
# ---------------------------------------------------------------------------------------------
NUMBA = pytest.param("numba", marks=pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                                      reason="numba is not installed"))
CPU_BACKENDS = ["torch", NUMBA]  # whole searches on the CPU (the Triton interpreter is slow: test_mcts_kernel.py)


def _backends():
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return ["torch", NUMBA, pytest.param("triton", marks=pytest.mark.skipif(
        not (interpret or torch.cuda.is_available()), reason="triton needs CUDA or TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("backend", _backends())
def test_hand_computed_tree(backend):
    """One tree, A = 2, 6 simulations driven through select / expand_backup, every number worked
    out by hand. gamma = 0.5 and lstm_horizon_len = 2 (resets at depth 2 and 4) keep the
    arithmetic short; pb_c_init 1.25, pb_c_base 19652, value_delta_max 0.01.
      pb(N) = (log((N + 19653) / 19652) + 1.25) * sqrt(N):
      pb(1) = 1.2501018, pb(2) = 1.7679828, pb(3) = 2.1654160, pb(4) = 2.5005088,
      pb(5) = 2.7957676, pb(6) = 3.0627345
      score = pb(N_s) * P(a) / (1 + n(a)) + clamp((Q - min) / max(max - min, 0.01), 0, 1)
    """
    select, expand_backup = mcts._tree_ops(backend, torch.device("cpu"))
    device = torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")
    gamma, horizon = 0.5, 2
    tree = mcts.make_tree(1, 7, 2, (1,), 1, device)
    tree.visit_count[0, 0], tree.value_sum[0, 0] = 1, 0.0  # root: one visit, network value 0
    tree.prior[0, 0] = torch.tensor([0.5, 0.5])
    tree.tiebreak.zero_()
    tree.tiebreak[0, 0] = torch.tensor([0.2, 0.7])  # ties at the root go to action 1
    tree.tiebreak[0, 2] = torch.tensor([0.3, 0.6])  # ... at node 2 to action 1
    tree.tiebreak[0, 4] = torch.tensor([0.9, 0.1])  # ... at node 4 to action 0
    log3 = math.log(3.0)

    def step(i, want, vp, value, logits, visits, value_sums, min_max):
        parent, action, depth = select(tree, 19652, 1.25, gamma, 0.01)
        assert (parent.item(), action.item(), depth.item()) == want, f"simulation {i}"
        expand_backup(tree, i, parent, action, torch.tensor([vp], device=device),
                      torch.tensor([value], device=device), torch.tensor([logits], device=device), gamma, horizon)
        n = len(visits)
        assert tree.visit_count[0, :n].tolist() == visits, f"simulation {i}"
        assert tree.value_sum[0, :n].tolist() == pytest.approx(value_sums, abs=1e-5), f"simulation {i}"
        assert tree.min_max[0].tolist() == pytest.approx(min_max, abs=1e-5), f"simulation {i}"

    # Sim 1. Root N=1, no child visited: mean Q 0, min-max empty -> value score 0 for both.
    #   score = pb(1) * 0.5 / 1 = 0.6250509 for both: a tie, key 0.7 > 0.2 -> action 1.
    # Node 1 (depth 1): vp 0.4, value 1, prior softmax([log 3, 0]) = [0.75, 0.25].
    # Backup: node1 W=1 N=1, Q = 0.4 + 0.5 * 1 = 0.9 -> min-max (0.9, 0.9); G = 0.9; root W=0.9 N=2.
    step(1, (0, 1, 1), 0.4, 1.0, [log3, 0.0], [2, 1], [0.9, 1.0], [0.9, 0.9])
    # Sim 2. Root N=2: mean Q = 0.9 / 1; max == min so value scores are raw: 0.9 for both.
    #   a0: 1.7679828 * 0.5 / 1 + 0.9 = 1.7839914;  a1: 1.7679828 * 0.5 / 2 + 0.9 = 1.3419957 -> a0.
    # Node 2: vp -0.2, value -1, prior [0.5, 0.5]. Q = -0.2 + 0.5 * -1 = -0.7 -> min-max (-0.7, 0.9);
    #   G = -0.7; root W = 0.9 - 0.7 = 0.2, N = 3.
    step(2, (0, 0, 1), -0.2, -1.0, [0.0, 0.0], [3, 1, 1], [0.2, 1.0, -1.0], [-0.7, 0.9])
    # Sim 3. Root N=3, range 1.6: a0 (node2) value (−0.7+0.7)/1.6 = 0, a1 (node1) (0.9+0.7)/1.6 = 1;
    #   prior 2.1654160 * 0.5 / 2 = 0.5413540 each -> a1 (1.5413540 vs 0.5413540) -> node 1.
    #   Root mean Q = (-0.7 + 0.9) / 2 = 0.1. Node1 N=1, no child: mean Q = (0.1 + 0) / (0 + 1) = 0.1,
    #   value (0.1 + 0.7) / 1.6 = 0.5; prior 1.2501018 * [0.75, 0.25] = [0.9375763, 0.3125254] -> a0.
    # Node 3 (depth 2: reset): vp 0.6, value 2, prior softmax([0, log 3]) = [0.25, 0.75].
    # Backup: node3 W=2 N=1, r = 0.6 - 0.4 = 0.2, Q = 0.2 + 0.5 * 2 = 1.2 -> min-max (-0.7, 1.2);
    #   G = 1.2; node1 W = 2.2 N = 2, Q = 0.4 + 0.5 * 1.1 = 0.95; G = 0.4 + 0.6 = 1.0; root W = 1.2, N = 4.
    step(3, (1, 0, 2), 0.6, 2.0, [0.0, log3], [4, 2, 1, 1], [1.2, 2.2, -1.0, 2.0], [-0.7, 1.2])
    # Sim 4. Root N=4, range 1.9: a0 value 0, prior 2.5005088 * 0.5 / 2 = 0.6251272;
    #   a1 value (0.95 + 0.7) / 1.9 = 0.8684211, prior 2.5005088 * 0.5 / 3 = 0.4167515 -> a1 (1.2851726).
    #   Root mean Q = (-0.7 + 0.95) / 2 = 0.125. Node1 N=2: a0 = node3 with Q 1.2 -> value 1;
    #   mean Q = (0.125 + 1.2) / 2 = 0.6625 -> value (0.6625 + 0.7) / 1.9 = 0.7171053 for a1;
    #   a0: 1.7679828 * 0.75 / 2 + 1 = 1.6629936; a1: 1.7679828 * 0.25 / 1 + 0.7171053 = 1.1591010 -> node3.
    #   Node3 N=1, no child: mean Q = (0.6625 + 0) / 1 -> value 0.7171053 for both;
    #   prior 1.2501018 * [0.25, 0.75] -> a1.
    # Node 4 (depth 3): vp 0.3, value -0.4, logits [0, 1e-6]. Parent node3 is reset, so r = 0.3.
    # Backup: node4 W=-0.4 N=1, Q = 0.3 - 0.2 = 0.1; G = 0.1;
    #   node3 W = 2.1 N = 2, Q = 0.2 + 0.5 * 1.05 = 0.725; G = 0.2 + 0.05 = 0.25;
    #   node1 W = 2.45 N = 3, Q = 0.4 + 0.5 * 2.45 / 3 = 0.8083333; G = 0.4 + 0.125 = 0.525;
    #   root W = 1.725, N = 5. Min-max unchanged (-0.7, 1.2).
    step(4, (3, 1, 3), 0.3, -0.4, [0.0, 1e-6], [5, 3, 1, 2, 1], [1.725, 2.45, -1.0, 2.1, -0.4], [-0.7, 1.2])
    # Sim 5. Root N=5: a0 value 0, prior 2.7957676 * 0.5 / 2 = 0.6989419;
    #   a1 value (0.8083333 + 0.7) / 1.9 = 0.7938596, prior 2.7957676 * 0.5 / 4 = 0.3494710 -> a1 (1.1433306).
    #   Root mean Q = (-0.7 + 0.8083333) / 2 = 0.0541667. Node1 N=3: mean Q = (0.0541667 + 0.725) / 2
    #   = 0.3895833; a0 (node3, Q 0.725) value 0.75, prior 2.1654160 * 0.75 / 3 = 0.5413540 -> 1.2913540;
    #   a1 value (0.3895833 + 0.7) / 1.9 = 0.5734649, prior 2.1654160 * 0.25 = 0.5413540 -> 1.1148189 -> node3.
    #   Node3 N=2 (reset): a1 = node4 with Q = 0.3 + 0.5 * -0.4 = 0.1; mean Q = (0.3895833 + 0.1) / 2
    #   = 0.2447917; a0: 1.7679828 * 0.25 / 1 + (0.2447917 + 0.7) / 1.9 = 0.4419957 + 0.4972588 = 0.9392545;
    #   a1: 1.7679828 * 0.75 / 2 + (0.1 + 0.7) / 1.9 = 0.6629936 + 0.4210526 = 1.0840462 -> node4.
    #   Node4 N=1, no child, prior softmax([0, 1e-6]) = [0.5 - 2.5e-7, 0.5 + 2.5e-7]: a1 scores
    #   1.2501018 * 5e-7 = 6.3e-7 more, within 1e-6: still a tie, key 0.9 > 0.1 -> a0.
    # Node 5 (depth 4: reset): vp 1.5, value 3. r = 1.5 - 0.3 = 1.2 (node4 is not reset).
    # Backup: node5 W=3 N=1, Q = 1.2 + 1.5 = 2.7 -> min-max (-0.7, 2.7); G = 2.7;
    #   node4 W = 2.3 N = 2, Q = 0.3 + 0.5 * 1.15 = 0.875; G = 0.3 + 1.35 = 1.65;
    #   node3 W = 3.75 N = 3, Q = 0.2 + 0.5 * 1.25 = 0.825; G = 0.2 + 0.825 = 1.025;
    #   node1 W = 3.475 N = 4, Q = 0.4 + 0.5 * 0.86875 = 0.834375; G = 0.4 + 0.5125 = 0.9125;
    #   root W = 2.6375, N = 6.
    step(5, (4, 0, 4), 1.5, 3.0, [0.0, 0.0], [6, 4, 1, 3, 2, 1], [2.6375, 3.475, -1.0, 3.75, 2.3, 3.0],
         [-0.7, 2.7])
    # Sim 6. Root N=6, range 3.4: a0 (node2) value 0, prior 3.0627345 * 0.5 / 2 = 0.7656836;
    #   a1 value (0.834375 + 0.7) / 3.4 = 0.4512868, prior 3.0627345 * 0.5 / 5 = 0.3062735 -> 0.7575603.
    #   -> a0, node2. Root mean Q = (-0.7 + 0.834375) / 2 = 0.0671875. Node2 N=1, no child, prior
    #   [0.5, 0.5]: a tie, key 0.6 > 0.3 -> a1.
    # Node 6 (depth 2: reset): vp -0.5, value 0. r = -0.5 - (-0.2) = -0.3.
    # Backup: node6 W=0 N=1, Q = -0.3 -> min-max unchanged; G = -0.3;
    #   node2 W = -1.3 N = 2, Q = -0.2 + 0.5 * -0.65 = -0.525; G = -0.2 - 0.15 = -0.35; root W = 2.2875, N = 7.
    step(6, (2, 1, 2), -0.5, 0.0, [0.0, 0.0], [7, 4, 2, 3, 2, 1, 1],
         [2.2875, 3.475, -1.3, 3.75, 2.3, 3.0, 0.0], [-0.7, 2.7])

    assert tree.parent[0].tolist() == [-1, 0, 0, 1, 3, 4, 2]
    assert tree.action[0].tolist() == [-1, 1, 0, 0, 1, 0, 1]
    assert tree.depth[0].tolist() == [0, 1, 1, 2, 3, 4, 2]
    assert tree.is_reset[0].tolist() == [0, 0, 0, 1, 0, 1, 1]
    assert tree.children[0].tolist() == [[2, 1], [3, -1], [-1, 6], [-1, 4], [5, -1], [-1, -1], [-1, -1]]
    assert tree.prior[0, 1].tolist() == pytest.approx([0.75, 0.25], abs=1e-6)
    # root visit counts [2, 4] sum to 6; root value 2.2875 / 7
    assert tree.visit_count[0, 2].item() + tree.visit_count[0, 1].item() == 6
    assert (tree.value_sum[0, 0] / tree.visit_count[0, 0]).item() == pytest.approx(0.3267857, abs=1e-6)


@pytest.mark.parametrize("backend", _backends())
def test_min_max_floor_and_clamp(backend):
    """Two hand-made trees where the normalization decides the root's choice (gamma = 1).
    Root: N = 3, prior [0.7, 0.2, 0.1]; a0 -> node 1, a1 -> node 2 (vp 0, N 1); a2 unvisited.
    prior scores pb(3) * P / (1 + n) = 2.1654160 * [0.7 / 2, 0.2 / 2, 0.1] = [0.7578956, 0.2165416, 0.2165416]
    Tree 0, the floor: Q = [0.100, 0.104], min-max (0.100, 0.104), a2 gets mean Q 0.102.
      (q - 0.1) / max(0.004, 0.01) = [0, 0.4, 0.2] -> scores [0.758, 0.617, 0.417] -> a0
      (without the 0.01 floor: [0, 1, 0.5] -> a1)
    Tree 1, the clamp: Q = [0.1, 0.3], min-max (0, 0.05) (stale on purpose: the clamp never acts
    on a consistent tree), mean Q 0.2.
      (q - 0) / 0.05 = [2, 6, 4] -> clamped to [1, 1, 1] -> the prior decides -> a0
      (unclamped: a1)"""
    select = mcts._tree_ops(backend, torch.device("cpu"))[0]
    device = torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")
    tree = mcts.make_tree(2, 4, 3, (1,), 1, device)
    tree.visit_count[:, :3] = torch.tensor([3, 1, 1], dtype=torch.int32)
    tree.value_sum[:, 1:3] = torch.tensor([[0.100, 0.104], [0.1, 0.3]])
    tree.parent[:, 1:3] = 0
    tree.action[:, 1:3] = torch.tensor([0, 1], dtype=torch.int32)
    tree.depth[:, 1:3] = 1
    tree.children[:, 0, :2] = torch.tensor([1, 2], dtype=torch.int32)
    tree.prior[:, 0] = torch.tensor([0.7, 0.2, 0.1])
    tree.min_max[:] = torch.tensor([[0.100, 0.104], [0.0, 0.05]])
    tree.tiebreak.zero_()
    tree.prior[:, 1] = torch.tensor([0.5, 0.3, 0.2])  # node 1 has no child: its prior decides there
    parent, action, depth = select(tree, 19652, 1.25, 1.0, 0.01)
    # a0 at the root in both trees, so the descent continues into node 1 (a1 would give node 2)
    assert parent.tolist() == [1, 1] and action.tolist() == [0, 0] and depth.tolist() == [2, 2]


# ---------------------------------------------------------------------------------------------
# The batched reference against the per-node oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reference_matches_oracle_on_deep_trees(backend):
    B, A, n = 12, 4, 50
    model = LinearModel(A, seed=1)
    root = model.initial_inference(B, seed=2)
    res = run(model, root, n, seed=3, backend=backend)
    tree = res.tree
    max_depth = 0
    for b in range(B):
        o_root, nodes, min_max = mcts_oracle.run_search(
            model, root.latent[b], (root.lstm_state[0][b], root.lstm_state[1][b]), float(root.value[b]),
            tree.prior[b, 0].tolist(), tree.tiebreak[b].tolist(), n, CFG)
        assert [node.parent.index if node.parent else -1 for node in nodes] == tree.parent[b].tolist(), f"tree {b}"
        assert [node.depth for node in nodes] == tree.depth[b].tolist()
        assert [int(node.is_reset) for node in nodes] == tree.is_reset[b].tolist()
        assert [node.visit_count for node in nodes] == tree.visit_count[b].tolist()
        assert [node.value_sum for node in nodes] == pytest.approx(tree.value_sum[b].tolist(), abs=1e-5, rel=1e-5)
        assert [node.value_prefix for node in nodes] == pytest.approx(tree.value_prefix[b].tolist(), abs=1e-5)
        assert [min_max.minimum, min_max.maximum] == pytest.approx(tree.min_max[b].tolist(), abs=1e-5, rel=1e-5)
        visits = [o_root.children[a].visit_count if a in o_root.children else 0 for a in range(A)]
        assert visits == res.visit_counts[b].tolist()
        assert o_root.value() == pytest.approx(res.root_values[b].item(), abs=1e-5)
        max_depth = max(max_depth, max(node.depth for node in nodes))
    assert max_depth > 5, "the fake model must grow trees past the LSTM reset at depth 5"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lstm_state_zeroed_at_reset_nodes(backend):
    B, A, n = 8, 4, 50
    model = LinearModel(A, seed=1)
    tree = run(model, model.initial_inference(B, seed=2), n, backend=backend).tree
    reset = tree.depth % 5 == 0
    reset[:, 0] = False
    assert reset.any(), "no node at depth 5"
    assert torch.equal(tree.is_reset.bool(), reset)
    assert (tree.lstm_h[reset] == 0).all() and (tree.lstm_c[reset] == 0).all()
    carry = ~reset
    carry[:, 0] = False  # the root's state is the zero state of initial_inference
    assert (tree.lstm_c[carry].abs().sum(-1) > 0).all()  # the other nodes carry the state


def test_fixed_trip_count_path_gives_the_same_tree(monkeypatch):
    """On CUDA the depth loops run all N levels (no early exit); trees that are done must stay put."""
    B, A, n = 8, 4, 30
    model = LinearModel(A, seed=4)
    root = model.initial_inference(B, seed=5)
    early = run(model, root, n)
    monkeypatch.setattr(mcts, "_host_reads", lambda device: False)
    fixed = run(model, root, n)
    for name in ("visit_count", "parent", "action", "children", "min_max"):
        assert torch.equal(getattr(early.tree, name), getattr(fixed.tree, name)), name
    torch.testing.assert_close(early.tree.value_sum, fixed.tree.value_sum)


# ---------------------------------------------------------------------------------------------
# Invariants of the search
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,A,n", [(1, 2, 1), (5, 3, 16), (16, 9, 50), (3, 18, 7)])
def test_root_visits_sum_to_num_simulations(B, A, n, backend):
    model = LinearModel(A, seed=B)
    res = run(model, model.initial_inference(B, seed=A), n, backend=backend)
    assert res.visit_counts.dtype == torch.int32 and res.visit_counts.shape == (B, A)
    assert (res.visit_counts.sum(1) == n).all()
    assert (res.tree.visit_count[:, 0] == n + 1).all()
    assert res.root_values.shape == (B,) and torch.isfinite(res.root_values).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_independence(backend):
    B, A, n = 6, 5, 30
    model = LinearModel(A, seed=7)
    root = model.initial_inference(B, seed=8)
    other = model.initial_inference(B, seed=9)  # different latents, skills, logits and values
    j = 2
    changed = NetworkOutput(*(x.clone() if torch.is_tensor(x) else x for x in root))
    changed.latent[j] = other.latent[j]
    changed.policy_logits[j] = other.policy_logits[j]
    changed.value[j] = other.value[j]
    a, b = run(model, root, n, backend=backend), run(model, changed, n, backend=backend)
    keep = [i for i in range(B) if i != j]
    assert not torch.equal(a.tree.value_sum[j], b.tree.value_sum[j])
    assert torch.equal(a.visit_counts[keep], b.visit_counts[keep])
    assert torch.equal(a.root_values[keep], b.root_values[keep])
    assert torch.equal(a.tree.children[keep], b.tree.children[keep])


def test_same_seed_same_result_and_tree_reuse():
    B, A, n = 8, 6, 25
    model = LinearModel(A, seed=10)
    root = model.initial_inference(B, seed=11)
    a = run(model, root, n, seed=5)
    b = run(model, root, n, seed=5, tree=run(model, root, n, seed=6).tree)  # a used tree is reset
    c = run(model, root, n, seed=6)
    assert torch.equal(a.visit_counts, b.visit_counts) and torch.equal(a.root_values, b.root_values)
    assert torch.equal(a.tree.prior, b.tree.prior) and torch.equal(a.tree.min_max, b.tree.min_max)
    assert not torch.equal(a.tree.prior[:, 0], c.tree.prior[:, 0])  # another seed, other noise


def test_dirichlet_noise_only_when_asked():
    B, A, n = 64, 9, 4
    model = LinearModel(A, seed=12)
    root = model.initial_inference(B, seed=13)
    p = torch.softmax(root.policy_logits, -1)
    clean = run(model, root, n, add_noise=False).tree.prior[:, 0]
    torch.testing.assert_close(clean, p, atol=1e-6, rtol=0)
    noisy = run(model, root, n, add_noise=True).tree.prior[:, 0]
    noise = (noisy - 0.75 * p) / 0.25  # P <- 0.75 P + 0.25 Dir(0.3)
    assert (noise > -1e-5).all() and torch.allclose(noise.sum(-1), torch.ones(B), atol=1e-5)
    assert (noise - 1 / A).abs().mean() > 0.05  # Dir(0.3) rows are far from uniform
    mask = torch.arange(B) % 3 > 0                                  # a [B] mask: noise at those roots only
    some = run(model, root, n, add_noise=mask).tree.prior[:, 0]
    torch.testing.assert_close(some[mask], noisy[mask], atol=1e-6, rtol=0)   # the same draw, where asked
    torch.testing.assert_close(some[~mask], p[~mask], atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.3, 2.5])
def test_gamma_and_dirichlet_moments(alpha):
    g = torch.Generator().manual_seed(0)
    x = mcts.sample_gamma(alpha, (200_000,), g, "cpu").exp()
    # Gamma(alpha, 1): mean alpha, variance alpha; standard errors ~ sqrt(alpha / n) and ~ alpha * 0.01
    assert abs(x.mean().item() - alpha) < 5 * math.sqrt(alpha / 200_000)
    assert abs(x.var().item() - alpha) < 0.05 * alpha
    A, n = 9, 50_000
    d = mcts.sample_dirichlet(alpha, n, A, g, "cpu")
    a0 = alpha * A
    var = alpha * (a0 - alpha) / (a0**2 * (a0 + 1))  # Var of a Dirichlet(alpha) component
    assert torch.allclose(d.sum(-1), torch.ones(n), atol=1e-5) and (d >= 0).all()
    assert (d.mean(0) - 1 / A).abs().max().item() < 5 * math.sqrt(var / n)
    assert (d.var(0) / var - 1).abs().max().item() < 0.06


def test_select_action():
    counts = torch.tensor([[1, 3, 0, 6], [5, 5, 0, 2], [0, 0, 7, 0]], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    assert mcts.select_action(counts, 1.0, g, deterministic=True).tolist() == [3, 0, 2]  # first on ties
    n = 40_000
    rows = counts[0:1].expand(n, 4)
    for temperature in (1.0, 0.5, 2.0):
        a = mcts.select_action(rows, temperature, g, deterministic=False)
        freq = torch.bincount(a, minlength=4).double() / n
        want = torch.tensor([1.0, 3.0, 0.0, 6.0]) ** (1 / temperature)
        want = want / want.sum()
        assert freq[2] == 0  # never an unvisited action
        assert (freq - want).abs().max() < 5 * math.sqrt(0.25 / n), (temperature, freq, want)


def test_backend_switch():
    cpu = torch.device("cpu")
    numba = importlib.util.find_spec("numba") is not None  # "auto" on a CPU: numba where it is installed
    assert mcts.resolve_backend("auto", cpu) == ("numba" if numba else "torch")
    assert mcts.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert mcts._tree_ops("torch", torch.device("cuda")) == (mcts.select, mcts.expand_backup)
    if numba:
        import mcts_cpu
        assert mcts._tree_ops("auto", cpu) == (mcts_cpu.select, mcts_cpu.expand_backup)
    with pytest.raises(ValueError):
        mcts._tree_ops("numpy", cpu)


# ---------------------------------------------------------------------------------------------
# CUDA-graph bookkeeping of mcts.search, on a CPU (the real capture is tested on CUDA in
# test_mcts_kernel.py): a stand-in graph that records the simulation loop and reruns it on replay
# ---------------------------------------------------------------------------------------------
class RecordedGraph:
    captures = 0

    def __init__(self, simulate, stream):
        self.simulate = simulate
        RecordedGraph.captures += 1

    def replay(self):
        self.simulate()


def test_graph_cache_replays_the_loop_on_new_roots_and_weights(monkeypatch):
    """First search eager, second captured, then replayed: every one equals an eager search, on new roots,
    after weights copied in place (no recapture) and after new weight tensors (recaptured). A loop that
    kept anything of the search that recorded it (a root, a generator draw) would fail this."""
    from model import make_model
    monkeypatch.setattr(mcts, "_graphs_available", lambda device: True)
    monkeypatch.setattr(mcts, "_capture", RecordedGraph)

    class Stream:  # CUDA streams, as no-ops
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    RecordedGraph.captures = 0
    torch.manual_seed(0)
    net, fresh = (make_model((6,), 4, hidden=16, latent_dim=8, lstm_hidden=8, support_size=10).eval()
                  for _ in range(2))
    for p in list(net.parameters()) + list(fresh.parameters()):
        torch.nn.init.normal_(p, std=0.5)

    def same(seed, B=5):
        with torch.no_grad():
            root = net.initial_inference(torch.randn(B, 6, generator=torch.Generator().manual_seed(seed)))
        runs = [mcts.search(net, root, 12, add_noise=True, generator=torch.Generator().manual_seed(seed),
                            backend="torch", cuda_graphs=graphs) for graphs in (False, True)]
        assert torch.equal(runs[0].visit_counts, runs[1].visit_counts), seed
        for name in ("children", "visit_count", "tiebreak", "prior"):
            assert torch.equal(getattr(runs[0].tree, name), getattr(runs[1].tree, name)), (seed, name)
        torch.testing.assert_close(runs[0].root_values, runs[1].root_values)
        return runs[1].tree

    trees = [same(seed) for seed in range(4)]  # eager, capture + replay, replay, replay
    assert RecordedGraph.captures == 1 and all(t is trees[0] for t in trees)  # one cached tree per shape
    net.load_state_dict(fresh.state_dict())  # in place: the graph stays valid
    same(4)
    assert RecordedGraph.captures == 1
    net.load_state_dict({k: v.clone() for k, v in fresh.state_dict().items()}, assign=True)  # new tensors
    same(5), same(6)  # eager again, then recaptured
    assert RecordedGraph.captures == 2
    same(7, B=3)  # another search size: its own tree and graph
    assert len(mcts._GRAPHS[net]) == 2
