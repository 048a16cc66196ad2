"""EfficientZero training: self-play, prioritized replay, reanalysis, learning, evaluation, checkpoints.

Paper: Ye et al. 2021, "Mastering Atari Games with Limited Data" (arXiv:2111.00210). Every step of the loop
cites EZ_SPEC.md (the official code, read from its HEAD 468bb03, with sources); the configuration is in config.py.
One process, one device: the E self-play envs are searched in one batched search per step and every
learner batch is reanalyzed in one batched search.

    python train.py --game MsPacman                      # the paper's configuration (Atari 100k)
    python train.py --preset cartpole                    # learns CartPole-v1 on a CPU in a few minutes
    python train.py --resume runs/<run>/ckpt.pt          # continue a stopped run (Ctrl-C or SIGTERM stop one)
    python train.py --help                               # every field of Config with its source

Shape letters: E envs, B batch, K unroll steps, A actions, S = 2 * support_size + 1 support bins.
"""

import argparse
import copy
import dataclasses
import functools
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from atari import make_env
from config import (CKPT_VERSION, PRESETS, Config, UsageError, check_config, load_checkpoint,
                    model_args, parse_args, resolve_device, resume_config, save_checkpoint)
from eval import evaluate, evaluate_and_log
from mcts import resolve_backend, run_search, select_action
from model import make_model, scalar_to_support
from reanalyze import reanalyze
from replay import ReplayBuffer
from runlog import (LOSSES, Interval, Pace, RunLog, Stop, Ticker, check_writable_dir, estimate, progress_line,
                    run_record, stopped, summary, write_config_json)


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: schedules, augmentation, losses, one learner update
# ---------------------------------------------------------------------------------------------

def learning_rate(step, cfg):
    """Linear warm-up over lr_warm_up * training_steps, then x lr_decay_rate every lr_decay_steps (EZ_SPEC §4.1)."""
    warm_up = int(cfg.lr_warm_up * cfg.training_steps)
    if step < warm_up:
        return cfg.lr_init * step / warm_up
    return cfg.lr_init * cfg.lr_decay_rate ** ((step - warm_up) // cfg.lr_decay_steps)


def visit_softmax_temperature(updates, cfg):
    """Acting temperature 1 / 0.5 / 0.25 at 50% / 75% of training_steps (EZ_SPEC §6, HEAD), or the fixed one."""
    return cfg.acting_temperature or 0.5 ** sum(updates >= f * cfg.training_steps for f in (0.5, 0.75))


def scale_gradient(x, scale):
    """Multiply the whole gradient arriving at x by scale, also the part from uses before this call
    (a hook, as the original; EZ_SPEC §4.3). The forward value is unchanged."""
    x.register_hook(lambda grad: grad * scale)
    return x


def consistency_loss(online, target):
    """Negative cosine similarity of SimSiam (EZ_SPEC §4.3); no gradient into the target branch. -> [B]"""
    online = F.normalize(online, p=2.0, dim=-1, eps=1e-5)
    target = F.normalize(target.detach(), p=2.0, dim=-1, eps=1e-5)
    return -(online * target).sum(-1)


def cross_entropy(logits, target):
    """Soft-target cross-entropy -sum target log softmax(logits) (EZ_SPEC §2.5). -> [B]"""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1)


def shift_and_intensity(x, pad=4, scale=0.05):
    """x uint8 [B, C, H, W] -> float [B, C, H, W] in about [0, 1]: replicate-pad `pad` then a random crop
    (clamped indices = replicate padding), and x * (1 + scale * clip(N(0, 1), -2, 2)), one draw per sample
    (EZ_SPEC §4.1, the original's kornia ReplicationPad2d + RandomCrop and Intensity)."""
    B, C, H, W = x.shape
    shift = torch.randint(-pad, pad + 1, (2, B, 1), device=x.device)            # [2, B, 1]
    rows = (torch.arange(H, device=x.device) + shift[0]).clamp(0, H - 1)         # [B, H]
    cols = (torch.arange(W, device=x.device) + shift[1]).clamp(0, W - 1)         # [B, W]
    batch = torch.arange(B, device=x.device)[:, None, None]
    x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)      # [B, C, H, W]
    noise = 1 + scale * torch.randn(B, 1, 1, 1, device=x.device).clamp(-2, 2)    # [B, 1, 1, 1]
    return x.float() / 255 * noise


