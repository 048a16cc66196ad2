"""EfficientZero training: self-play, prioritized replay, reanalysis, learning, evaluation, checkpoints.

Paper: Ye et al. 2021, "Mastering Atari Games with Limited Data" (arXiv:2111.00210). Every step of the loop
cites EZ_SPEC.md (the official code, read from its HEAD 468bb03, with sources); the configuration is in config.py.
One process, one device: the E self-play envs are searched in one batched search per step and every
learner batch is reanalyzed in one batched search.

    python train.py --game MsPacman                      # the paper's configuration (Atari 100k)
    python train.py --preset cartpole                    # learns CartPole-v1 on a CPU in a few minutes
    python train.py --resume runs/<run>/ckpt.pt          # continue a stopped run
    python train.py --help                               # every field of Config with its source

Shape letters: E envs, B batch, K unroll steps, A actions, S = 2 * support_size + 1 support bins.
"""

import argparse
import copy
import csv
import dataclasses
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from atari import canonical_game, make_env
from config import (PRESETS, Config, UsageError, check_config, load_checkpoint, model_args, parse_args,
                    resolve_device, save_checkpoint)
from eval import evaluate
from mcts import run_search, select_action
from model import make_model, scalar_to_support
from reanalyze import reanalyze
from replay import ReplayBuffer


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
    """Acting temperature 1 / 0.5 / 0.25 at 50% / 75% of training_steps (EZ_SPEC §6, HEAD)."""
    return 1.0 if updates < 0.5 * cfg.training_steps else 0.5 if updates < 0.75 * cfg.training_steps else 0.25


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
        step = model.recurrent_inference(latent, lstm_state, actions[:, k - 1], k)  # s_k, prefix_k, (p_k, v_k)
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


def train_step(st, batch, targets, cfg):
    """One SGD update (EZ_SPEC §4.3). -> mean losses [4] (a device tensor, no sync)."""
    device = st.device
    obs = batch.obs                                                              # [B, K+1, *O] on the device
    if obs.dim() == 5 and cfg.augmentation:
        obs = augment(obs)
    coeffs = torch.tensor([cfg.value_loss_coeff, cfg.policy_loss_coeff, cfg.value_prefix_loss_coeff,
                           cfg.consistency_coeff], device=device)
    for group in st.optimizer.param_groups:
        group["lr"] = learning_rate(st.updates, cfg)
    with torch.autocast(device.type, dtype=torch.float16, enabled=st.scaler.is_enabled()):
        losses, value_0 = unroll_losses(st.model, obs, batch.actions, batch.mask, targets, cfg)   # [4, B], [B]
        loss = (batch.weights * (coeffs @ losses.float())).mean()                 # EZ_SPEC §4.3.4, PER weights
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
# Self-play and evaluation
# ---------------------------------------------------------------------------------------------


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
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda"),
        buf=ReplayBuffer(cfg.total_transitions, cfg.num_envs, env.frame_shape, env.stack, env.num_actions,
                         alpha=cfg.priority_alpha, frame_dtype=torch.uint8 if env.is_atari else torch.float32,
                         device=device),                    # all on the training device: no host sync to sample
        generator=torch.Generator(device).manual_seed(cfg.seed),   # search noise, tie-breaks, actions, replay draws
        rng=np.random.default_rng(cfg.seed),                       # random warm-up actions (on the host)
        env_steps=0, updates=0, games=0, elapsed=0.0, last_eval=float("nan"))


COUNTERS = ("env_steps", "updates", "games", "elapsed", "last_eval")


def checkpoint(st, cfg, obs):
    """Everything a resumed run needs (nanoGPT-style single dict); obs [E, *O] are the envs' observations."""
    cuda = st.device.type == "cuda"
    return dict(
        model=st.model.state_dict(), target_model=st.target_model.state_dict(), target_snapshot=st.target_snapshot,
        selfplay_model=st.selfplay_model.state_dict(), optimizer=st.optimizer.state_dict(),
        scaler=st.scaler.state_dict(), counters={k: getattr(st, k) for k in COUNTERS},
        rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state_all() if cuda else None, search=st.generator.get_state(),
                 replay=st.rng.bit_generator.state),
        config=dataclasses.asdict(cfg), model_args=st.model_args,
        buffer=st.buf.state_dict() if cfg.save_buffer else None, obs=obs if cfg.save_buffer else None)


def restore(st, ckpt):
    """Load a checkpoint dict into a run state made by build()."""
    for name in ("model", "target_model", "selfplay_model", "optimizer", "scaler"):
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
    st.rng.bit_generator.state = rng["replay"]
    if ckpt["buffer"] is not None:
        st.buf.load_state_dict(ckpt["buffer"])
        st.buf.truncate_running_episodes()   # the envs restart: cut (not end) the episodes they were playing


