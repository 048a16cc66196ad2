"""Batched MCTS of EfficientZero (Ye et al. 2021, arXiv:2111.00210) over preallocated tensors.

What: B search trees grown side by side, one batched `recurrent_inference` per simulation for all of them.
The tree is a struct of tensors (mctx style): node 0 is the root, the node expanded by simulation i is
node i, so nothing is allocated inside the search. This file holds the readable PyTorch reference of the two
tree operations, `select` and `expand_backup`; `mcts_kernel.py` holds Triton kernels (GPU) and `mcts_cpu.py`
numba loops (CPU) with the same arguments and results (picked with `backend=`).

Spec: EZ_SPEC.md §3 (MCTS: constants, root expansion, pUCT, parent mean Q, min-max, value prefix,
LSTM reset, backup, outputs, action selection).
MuZero pseudocode names (arXiv:1911.08265 App. B): ucb_score, backpropagate, MinMaxStats,
pb_c_init, pb_c_base.

Shape letters: B trees (roots) in the batch, N = num_simulations + 1 node slots per tree,
A actions, H the LSTM hidden size; latents are [B, N, *latent_shape].

Differences from the original EfficientZero search (core/ctree), each on purpose (README "Differences"):
1. pUCT uses N_s = the node's own visit count (the root starts at 1, a leaf's first visit is its
   own backed-up value), as MuZero's pseudocode and mctx; the original uses visit_count - 1, which
   zeroes the prior term on a node's first descent and leaves that choice to the tie-break.
2. The root's value_sum starts at the network's root value (the original starts it at 0 with
   visit count 1); so root_value = (v_root + sum of backed-up values) / (N + 1).
3. "Parent mean Q" of unvisited children is computed per tree; the original carried it from one
   root of the batch into the next (LightZero PR #474/#477).
4. Min-max stats take the Q of every node on the backup path (after its update), with its true
   parent, and only ever widen (MuZero's MinMaxStats); bounds start at +-3.4e38. The original
   cleared and rebuilt them after each backup from the current Q of every node, by a DFS that
   used the previously popped node's value prefix instead of the parent's (EfficientZero
   issue #33), so its bounds could also shrink; it started them at +-1e6.
5. Ties (scores within 1e-6 of the best) are broken by the largest key of a [B, N, A] tensor of
   uniform keys drawn once per search from the search's torch.Generator, not by a clock-seeded
   rand(): ties break at random yet reproducibly, and identically in both backends.
6. Dirichlet noise is drawn on the device from the search's generator (Gamma by Marsaglia-Tsang),
   not per root with numpy.
"""
from __future__ import annotations

import functools
import importlib
import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch

ROOT = 0
UNVISITED = -1
MIN_INIT, MAX_INIT = 3.4e38, -3.4e38  # min-max stats start empty (min > max)
TIE_EPS = 1e-6  # scores within this of the best are tied (EZ_SPEC §3 Selection)


@dataclass
class Tree:
    """B trees of N node slots with A actions; node i is made by simulation i."""

    visit_count: torch.Tensor  # [B, N] int32
    value_sum: torch.Tensor  # [B, N] f32
    value_prefix: torch.Tensor  # [B, N] f32 predicted value prefix of the edge into the node (root 0)
    parent: torch.Tensor  # [B, N] int32 (root -1)
    action: torch.Tensor  # [B, N] int32 action taken from the parent (root -1)
    depth: torch.Tensor  # [B, N] int32 (root 0)
    is_reset: torch.Tensor  # [B, N] int32 1 where depth % lstm_horizon_len == 0 and depth > 0
    children: torch.Tensor  # [B, N, A] int32 child node, UNVISITED where not expanded
    prior: torch.Tensor  # [B, N, A] f32 softmax of the policy logits (root: mixed with noise)
    min_max: torch.Tensor  # [B, 2] f32 (min, max) of the Q values met on backups
    tiebreak: torch.Tensor  # [B, N, A] f32 uniform [0, 1) keys, drawn once per search
    latent: torch.Tensor  # [B, N, *latent_shape]
    lstm_h: torch.Tensor  # [B, N, H]
    lstm_c: torch.Tensor  # [B, N, H]


