"""
Triton kernels for the two tree operations of the batched search: `select` and `expand_backup`.

What: one simulation of EfficientZero's MCTS (EZ_SPEC §3) for B trees at once is
    select  -> one recurrent_inference on B (latent[parent], lstm[parent], action) -> expand_backup.
The network call is one big batched matmul; the two tree walks around it are tiny, branchy,
data-dependent loops. In PyTorch each level of a walk is a handful of kernel launches over [B, A]
tensors, repeated up to `max depth` times, so a simulation costs hundreds of launches. Here each
walk is ONE launch: program b walks tree b from the root to a leaf (select) or from the new leaf
back to the root (expand_backup), keeping everything it carries (node, depth, the parent's mean Q,
the value being backed up, the min-max bounds) in registers.

Why one tree per program: a tree's walk is sequential (the next node depends on the last load),
so the parallelism is across trees; the A actions of one node are a [BLOCK_A] vector (BLOCK_A =
next power of 2 of A, masked), which fits one warp for Atari's A <= 18. B programs of one warp
each keep every SM busy for the B (hundreds to thousands) roots of self-play and reanalysis.

The tree layout and the exact semantics are the contract shared with the PyTorch reference in
mcts.py (its docstring and the Tree fields): node i of every tree is made by
simulation i, children == -1 marks an unexpanded edge, all tree ints are int32, and the kernels
index everything with int64 offsets from base pointers (no loaded pointers, so the same code
runs under TRITON_INTERPRET=1 on the CPU, which is how the tests check it against mcts.py).

Rounding: the kernels divide and take square roots with IEEE rounding (div_rn, sqrt_rn) and
launch without FMA contraction, as PyTorch computes, so the two backends round alike on the GPU
too and a tie (scores within 1e-6 of the best) is decided the same way. (tl.exp in the softmax
is the fast hardware exp on the GPU: priors can differ from the reference in the last bits.)

Check and timing: `python bench.py kernels` fills trees through both backends, checks that they
stay identical step by step, and times them (on a CPU: `TRITON_INTERPRET=1 python bench.py kernels`,
correct but slow). This file imports nothing of the project, so mcts.py can import it.

Shape letters: B trees (roots), N = num_simulations + 1 node slots, A actions.
"""
import torch
import triton
import triton.language as tl