def augment(obs):
    """obs uint8 [B, K+1, C, H, W]: the input stack o_t gets its own draw; the K target stacks share one
    draw per sample, as the original augments its 8 target frames together (EZ_SPEC §4.3.1)."""
    B, K1, C, H, W = obs.shape
    first = shift_and_intensity(obs[:, 0])                                       # [B, C, H, W]
    rest = shift_and_intensity(obs[:, 1:].reshape(B, (K1 - 1) * C, H, W)).view(B, K1 - 1, C, H, W)
    return torch.cat([first[:, None], rest], 1)                                  # [B, K+1, C, H, W]


def unroll_losses(model, obs, actions, mask, targets, cfg):
    """The K-step unroll of EZ_SPEC §4.3. obs [B, K+1, *O] (stacks o_t..o_{t+K}), actions [B, K], mask [B, K].
    -> per-sample losses [4, B] (value, policy, value prefix, consistency), online value of s_0 [B]."""
    S, K = model.support_size, cfg.num_unroll_steps
    value_target = scalar_to_support(targets.value, S)                          # [B, K+1, S]
    prefix_target = scalar_to_support(targets.value_prefix, S)                  # [B, K, S]
    out = model.initial_inference(obs[:, 0])                                     # s_0 = h(o_t)
    value_loss = cross_entropy(out.value_logits, value_target[:, 0])            # k = 0: unmasked
    policy_loss = cross_entropy(out.policy_logits, targets.policy[:, 0])
    prefix_loss = torch.zeros_like(value_loss)
    consistency = torch.zeros_like(value_loss)
    latent, lstm_state = out.latent, out.lstm_state
    for k in range(1, K + 1):
        step = model.recurrent_inference(latent, lstm_state, actions[:, k - 1], k, scalars=False)  # logits only
        latent = scale_gradient(step.latent, 0.5)                               # EZ_SPEC §4.3.3: 0.5 at every s_k
        m = mask[:, k - 1]                                                      # [B] a_{t+k-1} exists
        # Past a terminal state (the only place a sampled unroll runs out of data) the state is absorbing: value 0
        # and reward 0 whatever the action, trained unless cfg.absorbing_terminal is off (README "Differences").
        m_absorbing = torch.ones_like(m) if cfg.absorbing_terminal else m
        value_loss = value_loss + m_absorbing * cross_entropy(step.value_logits, value_target[:, k])
        policy_loss = policy_loss + m * cross_entropy(step.policy_logits, targets.policy[:, k])
        prefix_loss = prefix_loss + m_absorbing * cross_entropy(step.value_prefix_logits, prefix_target[:, k - 1])
        if cfg.consistency:  # SimSiam: target = projection of h(o_{t+k}), same online net, stop-gradient
            with torch.no_grad():
                target = model.project(model.encode(obs[:, k]), with_predictor=False)
            consistency = consistency + m * consistency_loss(model.project(latent, with_predictor=True), target)
        lstm_state = step.lstm_state
        if k % cfg.lstm_horizon_len == 0:                                        # EZ_SPEC §4.3.3: prefix restarts
            lstm_state = tuple(torch.zeros_like(s) for s in lstm_state)
    return torch.stack([value_loss, policy_loss, prefix_loss, consistency]), out.value


@functools.cache
def compiled_unroll():
    """unroll_losses under torch.compile (--compile), made once per process: the modules' parameters and buffers
    are inputs of its graphs, so every network of one shape shares them; one graph per batch size."""
    return torch.compile(unroll_losses, dynamic=False)


