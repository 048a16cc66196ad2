"""Tests of mcts_kernel.py: the Triton select / expand_backup kernels against mcts.py's PyTorch reference.

On the CPU the kernels run under TRITON_INTERPRET=1 (CI sets it; set here too before triton is
imported). The interpreter is slow, so the trees are small but awkward: B odd, A not a power of
2 (the masked lanes of BLOCK_A run), LSTM resets on the path, exact ties.
The GPU code is checked without a GPU by compiling it ahead of time for sm_90 and sm_80; the
CUDA-only tests run the compiled kernels (in a subprocess, without the interpreter).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by mcts_kernel)

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import mcts  # noqa: E402
import mcts_kernel  # noqa: E402
from model import NetworkOutput  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INT_FIELDS = ("visit_count", "parent", "action", "depth", "is_reset", "children")
FLOAT_FIELDS = ("value_sum", "value_prefix", "prior", "min_max", "tiebreak", "latent", "lstm_h", "lstm_c")
GAMMA = 0.997 ** 4


# ---------------------------------------------------------------------------------------------
# A fake model: seeded random dynamics, only what search() calls
# ---------------------------------------------------------------------------------------------
class FakeModel:
    """Stand-in for model.py's recurrent_inference on a small latent [B, D] with an LSTM-like
    state [B, H]. quantize=True makes exact ties everywhere: uniform priors, values on a 1/2 grid."""

    def __init__(self, A, D=5, H=3, seed=0, quantize=False, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.A, self.quantize = A, quantize
        self.w_latent = torch.randn(D, D, generator=g).to(device)  # [D, D]
        self.w_action = torch.randn(A, D, generator=g).to(device)  # [A, D] action embedding
        self.w_lstm = (0.5 * torch.randn(D, H, generator=g)).to(device)  # [D, H]
        self.w_head = torch.randn(D, A + 2, generator=g).to(device)  # [D, A + 2]

    def recurrent_inference(self, latent, lstm_state, action, depth):
        x = latent @ self.w_latent + self.w_action[action]  # [B, D] (a gather: no host sync on CUDA)
        latent = torch.tanh(x)  # [B, D]
        h = torch.tanh(x @ self.w_lstm + lstm_state[0])  # [B, H]
        c = lstm_state[1] + h  # [B, H] grows along a path until the LSTM is reset
        head = latent @ self.w_head  # [B, A + 2]
        value_prefix = head[:, 0] + c.sum(-1)  # [B]
        value = head[:, 1].contiguous()  # [B]
        policy_logits = 2.0 * head[:, 2:]  # [B, A]
        if self.quantize:
            value_prefix, value = torch.round(2 * value_prefix) / 2, torch.round(2 * value) / 2
            policy_logits = torch.zeros_like(policy_logits)
        return NetworkOutput(latent, (h, c), value_prefix, value, policy_logits, None, None)


def fake_root(B, A, D=5, H=3, seed=1, uniform_prior=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(B, A) if uniform_prior else torch.randn(B, A, generator=g)
    return NetworkOutput(torch.randn(B, D, generator=g).to(device),
                         (torch.zeros(B, H, device=device), torch.zeros(B, H, device=device)),
                         torch.zeros(B, device=device), torch.randn(B, generator=g).to(device),
                         logits.to(device), None, None)


def assert_trees_equal(ref, ker, fields=INT_FIELDS + FLOAT_FIELDS, where=""):
    for name in fields:
        r, k = getattr(ref, name), getattr(ker, name)
        assert r.dtype == k.dtype and r.shape == k.shape, f"{where} tree.{name}"
        if name in INT_FIELDS:
            assert torch.equal(r, k), f"{where} tree.{name} differs at {(r != k).nonzero()[:5].tolist()}"
        else:
            torch.testing.assert_close(k, r, atol=1e-5, rtol=1e-5, msg=f"{where} tree.{name}")


def run_search(backend, model, root, num_simulations, seed, **kwargs):
    generator = torch.Generator(device=root.value.device).manual_seed(seed)
    return mcts.search(model, root, num_simulations, generator=generator, backend=backend, **kwargs)


# ---------------------------------------------------------------------------------------------
# Parity with the PyTorch reference (interpreter on CPU)
# ---------------------------------------------------------------------------------------------
def test_search_parity_awkward_sizes():
    """A whole search, B = 7 (odd), A = 18 (BLOCK_A = 32, 14 masked lanes), 50 simulations,
    root noise: every tree tensor of the triton backend equals the torch backend's. (B = 7 already grows
    paths of depth 15 with resets in every tree; the interpreter's time grows with B x simulations.)"""
    B, A, S = 7, 18, 50
    model, root = FakeModel(A, seed=0), fake_root(B, A, seed=1)
    ref = run_search("torch", model, root, S, seed=2, add_noise=True)
    ker = run_search("triton", model, root, S, seed=2, add_noise=True)
    assert_trees_equal(ref.tree, ker.tree)
    assert torch.equal(ref.visit_counts, ker.visit_counts)
    torch.testing.assert_close(ker.root_values, ref.root_values, atol=1e-5, rtol=1e-5)
    # the search went where the kernels branch: deep paths, LSTM resets, a min-max range
    assert (ker.visit_counts.sum(-1) == S).all()
    assert ker.tree.depth.max() >= 5 and ker.tree.is_reset.sum() > 0
    assert (ker.tree.min_max[:, 1] > ker.tree.min_max[:, 0]).all()