ROOT = 0
UNVISITED = -1


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def select_kernel(
    visit_count_ptr,   # [B, N] int32, tree.visit_count
    value_sum_ptr,     # [B, N] f32, tree.value_sum
    value_prefix_ptr,  # [B, N] f32, tree.value_prefix (of the edge into the node)
    is_reset_ptr,      # [B, N] int32, tree.is_reset
    children_ptr,      # [B, N, A] int32, tree.children (-1: not expanded)
    prior_ptr,         # [B, N, A] f32, tree.prior
    tiebreak_ptr,      # [B, N, A] f32, tree.tiebreak (uniform keys, larger wins among ties)
    min_max_ptr,       # [B, 2] f32, tree.min_max (min, max) of Q seen on backups
    out_parent_ptr,    # [B] int64, out: node whose edge is expanded next
    out_action_ptr,    # [B] int64, out: the action of that edge
    out_depth_ptr,     # [B] int64, out: depth of the node that will be made there
    N,                 # node slots per tree
    A,                 # number of actions
    pb_c_base,         # c2 of pUCT (19652)
    pb_c_init,         # c1 of pUCT (1.25)
    gamma,             # discount per search step
    value_delta_max,   # floor of the min-max range (0.01)
    BLOCK_A: tl.constexpr,  # next power of 2 >= A
):
    b = tl.program_id(0).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)  # [BLOCK_A]
    mask_a = offs_a < A
    row = b * N  # offset of tree b's root in the [B, N] arrays (int64)

    # Per-tree min-max normalisation of Q (EZ_SPEC §3 "Min-max normalization"): fixed during a
    # descent, since only backups move it.
    q_min = tl.load(min_max_ptr + 2 * b)
    q_max = tl.load(min_max_ptr + 2 * b + 1)
    has_range = q_max > q_min  # false until two different Q were seen
    q_lo = tl.where(has_range, q_min, 0.0)  # (the +-3.4e38 start values never enter arithmetic)
    q_scale = tl.maximum(tl.where(has_range, q_max, 0.0) - q_lo, value_delta_max)

    # Loop-carried scalars: the node we stand on, the child chosen there, the action, the depth
    # of that child, and the "parent mean Q" computed one level up on this descent.
    child = b * 0  # int64, starts at ROOT
    node = b * 0
    action = tl.full((), 0, tl.int32)
    depth = b * 0
    parent_q = tl.full((), 0.0, tl.float32)
    while child >= 0:  # until the chosen edge is unexpanded (children == UNVISITED)
        node = child
        node_visits = tl.load(visit_count_ptr + row + node).to(tl.float32)  # N_s, own visits
        node_reset = tl.load(is_reset_ptr + row + node)
        # r(node -> child) = vp(child) - vp(node), or vp(child) where node's LSTM was reset.
        node_vp = tl.where(node_reset != 0, 0.0, tl.load(value_prefix_ptr + row + node))

        edge = (row + node) * A + offs_a  # [BLOCK_A] offsets of node's edges in [B, N, A]
        kids = tl.load(children_ptr + edge, mask=mask_a, other=-1)  # [BLOCK_A] int32
        visited = kids >= 0
        kid_off = row + tl.where(visited, kids, 0).to(tl.int64)  # [BLOCK_A]
        kid_n = tl.load(visit_count_ptr + kid_off, mask=visited, other=0)  # [BLOCK_A] n(a)
        kid_w = tl.load(value_sum_ptr + kid_off, mask=visited, other=0.0)
        kid_vp = tl.load(value_prefix_ptr + kid_off, mask=visited, other=0.0)
        kid_nf = kid_n.to(tl.float32)

        # Q(s, a) = r + gamma * W / N over the expanded children (EZ_SPEC §3 "Q of a child").
        q = (kid_vp - node_vp) + gamma * tl.div_rn(kid_w, tl.maximum(kid_nf, 1.0))
        q = tl.where(visited, q, 0.0)
        num_visited = tl.sum(visited.to(tl.float32), axis=0)
        q_total = tl.sum(q, axis=0)
        # "Parent mean Q" for the unvisited children (EZ_SPEC §3): at the root the mean over the
        # visited children (0 when none; parent_q is 0 there), below it
        # (mean_q one level up + sum Q) / (n + 1).
        num_mean = num_visited + tl.where(node != 0, 1.0, 0.0)
        mean_q = tl.div_rn(parent_q + q_total, tl.maximum(num_mean, 1.0))
        value_score = tl.where(visited, q, mean_q)
        value_score = tl.where(has_range, tl.div_rn(value_score - q_lo, q_scale), value_score)
        value_score = tl.minimum(tl.maximum(value_score, 0.0), 1.0)  # always clamped to [0, 1]

        # pUCT (MuZero App. B; EZ_SPEC §3 "Selection") with N_s = the node's own visit count:
        # prior_score = (log((N_s + c2 + 1) / c2) + c1) * sqrt(N_s) / (n(a) + 1) * P(a), in the
        # reference's order of operations so both backends round alike.
        prior = tl.load(prior_ptr + edge, mask=mask_a, other=0.0)
        pb_c = tl.log(tl.div_rn(node_visits + pb_c_base + 1.0, pb_c_base)) + pb_c_init
        pb_c = pb_c * tl.sqrt_rn(node_visits)
        prior_score = tl.div_rn(pb_c, kid_nf + 1.0) * prior
        score = tl.where(mask_a, prior_score + value_score, float("-inf"))  # [BLOCK_A]

        # Ties: every score within 1e-6 of the best is tied; the largest tiebreak key wins.
        best = tl.max(score, axis=0)
        tied = (score >= best - 1e-6) & mask_a
        key = tl.load(tiebreak_ptr + edge, mask=mask_a, other=-1.0)
        key = tl.where(tied, key, -1.0)
        action = tl.argmax(key, axis=0).to(tl.int32)

        child = tl.load(children_ptr + (row + node) * A + action).to(tl.int64)
        parent_q = mean_q
        depth += 1

    tl.store(out_parent_ptr + b, node)
    tl.store(out_action_ptr + b, action.to(tl.int64))
    tl.store(out_depth_ptr + b, depth)