def train_step(st, batch, targets, cfg):
    """One SGD update (EZ_SPEC §4.3). -> mean losses [4] (a device tensor, no sync)."""
    device = st.device
    obs = batch.obs                                                              # [B, K+1, *O] on the device
    if obs.dim() == 5 and cfg.augmentation:
        obs = augment(obs)
    coeffs = (cfg.value_loss_coeff, cfg.policy_loss_coeff, cfg.value_prefix_loss_coeff, cfg.consistency_coeff)
    for group in st.optimizer.param_groups:
        group["lr"] = learning_rate(st.updates, cfg)
    with torch.autocast(device.type, dtype=torch.float16, enabled=st.scaler.is_enabled()):
        unroll = compiled_unroll() if cfg.compile else unroll_losses
        losses, value_0 = unroll(st.model, obs, batch.actions, batch.mask, targets, cfg)          # [4, B], [B]
        if cfg.value_window and not cfg.window_td_steps:                         # no value loss on older samples
            losses = torch.cat([losses[:1] * (batch.ages <= cfg.value_window), losses[1:]])
        loss = (batch.weights * sum(c * l for c, l in zip(coeffs, losses.float()))).mean()  # EZ_SPEC §4.3.4, PER
    loss = scale_gradient(loss, 1 / cfg.num_unroll_steps)                       # EZ_SPEC §4.3.5: gradient x 1/K
    st.optimizer.zero_grad(set_to_none=True)
    st.scaler.scale(loss).backward()
    st.scaler.unscale_(st.optimizer)
    torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.max_grad_norm)
    st.scaler.step(st.optimizer)
    st.scaler.update()
    priorities = (value_0.detach().float() - targets.value[:, 0]).abs() + cfg.priority_eps  # EZ_SPEC §4.3.7
    st.buf.update_priorities(batch.indices, priorities)                          # on the device: no sync
    st.updates += 1
    return losses.detach().float().mean(1)


def refresh_networks(st, cfg):
    """After update u: acting net <- learner every 100; target <- weights of the previous 200-step point (EZ_SPEC §4.1)."""
    if st.updates % cfg.selfplay_refresh_interval == 0:
        st.selfplay_model.load_state_dict(st.model.state_dict())
    if st.updates % cfg.target_refresh_interval == 0:
        st.target_model.load_state_dict(st.target_snapshot)
        st.target_snapshot = {k: v.detach().clone() for k, v in st.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Run state: networks, optimizer, buffer, counters, random generators (all of it goes in ckpt.pt)
# ---------------------------------------------------------------------------------------------

def build(cfg, env, device):
    """Fresh run state for cfg and env's shapes."""
    args = model_args(cfg, env.obs_shape, env.num_actions)
    model = make_model(**args).to(device)
    return argparse.Namespace(
        device=device, model_args=args, model=model.train(),
        target_model=copy.deepcopy(model).eval(),              # reanalysis (EZ_SPEC §5), lags 200-400 updates
        target_snapshot={k: v.detach().clone() for k, v in model.state_dict().items()},
        selfplay_model=copy.deepcopy(model).eval(),            # acting (EZ_SPEC §6), refreshed every 100 updates
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  fused=True),   # one kernel; and GradScaler.step reads no found_inf on the host
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda"),
        buf=ReplayBuffer(cfg.total_transitions, cfg.num_envs, env.frame_shape, env.stack, env.num_actions,
                         alpha=cfg.priority_alpha, frame_dtype=torch.uint8 if env.is_atari else torch.float32,
                         device=device),                    # all on the training device: no host sync to sample
        generator=torch.Generator(device).manual_seed(cfg.seed),   # every draw: search noise, tie-breaks, actions, replay
        held=torch.zeros(cfg.num_envs, dtype=torch.long, device=device),        # explore_hold: each env's last
        hold_left=torch.zeros(cfg.num_envs, dtype=torch.long, device=device),   # action, steps it still repeats it
        hold_len=hold_lengths(cfg, device),   # (not in the checkpoint: a resumed run's envs start new episodes)
        env_steps=0, updates=0, games=0, elapsed=0.0, last_eval=float("nan"), eval_updates=-1,
        best_eval=float("nan"), best_updates=-1)


