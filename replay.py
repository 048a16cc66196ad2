"""Prioritized replay of whole trajectories, stored in lockstep on the training device, with batch assembly for
K unroll steps.

EfficientZero (arXiv:2111.00210) replay as read from the official code: EZ_SPEC.md §4.2 (batch layout), §4.4
(storage, PER), §1 (frame stack). Differences from the original, on purpose:
- whole episodes instead of 400-step blocks, so nothing is padded or cut at block boundaries
  (EZ_SPEC App. B.5; the original's "fake terminal" at block ends, §5.2 quirks a/b, is gone);
- an episode cut by a time limit, or by a resumed run (its env restarts), ends *truncated*, not terminal: its
  state after the cut is not absorbing, and it is sampled like an episode that is still running (only where
  the K + td_steps transitions that its targets read are stored), so no target bootstraps past the cut
  (the original treats its time limit as a terminal, EZ_SPEC §5.2 quirk c);
- each frame is stored once (not 4 stacked copies, not JPEG strings); stacks are rebuilt at sampling time;
- everything lives on `device`, and sampling, batch assembly and priority updates are tensor ops there with
  no host sync: PER draws its batch by an exponential race (Efraimidis & Spirakis 2006: the B largest
  p_i / Exp(1)_i are a draw without replacement with probabilities proportional to p_i, as the original's
  np.random.choice(replace=False, p=...)), since torch.multinomial checks its input on the host.

Layout. The E self-play envs append one transition each per `add`, so env e's consecutive transitions
are E indices apart in one flat store: global index i = insertion order (it gives the data's age, §5.1).
Transition i holds: the newest frame of the observation the action was taken in, the action, the
sign-clipped reward, the self-play root value and visit distribution, its priority, and its episode's
first index (`ep_start`), last index (`ep_end`, -1 while the episode runs), whether that end is terminal
(`ep_terminal`) and where its final observation is (`final_slot`, -1 unless terminal). The last observation
of a terminal episode (after its final action) goes to a small side store (`final_frames`). The host keeps
only the counts and each env's running episode start, so `add` never reads the device.

Stacks (EZ_SPEC §1): the stack at step t is frames t-3..t of the same episode, frame-major
[f0 RGB, f1 RGB, ...]. Frame positions are clamped to the episode: before its first step the first frame
repeats; after the last step of a terminal episode comes the final observation, then the final observation
repeats (as the original's padding with the last frame, EZ_SPEC §4.2).

Shape letters: N capacity, E envs, A actions, B batch, K unroll steps, W = K + td_steps, S stack,
F = frame_shape ([3, 96, 96] for Atari, [D] for vector tasks), O = obs_shape = [S * F[0], *F[1:]].
Capacity: no eviction (the paper's 1e6 capacity never evicts in 100k); `add` refuses data past it.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:                    # every field a tensor on the buffer's device
    indices: torch.Tensor       # [B] int64 global indices t
    weights: torch.Tensor       # [B] f32 IS weights (N P(i))^-beta / max
    obs: torch.Tensor           # [B, K+1, *O] stacks at t..t+K (final obs at t+episode_left, then clamped)
    actions: torch.Tensor       # [B, K] int64, uniform random where past the end
    mask: torch.Tensor          # [B, K] f32, 1 iff a_{t+k} exists
    rewards: torch.Tensor       # [B, W] f32 sign-clipped r_{t..t+W-1}, 0 past the end
    episode_left: torch.Tensor  # [B] int64 transitions from t to a terminal end (t included), capped at W+1
    child_visits: torch.Tensor  # [B, K+1, A] f32 self-play visit distributions, 0 past the end
    root_values: torch.Tensor   # [B, K+1] f32 self-play root values, 0 past the end
    ages: torch.Tensor          # [B] int64 len(buf) - t


class ReplayBuffer:
    # per-transition tensors: name -> (dtype, shape after the transition axis); frames are separate
    FIELDS = {"actions": (torch.int64, ()), "rewards": (torch.float32, ()), "root_values": (torch.float32, ()),
              "priorities": (torch.float32, ()), "ep_start": (torch.int64, ()), "ep_end": (torch.int64, ()),
              "ep_terminal": (torch.bool, ()), "final_slot": (torch.int64, ())}

    def __init__(self, capacity, num_envs, frame_shape, stack, num_actions, alpha=0.6, frame_dtype=torch.uint8,
                 device="cpu"):
        self.capacity, self.num_envs, self.stack, self.num_actions = capacity, num_envs, stack, num_actions
        self.frame_shape, self.alpha, self.device = tuple(frame_shape), alpha, torch.device(device)
        self.frame_dtype = frame_dtype if isinstance(frame_dtype, torch.dtype) else \
            torch.from_numpy(np.empty(0, frame_dtype)).dtype
        self.obs_shape = (stack * self.frame_shape[0], *self.frame_shape[1:])
        self.frames = self._empty_frames(capacity)                                 # [N, *F]
        for name, (dtype, shape) in self.FIELDS.items():
            setattr(self, name, torch.zeros((capacity, *shape), dtype=dtype, device=self.device))
        self.child_visits = torch.zeros((capacity, num_actions), dtype=torch.float32, device=self.device)  # [N, A]
        self.final_frames = self._empty_frames(16)                                 # [episodes, *F], grows
        self.num_final = 0
        self.size = 0
        self.cur_start = np.arange(num_envs, dtype=np.int64)   # [E] first index of each env's running episode

    def __len__(self):
        return self.size

    def _empty_frames(self, n):
        # torch.empty: on a CPU, pages never written cost no memory
        return torch.empty((n, *self.frame_shape), dtype=self.frame_dtype, device=self.device)

    def _newest_frame(self, obs):
        """[E, *O] -> [E, *F] on the buffer's device: the last frame of each stack (frame-major channels)."""
        obs = torch.as_tensor(np.asarray(obs) if not torch.is_tensor(obs) else obs).to(self.device)
        return obs.reshape(len(obs), self.stack, *self.frame_shape)[:, -1]

    def _to_device(self, x, dtype):
        return torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x)).to(self.device, dtype)

    # ---------------------------------------------------------------------------------------------
    # Storing
    # ---------------------------------------------------------------------------------------------

    def add(self, obs, action, reward, done, root_value, visit_dist, final_obs=None, truncated=None):
        """One lockstep step of the E envs. obs [E, *O] is the observation each action was taken in;
        action [E]; reward [E] raw; root_value [E] and visit_dist [E, A] (tensors on any device, or arrays);
        done [E] (host) ends the episode after this transition: terminally, unless truncated [E] (host) says it
        was cut (a time limit); final_obs [E, *O] (host) is the observation after a terminal step."""
        E, n = self.num_envs, self.size
        if n + E > self.capacity:
            raise ValueError(f"replay buffer full ({self.capacity} transitions); it does not evict")
        done = np.asarray(done, bool)
        truncated = np.zeros(E, bool) if truncated is None else np.asarray(truncated, bool) & done
        if (done & ~truncated).any() and final_obs is None:
            raise ValueError("final_obs is needed where an episode ends terminally")
        new = slice(n, n + E)
        self.frames[new] = self._newest_frame(obs)
        self.actions[new] = self._to_device(action, torch.int64)
        reward = torch.as_tensor(np.asarray(reward, np.float32)).to(self.device)  # sync point: rewards to the device
        self.rewards[new] = torch.sign(reward)                     # EZ_SPEC §1: clipped reward for all targets
        self.root_values[new] = self._to_device(root_value, torch.float32)
        self.child_visits[new] = self._to_device(visit_dist, torch.float32)
        top = self.priorities[:n].amax() if n else torch.ones((), device=self.device)
        self.priorities[new] = top.expand(E)                                   # EZ_SPEC §4.1: new data at max priority
        index = torch.arange(n, n + E, device=self.device)         # [E] env e's newest step starts an episode
        if n:                                                      # unless env e's previous step did not end one
            before = slice(n - E, n)
            index = torch.where(self.ep_end[before] >= 0, index, self.ep_start[before])
        self.ep_start[new] = index
        self.ep_end[new] = -1
        self.ep_terminal[new] = False
        self.final_slot[new] = -1
        self.size = n + E
        for e in np.flatnonzero(done):
            self._end_episode(e, None if truncated[e] else np.asarray(final_obs)[e])

    def _end_episode(self, e, final_obs):
        """Close env e's running episode at its newest transition: terminal with final observation final_obs
        [*O] (the one after its last action), or truncated when final_obs is None."""
        E, last = self.num_envs, self.size - self.num_envs + e
        episode = slice(int(self.cur_start[e]), last + 1, E)                    # env e's steps are E apart
        self.ep_end[episode] = last
        if final_obs is not None:
            if self.num_final == len(self.final_frames):
                self.final_frames = torch.cat([self.final_frames, torch.empty_like(self.final_frames)])
            final_obs = torch.as_tensor(np.asarray(final_obs)[None]).to(self.device)  # sync point: at an end only
            self.final_frames[self.num_final] = self._newest_frame(final_obs)[0]
            self.ep_terminal[episode] = True
            self.final_slot[episode] = self.num_final
            self.num_final += 1
        self.cur_start[e] = last + E

    def truncate_running_episodes(self):
        """Cut every running episode at its newest transition, as truncated (a resumed run restarts its envs):
        its transitions keep the targets they would have had, the last K + td_steps are never sampled."""
        for e in range(self.num_envs):
            if self.cur_start[e] < self.size:                      # env e has transitions in a running episode
                self._end_episode(e, None)

    def update_priorities(self, indices, priorities):
        """indices [B] int64, priorities [B] (device tensors: no sync)."""
        self.priorities.index_copy_(0, self._to_device(indices, torch.int64),
                                    self._to_device(priorities, torch.float32))

    # ---------------------------------------------------------------------------------------------
    # Episode geometry, all as tensor ops on the device
    # ---------------------------------------------------------------------------------------------

    def _last_stored(self, t):
        """[...] int64 -> the last stored index of t's episode: its end, or (running) env e's newest index."""
        newest = self.size - self.num_envs + t % self.num_envs
        end = self.ep_end[t]
        return torch.where(end >= 0, end, newest)

    def _sampleable(self, window):
        """[size] bool: t ends terminally, or the `window` transitions after t in its episode are stored."""
        t = torch.arange(self.size, device=self.device)
        return self.ep_terminal[:self.size] | (t + window * self.num_envs <= self._last_stored(t))

    def num_sampleable(self, num_unroll_steps=5, td_steps=5):
        return int(self._sampleable(num_unroll_steps + td_steps).sum())        # sync point (tests, checks)

    def _episode_left(self, t, cap):
        """[M] transitions from t to its terminal end (t included), capped at `cap` (cap if not terminal)."""
        left = (self.ep_end[t] - t) // self.num_envs + 1
        return torch.where(self.ep_terminal[t], left.clamp(max=cap), cap)

    def stacks(self, indices, offsets):
        """[M] indices, [M] offsets -> [M, *O] the obs stack at step t + offset of t's episode (on the device)."""
        t = self._to_device(indices, torch.int64)[:, None]        # [M, 1]
        E, S = self.num_envs, self.stack
        q = self._to_device(offsets, torch.int64)[:, None] - (S - 1) + torch.arange(S, device=self.device)  # [M, S]
        q = torch.maximum(q, (self.ep_start[t] - t) // E)         # before the start: the first frame
        last = (self._last_stored(t) - t) // E                    # [M, 1] steps from t to the last stored one
        terminal = self.ep_terminal[t]                            # [M, 1]
        q = torch.minimum(q, last + terminal.long())              # a terminal episode: up to its final obs
        is_final = terminal & (q == last + 1)                     # [M, S] the step after the last action
        frames = self.frames[torch.where(is_final, t, t + q * E)]                  # [M, S, *F] one gather
        final = self.final_frames[self.final_slot[t[:, 0]].clamp(min=0)]           # [M, *F] its episode's final
        is_final = is_final.view(*is_final.shape, *(1,) * len(self.frame_shape))
        frames = torch.where(is_final, final[:, None], frames)
        return frames.reshape(len(t), *self.obs_shape)            # [M, S * F[0], *F[1:]] frame-major

    # ---------------------------------------------------------------------------------------------
    # Sampling (EZ_SPEC §4.2, §4.4)
    # ---------------------------------------------------------------------------------------------

    def sample(self, batch_size, num_unroll_steps, td_steps, beta, generator, window=0):
        """A prioritized batch (EZ_SPEC §4.4) without replacement; generator: a torch.Generator on the device.
        window > 0 draws only from the newest `window` transitions that can be sampled (0: all, as the original)."""
        B, K, W, E, dev = batch_size, num_unroll_steps, num_unroll_steps + td_steps, self.num_envs, self.device
        ok = self._sampleable(W)                                              # [n]
        if window:                                                            # count sampleable ones from the newest
            ok &= ok.flip(0).cumsum(0).flip(0) <= window
        p = self.priorities[:self.size] ** self.alpha * ok                    # p_i^alpha, 0 where not sampleable
        exp1 = -torch.log(torch.rand(self.size, generator=generator, device=dev).clamp(min=1e-30))  # Exp(1) draws
        t = torch.topk(p / exp1, B).indices                                   # [B] the B largest p_i / Exp(1)_i
        probs = p[t] / p.sum()                                                # P(i) = p_i^alpha / sum_k p_k^alpha
        weights = (ok.sum() * probs) ** (-beta)                               # EZ_SPEC §4.4 IS weights
        return self.batch(t, weights / weights.max(), num_unroll_steps, td_steps, generator)

    def batch(self, t, weights, num_unroll_steps, td_steps, generator):
        """The Batch of positions t [B] (EZ_SPEC §4.2); random actions past the end from generator."""
        B, K, W, E, dev = len(t), num_unroll_steps, num_unroll_steps + td_steps, self.num_envs, self.device
        episode_left = self._episode_left(t, W + 1)                           # [B]
        steps = torch.arange(W + 1, device=dev)
        exists = steps < episode_left[:, None]                                # [B, W+1] transition t+m stored
        pos = torch.where(exists, t[:, None] + steps * E, t[:, None])         # [B, W+1] safe gather positions
        random_actions = torch.randint(self.num_actions, (B, K), generator=generator, device=dev)  # EZ_SPEC §4.2
        alive = exists[:, :K + 1]                                             # [B, K+1]
        obs = self.stacks(t[:, None].expand(B, K + 1).reshape(-1), steps[:K + 1].repeat(B))  # [B * (K+1), *O]
        return Batch(indices=t, weights=weights.float(), obs=obs.view(B, K + 1, *self.obs_shape),
                     actions=torch.where(exists[:, :K], self.actions[pos[:, :K]], random_actions),
                     mask=exists[:, :K].float(),
                     rewards=torch.where(exists[:, :W], self.rewards[pos[:, :W]], 0.0),
                     episode_left=episode_left,
                     child_visits=torch.where(alive[..., None], self.child_visits[pos[:, :K + 1]], 0.0),
                     root_values=torch.where(alive, self.root_values[pos[:, :K + 1]], 0.0),
                     ages=self.size - t)

    # ---------------------------------------------------------------------------------------------
    # Checkpointing
    # ---------------------------------------------------------------------------------------------

    def _arrays(self):
        return ["child_visits", *self.FIELDS]

    def nbytes(self):
        """Bytes held by the stored data (the filled part)."""
        per_transition = sum(getattr(self, name)[0].nelement() * getattr(self, name).element_size()
                             for name in self._arrays())
        frame_bytes = self.frames[0].nelement() * self.frames.element_size()
        return self.size * (per_transition + frame_bytes) + self.num_final * frame_bytes

    def state_dict(self):
        """The filled part, as CPU tensors (sync point: checkpoints only)."""
        d = {name: getattr(self, name)[:self.size].cpu().clone() for name in self._arrays()}
        d.update(frames=self.frames[:self.size].cpu().clone(), final_frames=self.final_frames[:self.num_final].cpu(),
                 cur_start=self.cur_start.copy(), size=self.size, num_envs=self.num_envs,
                 frame_shape=self.frame_shape, stack=self.stack, num_actions=self.num_actions)
        return d

    def load_state_dict(self, d):
        for key in ("num_envs", "frame_shape", "stack", "num_actions"):
            if tuple(np.atleast_1d(d[key])) != tuple(np.atleast_1d(getattr(self, key))):
                raise ValueError(f"replay state has {key}={d[key]}, this buffer {getattr(self, key)}")
        n = int(d["size"])
        if n > self.capacity:
            raise ValueError(f"replay state holds {n} transitions, capacity is {self.capacity}")
        for name in self._arrays():
            getattr(self, name)[:n] = torch.as_tensor(d[name]).to(self.device)
        self.frames[:n] = torch.as_tensor(d["frames"]).to(self.device)
        self.num_final = len(d["final_frames"])
        self.final_frames = self._empty_frames(max(self.num_final, 16))
        self.final_frames[:self.num_final] = torch.as_tensor(d["final_frames"]).to(self.device)
        self.cur_start = np.array(d["cur_start"], np.int64)
        self.size = n


if __name__ == "__main__":
    # Memory and sampling time of a full Atari 100k buffer: `python replay.py [cuda]`.
    import resource
    import sys
    import time

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    E, A, K, td, B = 4, 18, 5, 5, 256
    rng, gen = np.random.default_rng(0), torch.Generator(device).manual_seed(0)
    rss_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # peak RSS (KB on Linux)
    pool = rng.integers(0, 256, size=(64, E, 12, 96, 96), dtype=np.uint8)          # random frames to add
    start = rss_mb()
    buf = ReplayBuffer(100_000, E, (3, 96, 96), 4, A, device=device)
    visit = np.full((E, A), 1 / A, np.float32)
    for i in range(100_000 // E):
        obs = pool[i % 64]
        buf.add(obs, rng.integers(A, size=E), rng.normal(size=E), rng.random(E) < 1 / 200, rng.normal(size=E),
                visit, obs)
    print(f"{len(buf)} transitions, {buf.num_final} episodes: nbytes {buf.nbytes() / 2**30:.3f} GiB, "
          f"peak RSS {rss_mb() / 1024:.3f} GiB ({start / 1024:.3f} GiB before the buffer)")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        times = []
        for _ in range(10):
            sync()
            t0 = time.perf_counter()
            batch = buf.sample(B, K, td, 0.4, gen)
            sync()
            t1 = time.perf_counter()
            offsets = torch.arange(K + 1, device=device)[None] + torch.randint(1, td + 1, (B, 1), device=device)
            boot = buf.stacks(batch.indices[:, None].expand(B, K + 1).reshape(-1), offsets.reshape(-1))
            sync()
            t2 = time.perf_counter()
            times.append((t1 - t0, t2 - t1))
        s, b = np.median(times, axis=0) * 1e3
        print(f"sample({B}, {K}, {td}) {s:.1f} ms + bootstrap stacks {b:.1f} ms "
              f"(obs {batch.obs.nbytes / 2**20:.0f} MiB, bootstrap {boot.nbytes / 2**20:.0f} MiB); "
              f"peak RSS {rss_mb() / 1024:.3f} GiB")