@triton.jit(do_not_specialize=["node"])
def expand_backup_kernel(
    visit_count_ptr,        # [B, N] int32, tree.visit_count (in/out)
    value_sum_ptr,          # [B, N] f32, tree.value_sum (in/out)
    value_prefix_ptr,       # [B, N] f32, tree.value_prefix (in/out)
    parent_ptr,             # [B, N] int32, tree.parent (in/out)
    action_ptr,             # [B, N] int32, tree.action (out)
    depth_ptr,              # [B, N] int32, tree.depth (in/out)
    is_reset_ptr,           # [B, N] int32, tree.is_reset (in/out)
    children_ptr,           # [B, N, A] int32, tree.children (out: one edge)
    prior_ptr,              # [B, N, A] f32, tree.prior (out: the new node's row)
    min_max_ptr,            # [B, 2] f32, tree.min_max (in/out)
    leaf_parent_ptr,        # [B] int64, parent of the new node (from select)
    leaf_action_ptr,        # [B] int64, action from that parent (from select)
    leaf_value_prefix_ptr,  # [B] f32, predicted value prefix of the new edge
    leaf_value_ptr,         # [B] f32, predicted value of the new node
    leaf_logits_ptr,        # [B, A] f32, predicted policy logits of the new node
    node,                   # index of the new node in every tree (= the simulation number)
    N,                      # node slots per tree
    A,                      # number of actions
    gamma,                  # discount per search step
    lstm_horizon_len,       # value prefix / LSTM reset period (5)
    BLOCK_A: tl.constexpr,  # next power of 2 >= A
):
    b = tl.program_id(0).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)  # [BLOCK_A]
    mask_a = offs_a < A
    row = b * N  # offset of tree b's root in the [B, N] arrays (int64)
    node = node.to(tl.int64)

    # Expand: write the new node. Nothing written here is read back by this program (another
    # thread of the warp may have done the store), so the walk below takes the new node's
    # parent and value prefix from registers and loads only what earlier launches wrote.
    parent = tl.load(leaf_parent_ptr + b)  # int64
    action = tl.load(leaf_action_ptr + b)
    leaf_vp = tl.load(leaf_value_prefix_ptr + b)
    depth = tl.load(depth_ptr + row + parent) + 1  # int32
    reset = (depth % lstm_horizon_len == 0) & (depth > 0)  # EZ_SPEC §3 "LSTM reset"
    tl.store(parent_ptr + row + node, parent.to(tl.int32))
    tl.store(action_ptr + row + node, action.to(tl.int32))
    tl.store(depth_ptr + row + node, depth)
    tl.store(is_reset_ptr + row + node, reset.to(tl.int32))
    tl.store(value_prefix_ptr + row + node, leaf_vp)
    logits = tl.load(leaf_logits_ptr + b * A + offs_a, mask=mask_a, other=float("-inf"))  # [BLOCK_A]
    e = tl.exp(logits - tl.max(logits, axis=0))
    tl.store(prior_ptr + (row + node) * A + offs_a, tl.div_rn(e, tl.sum(e, axis=0)), mask=mask_a)  # softmax
    tl.store(children_ptr + (row + parent) * A + action, node.to(tl.int32))

    # Backup (EZ_SPEC §3 "Backup"): G = v(leaf); at each node W += G, N += 1; below the root
    # feed Q = r(parent -> node) + gamma * W / N into min-max, then G = r + gamma * G.
    q_min = tl.load(min_max_ptr + 2 * b)
    q_max = tl.load(min_max_ptr + 2 * b + 1)
    g = tl.load(leaf_value_ptr + b)
    cur = node      # int64, node being updated
    cur_vp = leaf_vp
    while cur > 0:  # every non-root node on the path, leaf first
        w = tl.load(value_sum_ptr + row + cur) + g
        n = tl.load(visit_count_ptr + row + cur) + 1
        tl.store(value_sum_ptr + row + cur, w)
        tl.store(visit_count_ptr + row + cur, n)
        parent_reset = tl.load(is_reset_ptr + row + parent)
        parent_vp = tl.load(value_prefix_ptr + row + parent)
        r = cur_vp - tl.where(parent_reset != 0, 0.0, parent_vp)  # value-prefix reward
        q = r + gamma * tl.div_rn(w, n.to(tl.float32))
        q_min = tl.minimum(q_min, q)
        q_max = tl.maximum(q_max, q)
        g = r + gamma * g
        cur = parent
        cur_vp = parent_vp
        parent = tl.load(parent_ptr + row + parent).to(tl.int64)  # root's parent is -1, unused
    # The root: W += G, N += 1, and it feeds nothing into min-max.
    tl.store(value_sum_ptr + row, tl.load(value_sum_ptr + row) + g)
    tl.store(visit_count_ptr + row, tl.load(visit_count_ptr + row) + 1)
    tl.store(min_max_ptr + 2 * b, q_min)
    tl.store(min_max_ptr + 2 * b + 1, q_max)