def make_tree(B, N, A, latent_shape, lstm_hidden, device, latent_dtype=torch.float32) -> Tree:
    """Allocate B trees of N node slots (N = num_simulations + 1) and A actions."""
    i32, f32 = dict(dtype=torch.int32, device=device), dict(dtype=torch.float32, device=device)
    tree = Tree(  # shapes and meanings: the Tree fields above
        visit_count=torch.empty(B, N, **i32), value_sum=torch.empty(B, N, **f32),
        value_prefix=torch.empty(B, N, **f32), parent=torch.empty(B, N, **i32), action=torch.empty(B, N, **i32),
        depth=torch.empty(B, N, **i32), is_reset=torch.empty(B, N, **i32), children=torch.empty(B, N, A, **i32),
        prior=torch.empty(B, N, A, **f32), min_max=torch.empty(B, 2, **f32), tiebreak=torch.empty(B, N, A, **f32),
        latent=torch.empty(B, N, *latent_shape, dtype=latent_dtype, device=device),
        lstm_h=torch.empty(B, N, lstm_hidden, **f32), lstm_c=torch.empty(B, N, lstm_hidden, **f32),
    )
    reset_tree(tree)
    return tree


def reset_tree(tree: Tree) -> None:
    """Empty every tree in place (latent and LSTM slots are overwritten before they are read)."""
    for t in (tree.visit_count, tree.value_sum, tree.value_prefix, tree.depth, tree.is_reset, tree.prior):
        t.zero_()
    for t in (tree.parent, tree.action, tree.children):
        t.fill_(UNVISITED)
    tree.min_max[:, 0] = MIN_INIT
    tree.min_max[:, 1] = MAX_INIT


# ---- Random numbers on the device from an explicit generator (no host sync) ----
def sample_gamma(alpha: float, shape, generator, device, proposals: int = 8) -> torch.Tensor:
    """Gamma(alpha, 1) variates, returned as their logarithm (Gamma(0.3) underflows float32).

    Marsaglia & Tsang (2000) on alpha + 1, then the boost Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha).
    The rejection loop is unrolled into `proposals` candidates per variate and the first accepted
    one is kept. A candidate is accepted with probability 0.967 for alpha = 0.3 (more for larger
    alpha), so the first 7 all fail with probability 4e-11; then the 8th is taken as it is.
    """
    a = alpha + 1.0 if alpha < 1.0 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    x = torch.randn(proposals, *shape, generator=generator, device=device)
    u = torch.rand(proposals, *shape, generator=generator, device=device)
    v = (1.0 + c * x) ** 3
    log_v = torch.log(v.clamp(min=1e-30))
    accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * log_v)
    accept[-1] = True  # fallback for the (4e-11) case where all the others were rejected
    first = accept.int().argmax(0, keepdim=True)  # index of the first accepted candidate
    log_g = math.log(d) + log_v.gather(0, first).squeeze(0)  # log(d * v)
    if alpha < 1.0:
        u_boost = torch.rand(*shape, generator=generator, device=device)
        log_g = log_g + torch.log(u_boost.clamp(min=1e-38)) / alpha
    return log_g


def sample_dirichlet(alpha: float, B: int, A: int, generator, device) -> torch.Tensor:
    """[B, A] rows from a symmetric Dirichlet(alpha): normalized Gamma variates (in log space)."""
    return torch.softmax(sample_gamma(alpha, (B, A), generator, device), dim=-1)


# ---- The PyTorch reference of the two tree operations (same arguments as mcts_kernel.py) ----
def _host_reads(device: torch.device) -> bool:
    """May the search read a value on the host? On the CPU (nothing to wait for) the depth loops stop once
    every tree is done; on CUDA they run a fixed number of levels, no host sync (trees done stay put)."""
    return device.type == "cpu"