# ---------------------------------------------------------------------------------------------
# The loop: collect, store, reanalyze, learn, refresh, evaluate, log, checkpoint
# ---------------------------------------------------------------------------------------------

LOSSES = ("value", "policy", "value_prefix", "consistency")
METRICS = ("env_steps", "updates", "time", "env_steps_per_s", "updates_per_s", *(f"loss_{n}" for n in LOSSES),
           "episode_return", "eval_return", "learning_rate", "td_horizon", "buffer_size")


def collect_now(st, cfg):
    """Data pacing (EZ_SPEC §6): self-play until learning can start, then only while
    env_steps / total_transitions <= updates / training_steps; no data after training_steps or the budget."""
    if st.updates >= cfg.training_steps or st.env_steps + cfg.num_envs > cfg.total_transitions:
        return False
    return len(st.buf) < cfg.start_transitions or st.env_steps * cfg.training_steps <= st.updates * cfg.total_transitions


def selfplay_step(st, env, obs, tree, cfg):
    """One lockstep step of the E envs, chosen by one batched search with root noise (EZ_SPEC §6); stores the
    transitions. -> next obs [E, *O], the search tree (reused), raw scores of the games that ended."""
    result = run_search(st.selfplay_model, obs, cfg, cfg.num_simulations, True, st.generator, tree)
    if st.updates == 0:  # before learning: uniform random actions and uniform policy targets (EZ_SPEC §6)
        actions = st.rng.integers(env.num_actions, size=cfg.num_envs)
        visit_dist = np.full((cfg.num_envs, env.num_actions), 1 / env.num_actions, np.float32)
    else:
        temperature = visit_softmax_temperature(st.updates, cfg)
        actions = select_action(result.visit_counts, temperature, st.generator, deterministic=False)
        actions = actions.cpu().numpy()                                             # sync point: the envs run on the host
        visit_dist = result.visit_counts / cfg.num_simulations                      # [E, A] targets at T = 1 (device)
    next_obs, reward, done, info = env.step(actions)
    # A time limit cuts the episode (truncated: not an absorbing state), unless cfg says it ends it as the original.
    truncated = None if cfg.time_limit_terminal else info["truncated"]
    st.buf.add(obs, actions, reward, done, result.root_values, visit_dist, info["final_obs"], truncated)
    st.env_steps += cfg.num_envs
    return next_obs, result.tree, info["episode_return"][info["game_over"]]


def learner_step(st, cfg):
    """Sample (PER, beta 0.4 -> 1), targets from the target network, one update, network refreshes
    (EZ_SPEC §4, §5). -> mean losses [4], mean TD horizon (device tensors)."""
    beta = cfg.priority_beta + (1 - cfg.priority_beta) * st.updates / (cfg.training_steps + cfg.last_steps)
    batch = st.buf.sample(cfg.batch_size, cfg.num_unroll_steps, cfg.td_steps, beta, st.generator)
    targets = reanalyze(batch, st.buf, st.target_model, cfg, st.generator)
    losses = train_step(st, batch, targets, cfg)
    refresh_networks(st, cfg)
    return losses, targets.horizon.float().mean()


def evaluate_and_log(st, cfg, run_dir, writer, elapsed):
    """Evaluate the learner's network; append a row to eval.csv: env steps, updates, seconds since the run started
    (earlier evaluations included), mean, std, then every game's score separated by spaces."""
    scores, _ = evaluate(st.model, cfg, cfg.eval_episodes, cfg.seed + cfg.num_envs, cfg.eval_max_episode_steps,
                         cfg.num_simulations)
    st.last_eval = float(scores.mean())
    writer.add_scalar("eval/episodic_return", st.last_eval, st.env_steps)
    with open(os.path.join(run_dir, "eval.csv"), "a") as f:
        f.write(f"{st.env_steps},{st.updates},{elapsed:.1f},{scores.mean():.2f},{scores.std():.2f},"
                + " ".join(f"{s:g}" for s in scores) + "\n")
    print(f"eval at update {st.updates:,}, env step {st.env_steps:,}, {elapsed:.0f} s: {scores.mean():.1f} +- "
          f"{scores.std():.1f} over {len(scores)} games", flush=True)