# ---------------------------------------------------------------------------------------------
# Launchers: same arguments and results as mcts.select / mcts.expand_backup. They only check
# and launch: no host sync, so a search loop of them can run ahead of the GPU and be captured
# in a CUDA graph (mcts.search does, by default). Kernel arguments are frozen at capture.
# ---------------------------------------------------------------------------------------------


def _check_tree(tree):
    B, N, A = tree.children.shape
    for name, shape, dtype in (("visit_count", (B, N), torch.int32),
                               ("value_sum", (B, N), torch.float32),
                               ("value_prefix", (B, N), torch.float32),
                               ("parent", (B, N), torch.int32),
                               ("action", (B, N), torch.int32),
                               ("depth", (B, N), torch.int32),
                               ("is_reset", (B, N), torch.int32),
                               ("children", (B, N, A), torch.int32),
                               ("prior", (B, N, A), torch.float32),
                               ("tiebreak", (B, N, A), torch.float32),
                               ("min_max", (B, 2), torch.float32)):
        t = getattr(tree, name)
        assert t.shape == shape, f"tree.{name}: shape {tuple(t.shape)}, expected {shape}"
        assert t.dtype == dtype, f"tree.{name}: dtype {t.dtype}, expected {dtype}"
        assert t.is_contiguous(), f"tree.{name} must be contiguous"
        assert t.device == tree.children.device, f"tree.{name} on {t.device}, not {tree.children.device}"
    return B, N, A


def _block_a(A):
    return triton.next_power_of_2(A)


def select(tree, pb_c_base, pb_c_init, gamma, value_delta_max):
    """Descend every tree from the root to an unexpanded edge.
    Returns (parent_node [B] int64, action [B] int64, depth [B] int64), depth = the new node's."""
    B, N, A = _check_tree(tree)
    device = tree.children.device
    parent_node = torch.empty(B, dtype=torch.int64, device=device)
    action = torch.empty(B, dtype=torch.int64, device=device)
    depth = torch.empty(B, dtype=torch.int64, device=device)
    select_kernel[(B,)](
        tree.visit_count, tree.value_sum, tree.value_prefix, tree.is_reset,
        tree.children, tree.prior, tree.tiebreak, tree.min_max,
        parent_node, action, depth,
        N, A, float(pb_c_base), float(pb_c_init), float(gamma), float(value_delta_max),
        BLOCK_A=_block_a(A), num_warps=1, enable_fp_fusion=False,
    )
    return parent_node, action, depth


