"""
CPU kernels for the two tree operations of the batched search, `select` and `expand_backup`, compiled by numba.

What: the same two operations as mcts.py's PyTorch reference and mcts_kernel.py's Triton kernels (same
arguments, same results), as plain loops: tree b's descent (select) or backup (expand_backup) is one iteration
of a loop over the B trees, as it is one Triton program per tree on the GPU. On a CPU the PyTorch reference
pays the fixed cost of ~100 small ops per simulation (~0.3 ms at any B); a loop over the trees costs a few
microseconds at B = 16 and grows with the nodes it touches (B x depth x A).

`simulate` is mcts.search's simulation loop for this backend (trees with float32 latents): the gathers of
the parent's latent and LSTM state before the network call and the stores of the new node's after it are
fused into the two loops, so that a simulation is two compiled calls, the network's `recurrent_inference`
and one softmax.

How: the loops read and write the Tree's tensors in place through their numpy views (`tensor.numpy()` shares
memory on the CPU: no copies), so this backend runs on CPU tensors only and reads them on the host (on a CPU
there is nothing to wait for). `@numba.njit(cache=True)`: compiled at the first call, then cached on disk
(__pycache__ beside this file), so a machine pays the compile (seconds) once.

Rounding: the same float32 operations in the same order as the reference, so both backends pick the same
actions, ties included (scores within 1e-6 of the best tie; the largest tie-break key wins): float32 inputs
and constants (numba keeps float32 op float32 in float32), no FMA contraction (njit without fastmath), the
children's Q summed in the order of their node index as the reference's scatter_add does, and the two values
that go through a transcendental function (the pUCT constant per visit count, the softmax of the policy
logits) computed by torch as the reference computes them. The tests check that every tree tensor is equal.

Shape letters: B trees (roots), N = num_simulations + 1 node slots, A actions, L latent size, H LSTM size.
This file imports nothing of the project (mcts.py imports it, as it does mcts_kernel.py).
"""
import numba
import numpy as np
import torch

ROOT = 0
TIE_EPS = 1e-6  # scores within this of the best are tied (as mcts.TIE_EPS)
f32 = np.float32
# The tree tensors the loops read and write, in the order of their arguments (mcts.Tree's fields, dtypes)
FIELDS = (("visit_count", torch.int32), ("value_sum", torch.float32), ("value_prefix", torch.float32),
          ("parent", torch.int32), ("action", torch.int32), ("depth", torch.int32), ("is_reset", torch.int32),
          ("children", torch.int32), ("prior", torch.float32), ("tiebreak", torch.float32),
          ("min_max", torch.float32))


@numba.njit(cache=True, nogil=True)
def _select(visit_count, value_sum, value_prefix, parent, action, depth, is_reset, children, prior, tiebreak,
            min_max, pb_c, gamma, value_delta_max, tie_eps, leaf):
    """leaf[0, b], leaf[1, b], leaf[2, b] = the parent node, action and depth of tree b's next node (EZ_SPEC §3
    Selection): from the root, take the action of the largest ucb_score until that edge is unexpanded."""
    B, N, A = children.shape
    kid_q = np.empty(A, np.float32)  # Q of each expanded child of the node, by action
    order = np.empty(A, np.int64)  # the expanded children's actions, sorted by node index
    score = np.empty(A, np.float32)
    for b in range(B):
        # Min-max normalization (fixed during a descent): (q - lo) / scale, or q itself while max <= min
        q_min, q_max = min_max[b, 0], min_max[b, 1]
        has_range = q_max > q_min
        lo = q_min if has_range else f32(0.0)
        scale = max(q_max - q_min, value_delta_max) if has_range else f32(1.0)
        node, parent_q = 0, f32(0.0)  # parent_q: the parent mean Q one level up (0 above the root)
        while True:
            node_vp = f32(0.0) if is_reset[b, node] == 1 else value_prefix[b, node]  # a child's reward starts here
            # Q of the expanded children, r + gamma * W / N with r = vp(child) - node_vp
            n_kids = 0
            for a in range(A):
                c = children[b, node, a]
                if c >= 0:
                    kid_q[a] = (value_prefix[b, c] - node_vp) + gamma * (value_sum[b, c] / f32(visit_count[b, c]))
                    j = n_kids  # insert a into `order`, kept sorted by child node index
                    while j > 0 and children[b, node, order[j - 1]] > c:
                        order[j] = order[j - 1]
                        j -= 1
                    order[j] = a
                    n_kids += 1
            sum_q = f32(0.0)
            for j in range(n_kids):
                sum_q += kid_q[order[j]]
            # parent mean Q, the Q of unvisited children: (mean Q one level up + sum Q) / (n + 1); at the root
            # sum Q / n (0 if none)
            mean_q = (parent_q + sum_q) / max(f32(n_kids + (1 if node != ROOT else 0)), f32(1.0))
            # ucb_score = pb_c(N_s) / (n(a) + 1) * P(a) + clamp((Q - lo) / scale, 0, 1)
            if not 0 <= visit_count[b, node] < pb_c.shape[0]:  # (no bounds checks: pb_c has N + 1 entries)
                raise ValueError("select: a visit count above N (a tree used without reset_tree?)")
            node_pb_c = pb_c[visit_count[b, node]]
            best = f32(-np.inf)
            for a in range(A):
                c = children[b, node, a]
                q = kid_q[a] if c >= 0 else mean_q
                n = f32(visit_count[b, c]) if c >= 0 else f32(0.0)
                value_score = min(max((q - lo) / scale, f32(0.0)), f32(1.0))
                score[a] = node_pb_c / (n + f32(1.0)) * prior[b, node, a] + value_score
                best = max(best, score[a])
            # ties: every score >= best - 1e-6; the largest key wins (the first one among equal keys)
            act, key = 0, f32(-1.0)
            for a in range(A):
                if not score[a] < best - tie_eps and tiebreak[b, node, a] > key:  # (keys read for ties only)
                    act, key = a, tiebreak[b, node, a]
            child = children[b, node, act]
            if child < 0:
                break
            node, parent_q = child, mean_q
        leaf[0, b] = node
        leaf[1, b] = act
        leaf[2, b] = depth[b, node] + 1