def test_search_parity_exact_ties_and_resets():
    """Uniform priors and values on a 1/2 grid make exact score ties at every node; lstm_horizon_len
    = 2 resets the value prefix every other level. Ties must go to the largest tie-break key."""
    B, A, S = 9, 5, 24
    model, root = FakeModel(A, seed=3, quantize=True), fake_root(B, A, seed=4, uniform_prior=True)
    kwargs = dict(add_noise=False, lstm_horizon_len=2, value_delta_max=0.25)
    ref = run_search("torch", model, root, S, seed=5, **kwargs)
    ker = run_search("triton", model, root, S, seed=5, **kwargs)
    assert_trees_equal(ref.tree, ker.tree)
    # simulation 1 sees A tied scores at the root: node 1 hangs under the largest key
    first = ker.tree.tiebreak[:, mcts.ROOT].argmax(-1)  # [B]
    assert (ker.tree.action[:, 1] == first).all()
    assert ker.tree.is_reset.sum() > 0 and ker.tree.depth.max() >= 3


def _root_tree(B, N, A, seed):
    """A tree holding only its root: visit 1, value, prior, tie-break keys (as search() writes)."""
    g = torch.Generator().manual_seed(seed)
    tree = mcts.make_tree(B, N, A, (1,), 1, "cpu")
    for t in (tree.latent, tree.lstm_h, tree.lstm_c):  # unused by the tree operations
        t.zero_()
    tree.visit_count[:, 0] = 1
    tree.value_sum[:, 0] = torch.randn(B, generator=g)
    tree.prior[:, 0] = torch.softmax(torch.randn(B, A, generator=g), -1)
    tree.tiebreak.uniform_(0.0, 1.0, generator=g)
    return tree


def _clone_tree(tree):
    return mcts.Tree(**{name: getattr(tree, name).clone() for name in tree.__dataclass_fields__})


def test_select_and_expand_backup_step_by_step():
    """Both operations, each fed the same tree state and the same leaf outputs, at every step of
    a search: select returns the same (parent, action, depth) and changes nothing; expand_backup
    leaves the same tree. Value scales differ per tree (1e-3 .. 3) so that the value_delta_max floor
    binds in some trees and not in others; every third tree gets tied logits."""
    B, S, A = 7, 30, 6
    # a small pb_c_base makes the log term of pUCT count (it is ~N/19652 with the paper's value)
    N, horizon, gamma, kw = S + 1, 3, 0.9, dict(pb_c_base=4.0, pb_c_init=0.8, value_delta_max=0.05)
    ref = _root_tree(B, N, A, seed=6)
    ker = _clone_tree(ref)
    g = torch.Generator().manual_seed(7)
    scale = torch.logspace(-3, 0.5, B)  # [B]
    for i in range(1, N):
        r = mcts.select(ref, gamma=gamma, **kw)
        k = mcts_kernel.select(ker, gamma=gamma, **kw)
        for name, x, y in zip(("parent_node", "action", "depth"), r, k):
            assert y.dtype == torch.int64 and torch.equal(x, y), f"select {name} at simulation {i}"
        assert_trees_equal(ref, ker, where=f"after select {i}")
        value_prefix = scale * torch.randn(B, generator=g)  # [B]
        value = scale * torch.randn(B, generator=g)  # [B]
        policy_logits = torch.randn(B, A, generator=g)  # [B, A]
        policy_logits[::3] = torch.round(policy_logits[::3])
        mcts.expand_backup(ref, i, r[0], r[1], value_prefix, value, policy_logits, gamma, horizon)
        mcts_kernel.expand_backup(ker, i, r[0], r[1], value_prefix, value, policy_logits, gamma, horizon)
        assert_trees_equal(ref, ker, where=f"after expand_backup {i}")
    assert ker.is_reset.sum() > 0 and ker.depth.max() >= 4
    assert (ker.visit_count[:, 0] == N).all()