def expand_backup(tree, node, parent_node, action, value_prefix, value, policy_logits, gamma,
                  lstm_horizon_len):
    """Write node `node` of every tree under (parent_node, action) and back its value up to the
    root, in place (the search loop writes the node's latent and LSTM state itself)."""
    B, N, A = _check_tree(tree)
    device = tree.children.device
    node = int(node)
    assert 0 < node < N, f"node {node} outside 1..{N - 1}"
    for name, t, shape, dtype in (("parent_node", parent_node, (B,), torch.int64),
                                  ("action", action, (B,), torch.int64),
                                  ("value_prefix", value_prefix, (B,), torch.float32),
                                  ("value", value, (B,), torch.float32),
                                  ("policy_logits", policy_logits, (B, A), torch.float32)):
        assert t.shape == shape, f"{name}: shape {tuple(t.shape)}, expected {shape}"
        assert t.dtype == dtype, f"{name}: dtype {t.dtype}, expected {dtype}"
        assert t.is_contiguous(), f"{name} must be contiguous"
        assert t.device == device, f"{name} on {t.device}, not {device}"
    expand_backup_kernel[(B,)](
        tree.visit_count, tree.value_sum, tree.value_prefix, tree.parent, tree.action,
        tree.depth, tree.is_reset, tree.children, tree.prior, tree.min_max,
        parent_node, action, value_prefix, value, policy_logits,
        node, N, A, float(gamma), int(lstm_horizon_len),
        BLOCK_A=_block_a(A), num_warps=1, enable_fp_fusion=False,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation: build the GPU code on any machine (no GPU needed; the Triton wheel
# ships ptxas). The tests use it to check that the kernels compile for sm_90 (H100) and sm_80
# (A100) on a CPU-only machine. Run it without TRITON_INTERPRET=1 (the interpreter replaces the
# kernels by Python functions).
# ---------------------------------------------------------------------------------------------

_TREE_PTRS = {"visit_count_ptr": "*i32", "value_sum_ptr": "*fp32", "value_prefix_ptr": "*fp32",
              "parent_ptr": "*i32", "action_ptr": "*i32", "depth_ptr": "*i32",
              "is_reset_ptr": "*i32", "children_ptr": "*i32", "prior_ptr": "*fp32",
              "tiebreak_ptr": "*fp32", "min_max_ptr": "*fp32"}


def aot_compile(capability, num_actions=18):
    """Compile both kernels for CUDA compute capability `capability` (90: H100, 80: A100) and
    return {kernel name: CompiledKernel} (each with .asm["ptx"] and .asm["cubin"])."""
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", capability, 32)
    compiled = {}
    for kernel, scalars in ((select_kernel, {"N": "i32", "A": "i32", "pb_c_base": "fp32",
                                             "pb_c_init": "fp32", "gamma": "fp32",
                                             "value_delta_max": "fp32"}),
                            (expand_backup_kernel, {"node": "i32", "N": "i32", "A": "i32",
                                                    "gamma": "fp32", "lstm_horizon_len": "i32"})):
        signature = {}
        for name in kernel.arg_names:
            if name.startswith("out_"):
                signature[name] = "*i64"
            elif name in ("leaf_parent_ptr", "leaf_action_ptr"):
                signature[name] = "*i64"
            elif name in ("leaf_value_prefix_ptr", "leaf_value_ptr", "leaf_logits_ptr"):
                signature[name] = "*fp32"
            elif name in _TREE_PTRS:
                signature[name] = _TREE_PTRS[name]
            elif name in scalars:
                signature[name] = scalars[name]
            else:
                signature[name] = "constexpr"
        src = triton.compiler.ASTSource(fn=kernel, signature=signature,
                                        constexprs={"BLOCK_A": _block_a(num_actions)})
        options = {"num_warps": 1, "enable_fp_fusion": False}  # as the launchers
        compiled[kernel.__name__] = triton.compile(src, target=target, options=options)
    return compiled