@numba.njit(cache=True, nogil=True)
def _expand_backup(visit_count, value_sum, value_prefix, parent, action, depth, is_reset, children, prior, tiebreak,
                   min_max, node, leaf_parent, leaf_action, leaf_value_prefix, leaf_value, leaf_prior, gamma,
                   lstm_horizon_len):
    """Write node `node` of every tree under (leaf_parent, leaf_action), then back its value up (EZ_SPEC §3)."""
    B, N, A = children.shape
    for b in range(B):
        # expand
        p, vp = leaf_parent[b], leaf_value_prefix[b]
        if not (0 <= p < node and 0 <= leaf_action[b] < A):  # (no bounds checks below)
            raise ValueError("expand_backup: a parent node or an action out of range")
        d = depth[b, p] + 1
        parent[b, node], action[b, node], depth[b, node] = p, leaf_action[b], d
        is_reset[b, node] = 1 if d % lstm_horizon_len == 0 else 0  # LSTM reset at depth 5, 10, ...
        value_prefix[b, node] = vp
        for a in range(A):
            prior[b, node, a] = leaf_prior[b, a]
        children[b, p, leaf_action[b]] = node
        # backpropagate: G = value; at each node W += G, N += 1; below the root the min-max stats take
        # Q = r + gamma * W / N, then G = r + gamma * G (r = vp(node) - vp(parent), or vp(node) below a reset)
        q_min, q_max = min_max[b, 0], min_max[b, 1]
        g = leaf_value[b]
        cur, cur_vp = node, vp
        while cur != ROOT:
            w = value_sum[b, cur] + g
            n = visit_count[b, cur] + 1
            value_sum[b, cur], visit_count[b, cur] = w, n
            parent_vp = value_prefix[b, p]
            r = cur_vp - (f32(0.0) if is_reset[b, p] == 1 else parent_vp)
            q = r + gamma * (w / f32(n))
            q_min, q_max = min(q_min, q), max(q_max, q)
            g = r + gamma * g
            cur, cur_vp = p, parent_vp
            p = parent[b, p]  # (the root's parent, -1, is never used)
        value_sum[b, ROOT] += g
        visit_count[b, ROOT] += 1
        min_max[b, 0], min_max[b, 1] = q_min, q_max


@numba.njit(cache=True, nogil=True)
def _select_gather(visit_count, value_sum, value_prefix, parent, action, depth, is_reset, children, prior, tiebreak,
                   min_max, pb_c, gamma, value_delta_max, tie_eps, leaf, latent, lstm_h, lstm_c, x, h, c):
    """_select, then x, h, c [B, L or H] = the parent node's latent and LSTM state ([B * N, L or H] views)."""
    _select(visit_count, value_sum, value_prefix, parent, action, depth, is_reset, children, prior, tiebreak,
            min_max, pb_c, gamma, value_delta_max, tie_eps, leaf)
    B, N = visit_count.shape
    for b in range(B):  # (element loops: a slice per tree costs more than the copy)
        row = b * N + leaf[0, b]
        for k in range(x.shape[1]):
            x[b, k] = latent[row, k]
        for k in range(h.shape[1]):
            h[b, k] = lstm_h[row, k]
            c[b, k] = lstm_c[row, k]


@numba.njit(cache=True, nogil=True)
def _store_expand_backup(visit_count, value_sum, value_prefix, parent, action, depth, is_reset, children, prior,
                         tiebreak, min_max, node, leaf, leaf_value_prefix, leaf_value, leaf_prior, gamma,
                         lstm_horizon_len, latent, lstm_h, lstm_c, x, h, c):
    """Store the new node's latent and LSTM state (zeroed at an LSTM reset: times 0, as mcts.search), then
    _expand_backup."""
    B, N = visit_count.shape
    for b in range(B):
        row = b * N + node
        keep = f32(0.0) if leaf[2, b] % lstm_horizon_len == 0 else f32(1.0)
        for k in range(x.shape[1]):
            latent[row, k] = x[b, k]
        for k in range(h.shape[1]):
            lstm_h[row, k] = h[b, k] * keep
            lstm_c[row, k] = c[b, k] * keep
    _expand_backup(visit_count, value_sum, value_prefix, parent, action, depth, is_reset, children, prior, tiebreak,
                   min_max, node, leaf[0], leaf[1], leaf_value_prefix, leaf_value, leaf_prior, gamma,
                   lstm_horizon_len)