def test_near_ties_within_1e6_go_to_the_largest_key():
    """At a fresh root the scores are pb_c * P(a). Tree 0: the two best differ by ~5e-7, a tie, so the
    larger key (action 0) wins over the larger score; tree 1: they differ by ~3e-6, no tie."""
    B, N, A = 2, 3, 3
    tree = _root_tree(B, N, A, seed=9)
    tree.prior[:, 0] = torch.tensor([[0.3, 0.3 + 4e-7, 0.1], [0.3, 0.3 + 2.4e-6, 0.1]])
    tree.tiebreak[:, 0] = torch.tensor([0.9, 0.1, 0.5])
    ref = mcts.select(tree, 19652, 1.25, GAMMA, 0.01)
    ker = mcts_kernel.select(tree, 19652, 1.25, GAMMA, 0.01)
    assert ker[1].tolist() == [0, 1] and ref[1].tolist() == [0, 1]
    assert ker[0].tolist() == [0, 0] and ker[2].tolist() == [1, 1]


def test_launchers_check_their_inputs():
    B, N, A = 3, 5, 4
    tree = _root_tree(B, N, A, seed=8)
    parent_node = torch.zeros(B, dtype=torch.int64)
    action = torch.zeros(B, dtype=torch.int64)
    vp, v, logits = torch.zeros(B), torch.zeros(B), torch.zeros(B, A)
    bad = _clone_tree(tree)
    bad.visit_count = bad.visit_count.long()
    with pytest.raises(AssertionError, match="visit_count"):
        mcts_kernel.select(bad, 19652, 1.25, GAMMA, 0.01)
    bad = _clone_tree(tree)
    bad.prior = bad.prior.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, strided
    with pytest.raises(AssertionError, match="prior"):
        mcts_kernel.select(bad, 19652, 1.25, GAMMA, 0.01)
    with pytest.raises(AssertionError, match="policy_logits"):
        strided = torch.zeros(B, 2 * A)[:, ::2]
        mcts_kernel.expand_backup(tree, 1, parent_node, action, vp, v, strided, GAMMA, 5)
    with pytest.raises(AssertionError, match="parent_node"):
        mcts_kernel.expand_backup(tree, 1, parent_node.int(), action, vp, v, logits, GAMMA, 5)
    with pytest.raises(AssertionError, match="node"):
        mcts_kernel.expand_backup(tree, N, parent_node, action, vp, v, logits, GAMMA, 5)


# ---------------------------------------------------------------------------------------------
# The GPU code, without a GPU: ahead-of-time compilation for H100 (sm_90) and A100 (sm_80)
# ---------------------------------------------------------------------------------------------
def _without_interpreter(code, tmp_path, timeout):
    """Run python `code` in the repo with compiled (not interpreted) Triton kernels."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"))
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


AOT_CODE = """
import json, mcts_kernel
out = {}
for cc in (90, 80):
    for name, kernel in mcts_kernel.aot_compile(cc).items():
        ptx = kernel.asm["ptx"]
        out[f"{name}_sm{cc}"] = dict(
            cubin=len(kernel.asm["cubin"]), num_warps=kernel.metadata.num_warps,
            target=[line.split()[1] for line in ptx.splitlines() if line.startswith(".target")],
            entry=ptx.count(f".entry {name}"), div_approx=ptx.count("div.full") + ptx.count("div.approx"),
            sqrt_approx=ptx.count("sqrt.approx"))