def select(tree: Tree, pb_c_base: float, pb_c_init: float, gamma: float, value_delta_max: float):
    """Descend every tree from the root to an unexpanded edge, maximizing ucb_score at each node.

    Returns (parent_node [B] int64, action [B] int64, depth [B] int64): the new node goes under
    parent_node by action, at depth `depth`. MuZero App. B `select_child`; EZ_SPEC §3 Selection.
    """
    B, N, A = tree.children.shape
    device = tree.children.device
    first = torch.arange(0, B * N, N, device=device)  # [B] flat index b * N of each tree's root

    # Per node, for every slot at once ([B, N], read at flat index b * N + node):
    # Q of the edge into the node, r(parent -> node) + gamma * (W / N). EZ_SPEC §3: the reward is
    # the value-prefix difference vp(node) - vp(parent), or vp(node) when the parent was reset.
    parent = tree.parent.clamp(min=0).long()  # [B, N] (the root points at itself)
    is_child = (tree.parent >= 0).float()  # [B, N] 1 for expanded non-root nodes (each one visited)
    visits = tree.visit_count.float()
    vp_for_children = torch.where(tree.is_reset == 1, 0.0, tree.value_prefix)  # prefix a child's reward starts from
    reward = tree.value_prefix - vp_for_children.gather(1, parent)
    q = reward + gamma * (tree.value_sum / visits.clamp(min=1))
    # pb_c = (log((N_s + pb_c_base + 1) / pb_c_base) + pb_c_init) * sqrt(N_s)  (MuZero App. B),
    # a function of the integer visit count N_s <= N only: tabulated for 0..N, then looked up.
    n_s = torch.arange(N + 1, device=device, dtype=torch.float32)
    pb_c_of = (torch.log((n_s + pb_c_base + 1) / pb_c_base) + pb_c_init) * torch.sqrt(n_s)  # [N + 1]
    pb_c = pb_c_of.index_select(0, tree.visit_count.view(-1))  # [B * N]
    # "Parent mean Q" (EZ_SPEC §3): at the root the mean Q of its visited children (0 if none);
    # below it (mean Q one level up + sum of the visited children's Q) / (n visited + 1).
    sum_q = torch.zeros_like(q).scatter_add_(1, parent, q * is_child)  # sum of the children's Q
    n_children = torch.zeros_like(q).scatter_add_(1, parent, is_child)
    mean_q_div = (n_children + is_child).clamp(min=1)
    # A child is read at flat index b * N + max(child, 0), so an unexpanded child (UNVISITED)
    # reads the root's slot; the root is nobody's child, so that slot can hold what an unvisited
    # child reads: 0 visits, and (written at each level below) the parent mean Q as its Q.
    child_visits = visits * is_child  # [B, N]
    # Min-max normalization (EZ_SPEC §3): (q - min) / max(max - min, delta) when max > min,
    # else q unchanged; written as (q - lo) / scale with lo = 0, scale = 1 in the second case.
    lo, hi = tree.min_max[:, 0:1], tree.min_max[:, 1:2]  # [B, 1]
    has_range = hi > lo
    scale = torch.where(has_range, (hi - lo).clamp(min=value_delta_max), 1.0)  # [B, 1]
    lo = torch.where(has_range, lo, 0.0)  # [B, 1]
    q_of, sum_q, mean_q_div, child_visits = (t.view(-1) for t in (q, sum_q, mean_q_div, child_visits))  # [B*N]
    children_of = tree.children.view(B * N, A)
    prior_of = tree.prior.view(B * N, A)
    tiebreak_of = tree.tiebreak.view(B * N, A)
    first_col = first[:, None]  # [B, 1]

    node = torch.zeros(B, dtype=torch.long, device=device)  # [B] current node, starts at the root
    mean_q = torch.zeros(B, device=device)  # [B] parent mean Q one level up (0 above the root)
    for _ in range(N):  # a path has at most N nodes
        row = first + node  # [B]
        children = children_of.index_select(0, row)  # [B, A] UNVISITED where not expanded
        child = first_col + children.clamp(min=0)  # [B, A]
        node_mean_q = (mean_q + sum_q.take(row)) / mean_q_div.take(row)  # [B]
        q[:, ROOT] = node_mean_q  # the Q an unvisited child reads
        # ucb_score = prior_score + value_score (MuZero App. B, EZ_SPEC §3)
        value_score = ((q_of.take(child) - lo) / scale).clamp(0.0, 1.0)  # [B, A]
        prior_score = pb_c.take(row)[:, None] / (child_visits.take(child) + 1) * prior_of.index_select(0, row)  # [B, A]
        action = argmax_tiebreak(prior_score + value_score, tiebreak_of.index_select(0, row))  # [B]
        next_node = children.gather(1, action[:, None]).squeeze(1)  # [B] UNVISITED at the leaf edge
        descend = next_node >= 0  # [B]
        # A tree that reached its unexpanded edge stays put: the next level recomputes the same choice.
        node = torch.where(descend, next_node, node)
        mean_q = torch.where(descend, node_mean_q, mean_q)
        if _host_reads(device) and not bool(descend.any()):  # sync point (CPU only): every tree is done
            break
    depth = tree.depth.view(-1).take(first + node).long() + 1  # [B]
    return node, action, depth


