"""No host sync where a CUDA run must not have one, checked on a CPU (tests/nosync.py says how).

- A whole search, each backend that runs here (Triton under TRITON_INTERPRET=1), with the MLP and the
  Atari network, with the CPU-only early stop of the depth loops turned off (as on CUDA): no sync at all.
- One self-play step: only the env boundary, named below (observations in, actions out).
- One learner update, reanalysis included: none. Logging (train.py's progress line) is outside
  learner_step and selfplay_step, so no logging point is allowed here.
The numba backend is CPU-only and reads the tree on the host by design: its search is skipped, and the self-play
and learner checks search with the torch backend, as a stand-in for the device's ("auto" is numba on a CPU).
"""
import os

import numpy as np
import pytest
import torch

import mcts
import train
from atari import make_env
from config import PRESETS, Config, check_config
from model import make_model
from nosync import HostSyncs, mark_device

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="the Triton backend runs on a CPU only under TRITON_INTERPRET=1")),
            pytest.param("numba", marks=pytest.mark.skip(reason="the numba backend runs on the CPU only and reads the "
                                                          "tree on the host by design (no device to wait for)"))]
NETS = {"mlp": lambda A: make_model((6,), A, hidden=16, latent_dim=8, lstm_hidden=8, support_size=10, proj_hid=8,
                                    proj_out=8, pred_hid=8, pred_out=8),
        "atari": lambda A: make_model((12, 32, 32), A, channels=8, reduced_channels=4, fc_hidden=8, lstm_hidden=16,
                                      support_size=10, proj_hid=8, proj_out=8, pred_hid=8, pred_out=8)}
# The env boundary of a self-play step: the envs run on the host, so each step moves their observations
# and rewards to the device once, the chosen actions back once, and, where an episode ends, its last frame in.
ENV_BOUNDARY = {
    "observations to the device": ("train.py", "selfplay_step", "obs = torch.as_tensor(obs, device=st.device)"),
    "actions to the envs": ("train.py", "selfplay_step", "env.step(actions.cpu().numpy())"),
    "rewards to the device": ("replay.py", "add", "reward = torch.as_tensor(np.asarray(reward, np.float32))"),
    "a final observation to the device": ("replay.py", "_end_episode", "final_obs = torch.as_tensor(np.asarray("),
}


@pytest.fixture
def no_early_stop(monkeypatch):
    monkeypatch.setattr(mcts, "_host_reads", lambda device: False)  # fixed trip counts, as on CUDA


def _search(net, backend, B=3, A=4, sims=6):
    torch.manual_seed(0)
    model = NETS[net](A).eval()
    mark_device(model)
    obs_shape = (6,) if net == "mlp" else (12, 32, 32)
    with torch.no_grad():
        root = model.initial_inference(torch.rand(B, *obs_shape))
    mark_device(root)
    generator = torch.Generator().manual_seed(1)
    return lambda: mcts.search(model, root, sims, add_noise=True, generator=generator, backend=backend)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_has_no_host_sync(net, backend, no_early_stop):
    run = _search(net, backend)
    with HostSyncs() as syncs:
        result = run()
    assert syncs.events == [], "host syncs in the search:\n" + syncs.report()
    assert (result.visit_counts.sum(-1) == 6).all()


def test_the_checker_finds_syncs():
    """Positive control: with the CPU-only early stop on, the depth loops read `any()` on the host; and
    the reads and copies a CUDA run must avoid are all seen, with their line."""
    run = _search("mlp", "torch")
    with HostSyncs() as syncs:
        run()
    assert any(f == "mcts.py" and fn in ("select", "expand_backup") for _, _, f, _, fn, _ in syncs.events), syncs.report()
    host = torch.arange(3)  # no device=: a host tensor, free to read
    with HostSyncs() as syncs:
        x = torch.arange(6.0, device=torch.device("cpu"))  # explicit device=: a device tensor
        x.sum().item(), x.tolist(), x.cpu(), x[x > 2], torch.nonzero(x), bool(x[0]), host.tolist()
        torch.as_tensor(np.ones(3), device=x.device), host.to(x.device), x.view(2, 3).numpy()
    ops = [op for _, op, *_ in syncs.events]
    assert ops == ["_local_scalar_dense", "Tensor.tolist", "Tensor.cpu", "index with a boolean mask", "nonzero",
                   "_local_scalar_dense", "as_tensor", "to", "Tensor.numpy"], syncs.report()


def _run_state(preset, **overrides):
    cfg = check_config(Config(**{**PRESETS[preset], "num_envs": 2, "num_simulations": 4, "batch_size": 4,
                                 "start_transitions": 40, "td_steps": 10, "total_transitions": 200,
                                 "training_steps": 20,
                                 "reanalyze_ratio": 0.5, "device": "cpu", "search_backend": "torch",  # as on CUDA
                                 **overrides}))
    env = make_env(cfg.game, cfg.num_envs, cfg.seed, train=True, max_episode_steps=cfg.max_episode_steps)
    st = train.build(cfg, env, torch.device("cpu"))
    obs = train.fill_random(st, env, env.reset(), cfg.start_transitions)  # random play, no search
    st.updates = 1  # past the random warm-up: actions come from the search
    mark_device(st)  # what a CUDA run keeps on the GPU: networks, optimizer, replay tensors
    return cfg, env, st, obs


PRESET_GAMES = ["cartpole", "atari-quick"]


@pytest.mark.parametrize("preset", PRESET_GAMES)
def test_selfplay_step_syncs_only_at_the_env_boundary(preset, no_early_stop):
    cfg, env, st, obs = _run_state(preset)
    with HostSyncs(ENV_BOUNDARY) as syncs:
        train.selfplay_step(st, env, obs, None, cfg)
    env.close()
    hits = syncs.allowed_hits
    assert hits["observations to the device"] == hits["actions to the envs"] == hits["rewards to the device"] == 1, hits
    assert hits["a final observation to the device"] <= cfg.num_envs, hits
    assert syncs.events == [], "host syncs in a self-play step:\n" + syncs.report()


@pytest.mark.parametrize("preset,amp,window", [("cartpole", False, 0), ("cartpole", True, 0), ("atari-quick", True, 0),
                                               ("cartpole", False, 16)])
def test_learner_update_has_no_host_sync(preset, amp, window, no_early_stop):
    """amp=True uses the gradient scaler as a CUDA run with AMP does (GradScaler.step reads found_inf
    on the host unless the optimizer takes it as a tensor, e.g. torch.optim.SGD(fused=True)); window is
    --replay-window."""
    cfg, env, st, _ = _run_state(preset, replay_window=window)
    env.close()
    if amp:
        st.scaler = torch.amp.GradScaler("cpu", enabled=True)
        mark_device(st.scaler)
    with HostSyncs() as syncs:
        train.learner_step(st, cfg)
    assert syncs.events == [], "host syncs in a learner update:\n" + syncs.report()