def hold_lengths(cfg, device):
    """[E] steps each self-play env keeps a chosen action under explore_hold N: 1..N spread evenly over the
    sampling envs (a lone one: N), 1 for the greedy ones."""
    E, N = cfg.num_envs, cfg.explore_hold
    S = E - round(cfg.greedy_fraction * E)
    hold = torch.ones(E, dtype=torch.long, device=device)
    hold[:S] = torch.linspace(1 if S > 1 else N, N, S, device=device).round().long()
    return hold


# last_eval: the latest evaluation's mean, eval_updates its update (-1: none yet), best_*: the best one's
COUNTERS = ("env_steps", "updates", "games", "elapsed", "last_eval", "eval_updates", "best_eval", "best_updates")


def checkpoint(st, cfg, obs, kind="last"):
    """Everything a resumed run needs (nanoGPT-style single dict); obs [E, *O] are the envs' observations.
    kind "best": only what eval.py needs, the network of the best evaluation so far (best.pt, not resumable)."""
    counters = {k: getattr(st, k) for k in COUNTERS}
    if kind == "best":
        return dict(version=CKPT_VERSION, kind=kind, model=st.model.state_dict(), counters=counters,
                    config=dataclasses.asdict(cfg), model_args=st.model_args)
    cuda = st.device.type == "cuda"
    return dict(
        version=CKPT_VERSION, kind=kind,
        model=st.model.state_dict(), target_model=st.target_model.state_dict(), target_snapshot=st.target_snapshot,
        selfplay_model=st.selfplay_model.state_dict(), optimizer=st.optimizer.state_dict(),
        scaler=st.scaler.state_dict(), counters=counters,
        rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state_all() if cuda else None, search=st.generator.get_state()),
        config=dataclasses.asdict(cfg), model_args=st.model_args,
        buffer=st.buf.state_dict() if cfg.save_buffer else None, obs=obs)   # tensors: torch.save streams them