print(json.dumps(out))
"""


def test_kernels_compile_ahead_of_time_for_sm90_and_sm80(tmp_path):
    """The kernels build to PTX and cubin (with the wheel's ptxas) for sm_90 and sm_80, and keep
    IEEE division and sqrt (no approximate ones), which the parity with PyTorch relies on."""
    out = _without_interpreter(AOT_CODE, tmp_path, timeout=300)
    assert sorted(out) == ["expand_backup_kernel_sm80", "expand_backup_kernel_sm90",
                           "select_kernel_sm80", "select_kernel_sm90"]
    for key, info in out.items():
        assert info["cubin"] > 0 and info["entry"] == 1 and info["num_warps"] == 1, (key, info)
        assert info["target"] == (["sm_90a"] if key.endswith("sm90") else ["sm_80"]), (key, info)
        assert info["div_approx"] == 0 and info["sqrt_approx"] == 0, (key, info)


# ---------------------------------------------------------------------------------------------
# CUDA only: the compiled kernels in a real search (run in a subprocess without the interpreter)
# ---------------------------------------------------------------------------------------------
def cuda_checks():
    """Runs on a CUDA machine with compiled kernels; returns numbers for the pytest side."""
    B, A, S, device = 256, 18, 50, "cuda"
    model, root = FakeModel(A, seed=0, device=device), fake_root(B, A, seed=1, device=device)
    out = {}
    # 1. A whole search with no host sync, eager and replayed from its CUDA
    #    graph, against the torch backend.
    for _ in range(2):  # compile, then capture the graph, outside the check
        run_search("triton", model, root, S, seed=2, add_noise=True)
    run_search("triton", model, root, S, seed=2, add_noise=True, cuda_graphs=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ker = run_search("triton", model, root, S, seed=2, add_noise=True, cuda_graphs=False)
        run_search("triton", model, root, S, seed=2, add_noise=True)  # a replay
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = run_search("torch", model, root, S, seed=2, add_noise=True, cuda_graphs=False)
    same = torch.ones(B, dtype=torch.bool, device=device)
    for name in INT_FIELDS:
        same &= (getattr(ref.tree, name) == getattr(ker.tree, name)).flatten(1).all(1)
    out["visit_sums_ok"] = bool((ker.visit_counts.sum(-1) == S).all())
    out["same_tree_fraction"] = same.float().mean().item()

    out.update(cuda_graph_checks())
    return out


def cuda_graph_checks():
    """mcts.search's CUDA graphs (on by default): for both backends, searches replayed from the graph
    equal eager ones visit for visit, on new roots, and after new weights are copied into the network in
    place (as train.py refreshes the acting and target networks); the graph is captured once."""
    from model import make_model
    B, A, S, device, out = 96, 9, 30, "cuda", {}
    torch.manual_seed(0)
    net, fresh = (make_model((12, 32, 32), A, channels=16, reduced_channels=4, fc_hidden=16, lstm_hidden=32,
                             support_size=20).to(device).eval() for _ in range(2))
    for m in (net, fresh):
        for p in m.parameters():  # leave the zero-initialised heads: non-uniform policies and values
            torch.nn.init.normal_(p, std=0.2)
    obs = [torch.randint(0, 256, (B, 12, 32, 32), dtype=torch.uint8, device=device) for _ in range(3)]

    def both(seed, root):
        runs = {}
        for graphs in (False, True):
            runs[graphs] = mcts.search(net, root, S, add_noise=True, backend=backend, cuda_graphs=graphs,
                                       generator=torch.Generator(device).manual_seed(seed))
        eager, graphed = runs[False], runs[True]
        # visit for visit and node for node; floats to 1e-5 (cuBLAS may pick other kernels inside a capture)
        return (torch.equal(eager.visit_counts, graphed.visit_counts)
                and all(torch.equal(getattr(eager.tree, f), getattr(graphed.tree, f)) for f in INT_FIELDS)
                and torch.allclose(eager.root_values, graphed.root_values, atol=1e-5, rtol=1e-5))

    for backend in ("triton", "torch"):
        with torch.inference_mode():
            roots = [net.initial_inference(o) for o in obs]
        same = [both(seed, roots[seed % 3]) for seed in range(4)]  # warm-up, capture, two replays
        entry = next(iter(mcts._GRAPHS[net].values())) if len(mcts._GRAPHS[net]) == 1 else None
        graph = entry.graph if entry is not None else None
        net.load_state_dict(fresh.state_dict())  # in place: same addresses, the graph stays valid
        with torch.inference_mode():
            root = net.initial_inference(obs[0])
        same.append(both(7, root))
        out[f"graph_{backend}_same_as_eager"] = same
        out[f"graph_{backend}_captured_once"] = graph is not None and entry.graph is graph
        mcts._GRAPHS.clear()
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_search_has_no_host_sync_and_graph_replays(tmp_path):
    out = _without_interpreter("import json, test_mcts_kernel as t; print(json.dumps(t.cuda_checks()))",
                               tmp_path, timeout=600)
    assert out["visit_sums_ok"]
    # The GPU's exp (softmax priors) and reduction order differ from PyTorch's in the last bits,
    # which can flip a near-tie (1e-6) in a rare tree; a wrong kernel would differ in nearly all.
    assert out["same_tree_fraction"] >= 0.95, out
    for backend in ("triton", "torch"):
        assert out[f"graph_{backend}_same_as_eager"] == [True] * 5, out
        assert out[f"graph_{backend}_captured_once"], out