def argmax_tiebreak(score: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim; every score >= best - 1e-6 ties, the largest key among them wins."""
    best = score.amax(-1, keepdim=True)  # [B, 1]
    return keys.masked_fill(score < best - TIE_EPS, -1.0).argmax(-1)  # [B]


def expand_backup(tree: Tree, node: int, parent_node, action, value_prefix, value, policy_logits,
                  gamma: float, lstm_horizon_len: int) -> None:
    """Write node `node` under (parent_node, action) in every tree, then backpropagate its value.

    EZ_SPEC §3 Leaf expansion and Backup; MuZero App. B `expand_node`, `backpropagate`.
    value_prefix, value [B] f32 and policy_logits [B, A] f32 are the outputs of recurrent_inference.
    (The search loop stores the node's latent and LSTM state.)
    """
    B, N, A = tree.children.shape
    device = tree.children.device
    first = torch.arange(0, B * N, N, device=device)  # [B] flat index b * N of each tree's root
    # expand
    depth = tree.depth.view(-1).take(first + parent_node) + 1  # [B]
    tree.parent[:, node] = parent_node
    tree.action[:, node] = action
    tree.depth[:, node] = depth
    tree.is_reset[:, node] = depth % lstm_horizon_len == 0  # LSTM reset at depth 5, 10, ...
    tree.value_prefix[:, node] = value_prefix
    tree.prior[:, node] = torch.softmax(policy_logits, -1)
    tree.children.view(-1).index_fill_(0, (first + parent_node) * A + action, node)

    # The path from the new node up to the root, as flat indices b * N + node: follow the parents
    # (the root points at itself). A path has depth + 1 nodes; L = the longest in the batch, known
    # on the CPU, N on CUDA (no host sync), the root repeated below the end of a shorter path.
    up = (first[:, None] + tree.parent.clamp(min=0)).view(-1)  # [B * N] flat index of each node's parent
    L = int(depth.max()) if _host_reads(device) else N  # sync point (CPU only)
    path = [first + node]
    for _ in range(L):
        path.append(up.take(path[-1]))
    path = torch.stack(path, 1)  # [B, L + 1] leaf first
    on_path = torch.arange(L + 1, device=device) <= depth[:, None]  # [B, L + 1]

    # backpropagate (EZ_SPEC §3 Backup): G = value; at each node W += G, N += 1, then (below the
    # root) the min-max stats take Q = r + gamma * (W / N), and G = r + gamma * G, where r is the
    # value-prefix reward of the edge into the node: vp(node) - vp(parent), or vp(node) when the
    # parent was reset.
    vp = tree.value_prefix.view(-1).take(path)  # [B, L + 1]
    vp_for_children = torch.where(tree.is_reset.view(-1).take(path) == 1, 0.0, vp)
    reward = vp[:, :-1] - vp_for_children[:, 1:]  # [B, L] r of the edge into path[:, k]
    g = [value]  # G at path[:, k]
    for r in reward.unbind(1):
        g.append(r + gamma * g[-1])
    g = torch.where(on_path, torch.stack(g, 1), 0.0)  # [B, L + 1] 0 off the path
    tree.value_sum.view(-1).index_add_(0, path.view(-1), g.view(-1))
    tree.visit_count.view(-1).index_add_(0, path.view(-1), on_path.view(-1).int())
    # min-max stats: Q of every node below the root on the path, after its update
    below_root = on_path[:, 1:]  # [B, L] path[:, k] has a parent on the path
    w, n = tree.value_sum.view(-1).take(path[:, :-1]), tree.visit_count.view(-1).take(path[:, :-1])
    q = reward + gamma * (w / n)  # [B, L]
    tree.min_max[:, 0] = torch.minimum(tree.min_max[:, 0], torch.where(below_root, q, MIN_INIT).amin(1))
    tree.min_max[:, 1] = torch.maximum(tree.min_max[:, 1], torch.where(below_root, q, MAX_INIT).amax(1))


def resolve_backend(backend: str, device: torch.device) -> str:
    """Backend "auto" is "triton" for CUDA tensors, else "numba" where numba imports, else "torch"."""
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "numba" if _numba_imports() else "torch"
    return backend


@functools.cache
def _numba_imports() -> bool:
    try:
        return importlib.import_module("mcts_cpu") is not None
    except ImportError:  # numba missing, or too old or new for this numpy
        return False


def _tree_ops(backend: str, device: torch.device):
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return select, expand_backup
    if backend not in ("triton", "numba"):
        raise ValueError(f"unknown backend {backend!r}")
    module = importlib.import_module({"triton": "mcts_kernel", "numba": "mcts_cpu"}[backend])  # lazily (torch: neither)
    return module.select, module.expand_backup


# ---- The search (EZ_SPEC §3): root, then num_simulations x (select, recurrent_inference, expand_backup) ----
class SearchResult(NamedTuple):
    visit_counts: torch.Tensor  # [B, A] int32, root children visits, sum to num_simulations
    root_values: torch.Tensor  # [B] f32 value_sum / visit_count of the root
    tree: Tree  # reusable for the next search of the same size; tree.depth[:, 1:] = expanded depths


def search_kwargs(cfg) -> dict:
    """The search constants of a config.Config as keyword arguments of search (EZ_SPEC §3)."""
    return dict(gamma=cfg.discount, pb_c_base=cfg.pb_c_base, pb_c_init=cfg.pb_c_init,
                root_dirichlet_alpha=cfg.root_dirichlet_alpha, root_exploration_fraction=cfg.root_exploration_fraction,
                lstm_horizon_len=cfg.lstm_horizon_len, value_delta_max=cfg.value_delta_max, backend=cfg.search_backend,
                cuda_graphs=getattr(cfg, "cuda_graphs", True))  # (configs made before the field: on)


def search(model, root, num_simulations: int, *, add_noise: bool | torch.Tensor, generator: torch.Generator,
           gamma: float = 0.997**4, pb_c_base: float = 19652, pb_c_init: float = 1.25,
           root_dirichlet_alpha: float = 0.3, root_exploration_fraction: float = 0.25,
           lstm_horizon_len: int = 5, value_delta_max: float = 0.01, backend: str = "auto",
           tree: Tree | None = None, cuda_graphs: bool = True) -> SearchResult:
    """Run num_simulations simulations from B roots (root = model.initial_inference(obs)).

    EZ_SPEC §3. No host sync inside the simulation loop on CUDA. The search runs under
    torch.inference_mode (no_grad, and cheaper small ops); the tree it returns holds inference
    tensors (read them, or pass the tree back with tree=), visit_counts and root_values are
    ordinary tensors. On CUDA with cuda_graphs=True the simulation loop is replayed from a CUDA
    graph ("CUDA graphs" below); the tree is then the one cached with the graph (tree= is ignored)
    and is overwritten by the next search of the same model and size.
    """
    (B, A), N = root.policy_logits.shape, num_simulations + 1
    device = root.policy_logits.device
    backend = resolve_backend(backend, device)
    select_fn, expand_backup_fn = _tree_ops(backend, device)
    latent_shape, H = tuple(root.latent.shape[1:]), root.lstm_state[0].shape[-1]
    graphed = None
    if cuda_graphs and _graphs_available(device):  # one cached Tree and graph per (model, search size)
        key = (B, N, A, latent_shape, root.latent.dtype, H, backend, gamma, pb_c_base, pb_c_init, value_delta_max,
               lstm_horizon_len)
        graphed = _GRAPHS.setdefault(model, {}).setdefault(key, _Graphed())  # (model: weak-referenceable)
        tree = graphed.tree
    with torch.inference_mode():
        if tree is None or tree.children.shape != (B, N, A) or tuple(tree.latent.shape[2:]) != latent_shape:
            tree = make_tree(B, N, A, latent_shape, H, device, root.latent.dtype)
        else:
            reset_tree(tree)
        if graphed is not None:
            graphed.tree = tree

        # Root (EZ_SPEC §3 Root expansion): visit 1, value_sum = network value, prior from the policy
        prior = torch.softmax(root.policy_logits.float(), dim=-1)  # [B, A]
        if add_noise is not False:  # P <- (1 - f) P + f Dir(alpha), self-play and reanalysis (True or a [B] mask)
            noise = sample_dirichlet(root_dirichlet_alpha, B, A, generator, device)  # [B, A]
            noisy = (1 - root_exploration_fraction) * prior + root_exploration_fraction * noise
            prior = noisy if add_noise is True else torch.where(add_noise[:, None], noisy, prior)
        tree.prior[:, ROOT] = prior
        tree.visit_count[:, ROOT] = 1
        tree.value_sum[:, ROOT] = root.value.float()
        tree.latent[:, ROOT] = root.latent
        tree.lstm_h[:, ROOT] = root.lstm_state[0]
        tree.lstm_c[:, ROOT] = root.lstm_state[1]
        tree.tiebreak.uniform_(0.0, 1.0, generator=generator)  # [B, N, A] tie-break keys

        def simulate():  # reads and writes only `tree` and the model's weights: a CUDA graph can replay it
            first = torch.arange(B, device=device) * N  # [B] flat index of each tree's root
            latent_of, h_of, c_of = (t.flatten(0, 1) for t in (tree.latent, tree.lstm_h, tree.lstm_c))  # [B*N, ...]
            for i in range(1, N):  # simulation i expands node i
                parent, action, depth = select_fn(tree, pb_c_base, pb_c_init, gamma, value_delta_max)
                rows = first + parent  # [B]
                out = model.recurrent_inference(
                    latent_of.index_select(0, rows), (h_of.index_select(0, rows), c_of.index_select(0, rows)),
                    action, depth,  # [B] the new node's depth: BatchNorm statistics of that unroll depth (model.py)
                )
                # LSTM reset (EZ_SPEC §3): the new node at depth % lstm_horizon_len == 0 stores a zero state
                keep = (depth % lstm_horizon_len != 0).float()[:, None]  # [B, 1]
                tree.latent[:, i] = out.latent
                tree.lstm_h[:, i] = out.lstm_state[0] * keep
                tree.lstm_c[:, i] = out.lstm_state[1] * keep
                expand_backup_fn(tree, i, parent, action, out.value_prefix.float().contiguous(),
                                 out.value.float().contiguous(), out.policy_logits.float().contiguous(),
                                 gamma, lstm_horizon_len)

        if backend == "numba":  # the loop above, the gathers and stores fused into the numba tree operations
            simulate = functools.partial(importlib.import_module("mcts_cpu").simulate, tree, model, simulate, pb_c_base,
                                         pb_c_init, gamma, value_delta_max, lstm_horizon_len)
        if graphed is None:
            simulate()
        else:
            graphed.run(simulate, model)

        root_children = tree.children[:, ROOT].long()  # [B, A]
        visits = tree.visit_count.gather(1, root_children.clamp(min=0))
        visit_counts = torch.where(root_children >= 0, visits, 0).int()  # [B, A]
        root_values = tree.value_sum[:, ROOT] / tree.visit_count[:, ROOT]  # [B]
    # copies made outside inference mode are ordinary tensors (usable as training targets)
    return SearchResult(visit_counts.clone(), root_values.clone(), tree)


# ---- CUDA graphs of the simulation loop (on by default on CUDA; search(cuda_graphs=False) turns them off) ----
# A search launches thousands of small kernels, whose CPU cost exceeds the GPU's work at small B. The
# loop has a fixed shape and no host sync, touches only the Tree and the model's weights, and draws no
# random numbers (root noise and tie-break keys come first), so it is recorded once per (model, search
# size) and replayed. Kernel arguments (addresses, floats) are frozen at capture: one cached Tree per
# graph, each root written into it in place, new weights copied into the same parameters (load_state_dict
# copies in place: train.py's refreshes of the acting and target networks). New tensors are recaptured.
_GRAPHS = weakref.WeakKeyDictionary()  # model -> {search shape: _Graphed}; dropped with the model


def _graphs_available(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _weight_addresses(model) -> tuple:
    """Addresses of an nn.Module's parameters and buffers (other models: none to check)."""
    tensors = list(model.parameters()) + list(model.buffers()) if isinstance(model, torch.nn.Module) else []
    return tuple(t.data_ptr() for t in tensors)


class _Graphed:
    """The cached Tree of one (model, search size) and the CUDA graph of its simulation loop."""

    def __init__(self):
        self.tree, self.graph, self.addresses, self.stream = None, None, None, None

    def run(self, simulate, model):
        addresses = _weight_addresses(model)
        if addresses != self.addresses:  # first search, or new weight tensors: eager, on the capture stream
            self.graph, self.addresses = None, addresses  # (compiles the kernels, warms cuBLAS up)
            self.stream = self.stream or torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                simulate()
            torch.cuda.current_stream().wait_stream(self.stream)
            return
        if self.graph is None:  # second search: record the loop (that runs nothing), then replay it
            self.graph = _capture(simulate, self.stream)
        self.graph.replay()


def _capture(fn, stream):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph


@torch.no_grad()
def run_search(model, obs, cfg, num_simulations, add_noise, generator, tree):
    """One batched search over all envs' observations obs [E, *O] (the model must be in eval mode)."""
    root = model.initial_inference(torch.as_tensor(obs, device=generator.device))
    return search(model, root, num_simulations, add_noise=add_noise, generator=generator, tree=tree,
                  **search_kwargs(cfg))


def select_action(visit_counts: torch.Tensor, temperature: float, generator: torch.Generator,
                  deterministic: bool) -> torch.Tensor:
    """Actions [B] int64 from root visit counts [B, A]: argmax (first index on ties) when
    deterministic, else a sample with probability proportional to n(a)^(1/T) (EZ_SPEC §3 Action
    selection), drawn by Gumbel-max on the device (no host sync)."""
    if deterministic:
        return visit_counts.argmax(-1)
    logits = torch.log(visit_counts.float()) / temperature  # [B, A] log n^(1/T), -inf where n = 0
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(u))
    return (logits + gumbel).argmax(-1)