def restore(st, ckpt):
    """Load a checkpoint dict into a run state made by build()."""
    for name in ("model", "target_model", "selfplay_model", "optimizer", "scaler"):
        if ckpt[name] or name != "scaler":   # a CPU run's disabled GradScaler saved {}: a resume on CUDA starts afresh
            getattr(st, name).load_state_dict(ckpt[name])
    st.target_snapshot = {k: v.to(st.device) for k, v in ckpt["target_snapshot"].items()}
    for k in COUNTERS:
        setattr(st, k, ckpt["counters"][k])
    rng = ckpt["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and st.device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    st.generator.set_state(rng["search"])
    if ckpt["buffer"] is not None:
        st.buf.load_state_dict(ckpt["buffer"])
        st.buf.truncate_running_episodes()   # the envs restart: cut (not end) the episodes they were playing


# ---------------------------------------------------------------------------------------------
# The loop: collect, store, reanalyze, learn, refresh, evaluate, log, checkpoint
# ---------------------------------------------------------------------------------------------

def collect_now(st, cfg):
    """Data pacing (EZ_SPEC §6): self-play until learning can start, then only while
    env_steps / total_transitions <= updates / training_steps; no data after training_steps or the budget."""
    if st.updates >= cfg.training_steps or st.env_steps + cfg.num_envs > cfg.total_transitions:
        return False
    return len(st.buf) < cfg.start_transitions or st.env_steps * cfg.training_steps <= st.updates * cfg.total_transitions


def selfplay_step(st, env, obs, tree, cfg):
    """One lockstep step of the E envs, chosen by one batched search with root noise (EZ_SPEC §6; the last
    round(greedy_fraction * E) envs play as evaluation: no noise, argmax; with explore_hold N the others keep a
    chosen action for 1..N steps while the temperature is 1); stores the transitions.
    -> next obs [E, *O], the search tree (reused), raw scores of the games that ended."""
    obs = torch.as_tensor(obs, device=st.device)          # sync point: the envs' observations to the device, once
    E, A = cfg.num_envs, env.num_actions
    greedy = round(cfg.greedy_fraction * E)
    noise = torch.arange(E, device=st.device) < E - greedy                          # [E] root noise where True
    result = run_search(st.selfplay_model, obs, cfg, cfg.num_simulations, noise, st.generator, tree)
    temperature = visit_softmax_temperature(st.updates, cfg)
    if st.updates == 0:  # before learning: uniform random actions and uniform policy targets (EZ_SPEC §6)
        actions = torch.randint(A, (E,), generator=st.generator, device=st.device)
        visit_dist = torch.full((E, A), 1 / A, device=st.device)
    else:
        actions = select_action(result.visit_counts, temperature, st.generator, deterministic=False)
        greedy_visits = result.visit_counts[E - greedy:]
        actions[E - greedy:] = select_action(greedy_visits, temperature, st.generator, deterministic=True)
        visit_dist = result.visit_counts / cfg.num_simulations                      # [E, A] targets at T = 1
    if cfg.explore_hold > 1 and temperature == 1:  # held exploration: envs inside a hold repeat their last action
        keep = st.hold_left > 0
        actions = torch.where(keep, st.held, actions)
        st.hold_left = torch.where(keep, st.hold_left - 1, st.hold_len - 1)
        st.held = actions
    next_obs, reward, done, info = env.step(actions.cpu().numpy())                 # sync point: the envs run on the host
    if cfg.explore_hold > 1:
        st.hold_left[torch.as_tensor(done, device=st.device)] = 0                  # a new episode chooses anew
    # A time limit cuts the episode (truncated: not an absorbing state), unless cfg says it ends it as the original.
    truncated = None if cfg.time_limit_terminal else info["truncated"]
    st.buf.add(obs, actions, reward, done, result.root_values, visit_dist, info["final_obs"], truncated)
    st.env_steps += cfg.num_envs
    return next_obs, result.tree, info["episode_return"][info["game_over"]]


def fill_random(st, env, obs, size, rng=None):
    """Random play into st.buf until it holds `size` transitions, without searches (timings and tests; a run's
    warm-up searches as the original, selfplay_step). -> the envs' observations after it."""
    rng = rng or np.random.default_rng(0)
    E, A = env.num_envs, env.num_actions
    while len(st.buf) < size:
        actions = rng.integers(A, size=E)
        next_obs, reward, done, info = env.step(actions)
        st.buf.add(obs, actions, reward, done, np.zeros(E), np.full((E, A), 1 / A), info["final_obs"], info["truncated"])
        obs = next_obs
    return obs


def learner_step(st, cfg):
    """Sample (PER, beta 0.4 -> 1), targets from the target network, one update, network refreshes
    (EZ_SPEC §4, §5). -> mean losses [4], mean TD horizon (device tensors)."""
    beta = cfg.priority_beta + (1 - cfg.priority_beta) * st.updates / (cfg.training_steps + cfg.last_steps)
    batch = st.buf.sample(cfg.batch_size, cfg.num_unroll_steps, cfg.td_steps, beta, st.generator, cfg.replay_window)
    targets = reanalyze(batch, st.buf, st.target_model, cfg, st.generator)
    losses = train_step(st, batch, targets, cfg)
    refresh_networks(st, cfg)
    return losses, targets.horizon.float().mean()


def measure_pace(cfg, device):
    """Time a throwaway copy of the run on envs it never uses, leaving the global random state as it was: a buffer
    of random play, 3 self-play steps and 2 updates at batch min(B, 8) (the first of each pays one-off costs), then
    2 at batch B if that is cheap (under 2 s by linear scaling). -> (seconds per self-play step, seconds per update
    at batch B: measured, or scaled linearly from batch 8, an upper bound for a network whose cost grows slower)."""
    b, B = min(cfg.batch_size, 8), cfg.batch_size
    window = cfg.num_envs * (cfg.num_unroll_steps + cfg.td_steps)
    small = dataclasses.replace(cfg, total_transitions=B + window + 4 * cfg.num_envs)
    state = random.getstate(), np.random.get_state()
    env = make_env(cfg.game, cfg.num_envs, 2 ** 30, train=True, max_episode_steps=cfg.max_episode_steps)
    with torch.random.fork_rng(devices=[]):
        st = build(small, env, device)
        obs, tree = fill_random(st, env, env.reset(), B + window), None
        st.updates, step_s = 1, []     # searched actions, as after the random warm-up
        for _ in range(3):
            t0 = time.perf_counter()
            obs, tree, _ = selfplay_step(st, env, obs, tree, small)
            step_s.append(time.perf_counter() - t0)
        def update(batch_size):   # --compile: batch B only (one graph per batch size; the run's is B's)
            t0 = time.perf_counter()
            compile_now = cfg.compile and batch_size == B
            learner_step(st, dataclasses.replace(small, batch_size=batch_size, compile=compile_now))
            return time.perf_counter() - t0
        update_s = [update(b) for _ in range(2)][1] * B / b
        if B > b and update_s < 2.0:
            update_s = [update(B) for _ in range(2)][1]
    env.close()
    random.setstate(state[0])
    np.random.set_state(state[1])
    return float(np.mean(step_s[1:])), update_s


def train(cfg, ckpt=None, run_dir=None, changed=None):
    """Run (or, given a checkpoint dict and its directory, continue) a training run. -> the run directory."""
    stop = Stop()                                     # from here on Ctrl-C / SIGTERM end in a checkpoint
    device, t_start = resolve_device(cfg.device), time.time()
    backend = resolve_backend(cfg.search_backend, device)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    random.seed(cfg.seed)  # seeding once (CleanRL); a resumed run restores every state below instead
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    resumed_at = ckpt["counters"]["env_steps"] if ckpt else 0   # a resumed run reseeds its envs seed + i + env_steps
    env = make_env(cfg.game, cfg.num_envs, cfg.seed + resumed_at, train=True, max_episode_steps=cfg.max_episode_steps)
    st = build(cfg, env, device)
    if ckpt:
        restore(st, ckpt)
    run_dir = run_dir or os.path.join(cfg.runs_dir, f"{cfg.game}__{cfg.exp_name}__{cfg.seed}__{int(time.time())}")
    os.makedirs(run_dir, exist_ok=True)
    write_config_json(run_dir, cfg, run_record(device, backend), ckpt and ckpt["counters"], changed)
    log = RunLog(run_dir, cfg, ckpt and ckpt["counters"])
    total_updates = cfg.training_steps + cfg.last_steps
    print(f"{'resumed' if ckpt else 'started'} {run_dir}: {cfg.game} ({env.num_actions} actions) on {device}, "
          f"search {backend}; {sum(p.numel() for p in st.model.parameters()):,} parameters, batch {cfg.batch_size}, "
          f"{cfg.num_simulations} simulations; budget {cfg.total_transitions:,} env steps, {total_updates:,} updates"
          + (f"; at update {st.updates:,}, env step {st.env_steps:,}, buffer {len(st.buf):,}" if ckpt else ""), flush=True)
    if ckpt and ckpt["buffer"] is None:
        print(f"note: the checkpoint holds no replay buffer (--no-save-buffer): the run's {st.env_steps:,} "
              f"transitions are gone; self-play refills {cfg.start_transitions:,} before learning goes on", flush=True)
    work = sum(p.numel() for p in st.model.parameters()) * cfg.batch_size * total_updates * (
        cfg.num_unroll_steps + 1 + cfg.num_simulations)  # cartpole preset 1.8e11 (3 min here); below 1e10: seconds
    if device.type == "cpu" and work > 1e10 and not stop.requested:
        print("timing a few self-play steps and updates on this CPU" + (" (and compiling the learner's unroll: "
              "minutes the first time, then cached) ..." if cfg.compile else " ..."), flush=True)
        print(estimate(cfg, st, *measure_pace(cfg, device), time.time() - t_start), flush=True)

    ckpt_path, obs, tree = os.path.join(run_dir, "ckpt.pt"), env.reset(), None                 # obs [E, *O]
    saved = (st.updates, st.env_steps) if ckpt else None
    pace, ticker, interval, elapsed0 = Pace(st), Ticker(), Interval(st, device), st.elapsed
    log_tick = (st.env_steps + st.updates) // cfg.log_interval
    try:
        while not stop.requested:
            st.elapsed = elapsed0 + time.time() - pace.start
            if st.updates and (st.updates % cfg.eval_interval == 0 or st.updates == total_updates) \
                    and st.eval_updates != st.updates:
                if not evaluate_and_log(st, cfg, log, pace, stop):
                    break                             # stopped during the evaluation: the resumed run redoes it
                if not st.best_eval >= st.last_eval:  # also when best_eval is NaN (the first evaluation)
                    st.best_eval, st.best_updates = st.last_eval, st.updates
                    save_checkpoint(os.path.join(run_dir, "best.pt"), checkpoint(st, cfg, None, kind="best"))
                ticker.printed()
            if st.updates and (st.updates % cfg.save_interval == 0 or st.updates == total_updates) \
                    and saved != (st.updates, st.env_steps):
                save_checkpoint(ckpt_path, checkpoint(st, cfg, obs))
                saved = (st.updates, st.env_steps)
            if st.updates >= total_updates:
                break
            if collect_now(st, cfg):
                # ALGO LOGIC: self-play, one batched search for all E envs
                obs, tree, scores = selfplay_step(st, env, obs, tree, cfg)
                for score in scores:
                    st.games += 1
                    interval.returns.append(score)
                    log.episode(score, st.updates)
            elif len(st.buf) >= cfg.start_transitions:
                # ALGO LOGIC: reanalyze a prioritized batch with the target network, learn, refresh
                interval.add(*learner_step(st, cfg))
                pace.learning(st)
            else:
                raise RuntimeError(f"the buffer holds {len(st.buf)} < {cfg.start_transitions} transitions and the "
                                   f"data budget is spent")

            tick = (st.env_steps + st.updates) // cfg.log_interval
            if tick > log_tick or st.updates == total_updates:  # TRY NOT TO MODIFY: progress line, TensorBoard, csv
                log_tick = tick
                log.metrics(interval.row(st, learning_rate(st.updates, cfg), elapsed0 + time.time() - pace.start),
                            *pace.left(st, cfg))
                ticker.printed()
            elif ticker.due():
                progress_line(st, cfg, pace)
        st.elapsed = elapsed0 + time.time() - pace.start
        t0 = time.time()
        if stop.requested and saved != (st.updates, st.env_steps):
            save_checkpoint(ckpt_path, checkpoint(st, cfg, obs))
    except KeyboardInterrupt:                         # the second Ctrl-C
        print(f"train.py: aborted; {ckpt_path} holds update {saved[0]:,}, env step {saved[1]:,}" if saved else
              "train.py: aborted before the first checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(130)
    finally:
        stop.close()
        env.close()
        log.close()
    if stop.requested:
        print(stopped(st, cfg, stop.requested, ckpt_path, time.time() - t0), flush=True)
    else:
        print(summary(st, cfg, run_dir, time.time() - t_start), flush=True)
    return run_dir


def main(argv=None):
    """train.py's command line: a new run, or --resume; UsageError for anything that cannot run."""
    explicit, preset, resume = parse_args(argv, __doc__.split("\n\n")[0])
    if not resume:
        cfg = check_config(Config(**{**PRESETS.get(preset, {}), **explicit}))
        check_writable_dir(cfg.runs_dir, "--runs-dir")
        return train(cfg)
    if preset:
        raise UsageError("--preset with --resume: a resumed run keeps its checkpoint's configuration; drop --preset")
    ckpt = load_checkpoint(resume, resume=True)
    cfg = resume_config(ckpt, explicit, resume)
    run_dir = resume if os.path.isdir(resume) else os.path.dirname(resume) or "."
    check_writable_dir(run_dir, "the run directory")
    done = ckpt["counters"]
    if ckpt["buffer"] is None and (done["env_steps"] + cfg.num_envs > cfg.total_transitions
                                   or done["updates"] >= cfg.training_steps):
        raise UsageError(f"{resume} holds no replay buffer (saved with --no-save-buffer) and the run's data budget is "
                         f"spent, so there is nothing to learn from; start a new run")
    return train(cfg, ckpt, run_dir, {k: v for k, v in explicit.items() if ckpt["config"].get(k) != v})


def cli(argv=None):
    """python train.py: a bad command line or checkpoint ends in one line on stderr and exit status 2."""
    try:
        main(argv)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:                         # before the run started: nothing to save
        print("train.py: interrupted before the run started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