def train(cfg, ckpt=None, run_dir=None):
    """Run (or, given a checkpoint dict and its directory, continue) a training run. -> the run directory."""
    device = resolve_device(cfg.device)
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
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items()))
    new_csv = not os.path.exists(os.path.join(run_dir, "metrics.csv"))
    metrics_file = open(os.path.join(run_dir, "metrics.csv"), "a", newline="")
    metrics = csv.DictWriter(metrics_file, METRICS)
    if new_csv:
        metrics.writeheader()
    print(f"{'resumed' if ckpt else 'started'} {run_dir} on {device}: {cfg.game}, {env.num_actions} actions, "
          f"{sum(p.numel() for p in st.model.parameters()):,} parameters, update {st.updates:,}, "
          f"env step {st.env_steps:,}, buffer {len(st.buf):,}", flush=True)

    total_updates = cfg.training_steps + cfg.last_steps
    obs, tree = env.reset(), None                                                   # [E, *O]
    loss_sum, td_sum, num_updates, returns = torch.zeros(4, device=device), torch.zeros((), device=device), 0, []
    t_start = t_log = time.time()
    elapsed0, log_env, log_upd = st.elapsed, st.env_steps, st.updates
    log_tick = (st.env_steps + st.updates) // cfg.log_interval
    while st.updates < total_updates:
        if collect_now(st, cfg):
            # ALGO LOGIC: self-play, one batched search for all E envs
            obs, tree, scores = selfplay_step(st, env, obs, tree, cfg)
            for score in scores:
                returns.append(score)
                st.games += 1
                writer.add_scalar("charts/episodic_return", score, st.env_steps)
        elif len(st.buf) >= cfg.start_transitions:
            # ALGO LOGIC: reanalyze a prioritized batch with the target network, learn, refresh
            losses, horizon = learner_step(st, cfg)
            loss_sum, td_sum, num_updates = loss_sum + losses, td_sum + horizon, num_updates + 1
            if st.updates % cfg.eval_interval == 0 or st.updates == total_updates:
                evaluate_and_log(st, cfg, run_dir, writer, elapsed0 + time.time() - t_start)
            if st.updates % cfg.save_interval == 0 or st.updates == total_updates:
                st.elapsed = elapsed0 + time.time() - t_start
                save_checkpoint(os.path.join(run_dir, "ckpt.pt"), checkpoint(st, cfg, obs))
        else:
            raise UsageError(f"the buffer holds {len(st.buf)} < {cfg.start_transitions} transitions and the data "
                             f"budget is spent: resume from a checkpoint saved with --save-buffer")

        tick = (st.env_steps + st.updates) // cfg.log_interval
        if tick > log_tick or st.updates == total_updates:  # TRY NOT TO MODIFY: progress line, TensorBoard, csv
            log_tick, now = tick, time.time()
            dt = max(now - t_log, 1e-9)
            row = dict(env_steps=st.env_steps, updates=st.updates, time=round(elapsed0 + now - t_start, 1),
                       env_steps_per_s=(st.env_steps - log_env) / dt, updates_per_s=(st.updates - log_upd) / dt,
                       episode_return=np.mean(returns) if returns else float("nan"), eval_return=st.last_eval,
                       learning_rate=learning_rate(st.updates, cfg), buffer_size=len(st.buf),
                       td_horizon=(td_sum / max(num_updates, 1)).item())                     # sync point
            row.update({f"loss_{n}": v for n, v in zip(LOSSES, (loss_sum / max(num_updates, 1)).tolist())})
            for k, v in row.items():
                if k not in ("env_steps", "time"):
                    writer.add_scalar(("losses/" if k.startswith("loss") else "charts/") + k, v, st.env_steps)
            metrics.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
            metrics_file.flush()
            left = (total_updates - st.updates) / row["updates_per_s"] if row["updates_per_s"] > 0 else float("nan")
            print(f"env {st.env_steps:,} | upd {st.updates:,} | {row['env_steps_per_s']:.1f} env/s "
                  f"{row['updates_per_s']:.2f} upd/s | loss v {row['loss_value']:.3f} p {row['loss_policy']:.3f} "
                  f"r {row['loss_value_prefix']:.3f} c {row['loss_consistency']:.3f} | return "
                  f"{row['episode_return']:.1f} | eval {st.last_eval:.1f} | lr {row['learning_rate']:.4f} | "
                  f"td {row['td_horizon']:.2f} | buf {len(st.buf):,} | left "
                  + (time.strftime("%H:%M:%S", time.gmtime(left)) if np.isfinite(left) else "?"), flush=True)
            t_log, log_env, log_upd, returns = now, st.env_steps, st.updates, []
            loss_sum, td_sum, num_updates = torch.zeros_like(loss_sum), torch.zeros_like(td_sum), 0
    env.close()
    writer.close()
    metrics_file.close()
    return run_dir


def main(argv=None):
    explicit, preset, resume = parse_args(argv, __doc__.split("\n\n")[0])
    ckpt, base = None, {}
    if resume:
        ckpt = load_checkpoint(resume)
        base = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
        if "game" in explicit:
            try:
                game = canonical_game(explicit["game"])
            except ValueError as e:
                raise UsageError(str(e)) from None
            if game != base["game"]:
                raise UsageError(f"{resume} is a run of {base['game']}, not {game}: drop --game, or start a new "
                                 f"run of {game} without --resume")
    cfg = check_config(Config(**{**base, **PRESETS.get(preset, {}), **explicit}))
    return train(cfg, ckpt, os.path.dirname(resume) if resume else None)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"train.py: error: {e}")