# ---------------------------------------------------------------------------------------------
# Wrappers: same arguments and results as mcts.select / mcts.expand_backup (CPU tensors); the search loop
# ---------------------------------------------------------------------------------------------
_PB_C = {}  # (N, pb_c_base, pb_c_init) -> [N + 1] f32 pb_c per visit count, computed as mcts.select does


def _constants(N, pb_c_base, pb_c_init, gamma, value_delta_max):
    key = (N, float(pb_c_base), float(pb_c_init))
    if key not in _PB_C:
        n_s = torch.arange(N + 1, dtype=torch.float32)
        _PB_C[key] = ((torch.log((n_s + pb_c_base + 1) / pb_c_base) + pb_c_init) * torch.sqrt(n_s)).numpy()
    return _PB_C[key], f32(gamma), f32(value_delta_max), f32(TIE_EPS)


def _views(tree):
    """numpy views of the tree tensors (FIELDS order), checked: CPU, dtype, contiguous."""
    views = []
    for name, dtype in FIELDS:
        t = getattr(tree, name)
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"the numba backend needs contiguous CPU tensors of the tree's dtypes; tree.{name} is "
                             f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
        views.append(t.numpy())
    return views


def _f32(t, *shape):
    """A float32 C-contiguous numpy view (or copy) of t, reshaped (an error where the size differs: the loops
    do not check their bounds)."""
    return t.float().reshape(shape).contiguous().numpy()


def select(tree, pb_c_base, pb_c_init, gamma, value_delta_max):
    """Descend every tree from the root to an unexpanded edge.
    Returns (parent_node [B] int64, action [B] int64, depth [B] int64), depth = the new node's."""
    B, N, A = tree.children.shape
    leaf = torch.empty(3, B, dtype=torch.int64)
    _select(*_views(tree), *_constants(N, pb_c_base, pb_c_init, gamma, value_delta_max), leaf.numpy())
    return leaf.unbind(0)


def expand_backup(tree, node, parent_node, action, value_prefix, value, policy_logits, gamma, lstm_horizon_len):
    """Write node `node` of every tree under (parent_node, action) and back its value up to the root, in place
    (the search loop writes the node's latent and LSTM state itself)."""
    B, N, A = tree.children.shape
    node = int(node)
    assert 0 < node < N, f"node {node} outside 1..{N - 1}"
    leaf = torch.stack([parent_node.long(), action.long()]).reshape(2, B).numpy()
    prior = torch.softmax(policy_logits.float(), -1)  # [B, A], as the reference computes it
    _expand_backup(*_views(tree), node, leaf[0], leaf[1], _f32(value_prefix, B), _f32(value, B), _f32(prior, B, A),
                   f32(gamma), int(lstm_horizon_len))


def simulate(tree, model, loop, pb_c_base, pb_c_init, gamma, value_delta_max, lstm_horizon_len):
    """mcts.search's simulation loop `loop` (simulation i expands node i of every tree), the same steps with the
    gathers and stores inside the two compiled calls; `loop` itself where the latents are not float32."""
    if not all(t.dtype == torch.float32 for t in (tree.latent, tree.lstm_h, tree.lstm_c)):
        return loop()
    B, N, A = tree.children.shape
    arrays, consts = _views(tree), _constants(N, pb_c_base, pb_c_init, gamma, value_delta_max)
    latent_shape, L, H = tree.latent.shape[2:], tree.latent[0, 0].numel(), tree.lstm_h.shape[2]
    states = [t.view(B * N, -1).numpy() for t in (tree.latent, tree.lstm_h, tree.lstm_c)]  # [B * N, L or H]
    for i in range(1, N):
        leaf = torch.empty(3, B, dtype=torch.int64)  # new tensors every time: the model may keep its inputs
        x, h, c = torch.empty(B, *latent_shape), torch.empty(B, H), torch.empty(B, H)
        _select_gather(*arrays, *consts, leaf.numpy(), *states, x.view(B, L).numpy(), h.numpy(), c.numpy())
        parent, action, depth = leaf.unbind(0)
        out = model.recurrent_inference(x, (h, c), action, depth)  # depth: BatchNorm statistics of that depth
        prior = torch.softmax(out.policy_logits.float(), -1)  # [B, A], as the reference computes it
        _store_expand_backup(*arrays, i, leaf.numpy(), _f32(out.value_prefix, B), _f32(out.value, B),
                             _f32(prior, B, A), consts[1], int(lstm_horizon_len), *states,
                             _f32(out.latent, B, L), _f32(out.lstm_state[0], B, H), _f32(out.lstm_state[1], B, H))
