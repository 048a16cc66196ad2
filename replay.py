"""Prioritized replay of whole trajectories, stored in lockstep, with batch assembly for K unroll steps.

EfficientZero (arXiv:2111.00210) replay as read from the official code: EZ_SPEC.md §4.2 (batch
layout), §4.4 (storage, PER), §1 (frame stack). Differences from the original, on purpose:
- whole episodes instead of 400-step blocks, so nothing is padded or cut at block boundaries
  (EZ_SPEC App. B.5; the original's "fake terminal" at block ends, §5.2 quirks a/b, is gone);
- each frame is stored once (not 4 stacked copies, not JPEG strings); stacks are rebuilt at sampling time,
  on `device`: with the frames on the GPU (2.6 GB for 100k Atari transitions) the 2 x 1,536 stacks of a batch are
  one gather there each, instead of host copies and about 340 MB of host-to-device transfer per update.

Layout. The E self-play envs append one transition each per `add`, so env e's consecutive transitions
are E indices apart in one flat store: global index i = insertion order (it gives the data's age, §5.1).
Transition i holds: the newest frame of the observation the action was taken in, the action, the raw and
the sign-clipped reward, done, the self-play root value and visit distribution, and its episode's first
index (`ep_start`) and last index (`ep_end`, -1 while the episode runs). The last observation of an
ended episode (after its final action) goes to a small side store (`final_frames`).

Stacks (EZ_SPEC §1): the stack at step t is frames t-3..t of the same episode, frame-major
[f0 RGB, f1 RGB, ...]. Frame positions are clamped to the episode: before its first step the first frame
repeats; after its last step comes the final observation, then the final observation repeats (as the
original's padding with the last frame, EZ_SPEC §4.2).

Shape letters: N capacity, E envs, A actions, B batch, K unroll steps, W = K + td_steps, S stack,
F = frame_shape ([3, 96, 96] for Atari, [D] for vector tasks), O = obs_shape = [S * F[0], *F[1:]].
Capacity: no eviction (the paper's 1e6 capacity never evicts in 100k); `add` refuses data past it.
The big frame array is allocated with torch.empty, so pages that were never written cost no (host) memory.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    indices: np.ndarray         # [B] int64 global indices t
    weights: np.ndarray         # [B] float32 IS weights (N P(i))^-beta / max
    obs: torch.Tensor           # [B, K+1, *O] stacks at t..t+K (final obs at t+episode_left, then clamped),
                                # on the buffer's device
    actions: np.ndarray         # [B, K] int64, uniform random where past the end
    mask: np.ndarray            # [B, K] float32, 1 iff a_{t+k} exists
    rewards: np.ndarray         # [B, W] float32 sign-clipped r_{t..t+W-1}, 0 past the end
    episode_left: np.ndarray    # [B] int64 transitions from t to the episode end (t included), capped at W+1
    child_visits: np.ndarray    # [B, K+1, A] float32 self-play visit distributions, 0 past the end
    root_values: np.ndarray     # [B, K+1] float32 self-play root values, 0 past the end
    ages: np.ndarray            # [B] int64 len(buf) - t


class ReplayBuffer:
    # per-transition arrays: name -> (dtype, shape after the transition axis); frames are separate
    FIELDS = {"actions": (np.int64, ()), "raw_rewards": (np.float32, ()), "rewards": (np.float32, ()),
              "dones": (np.bool_, ()), "root_values": (np.float32, ()), "priorities": (np.float64, ()),
              "ep_start": (np.int64, ()), "ep_end": (np.int64, ()), "final_slot": (np.int64, ())}

    def __init__(self, capacity, num_envs, frame_shape, stack, num_actions, alpha=0.6, frame_dtype=np.uint8,
                 device="cpu"):
        self.capacity, self.num_envs, self.stack, self.num_actions = capacity, num_envs, stack, num_actions
        self.frame_shape, self.alpha, self.device = tuple(frame_shape), alpha, torch.device(device)
        self.frame_dtype = torch.from_numpy(np.empty(0, frame_dtype)).dtype
        self.obs_shape = (stack * self.frame_shape[0], *self.frame_shape[1:])
        self.frames = self._empty_frames(capacity)                                 # [N, *F], paged in on write
        for name, (dtype, shape) in self.FIELDS.items():
            setattr(self, name, np.zeros((capacity, *shape), dtype))
        self.child_visits = np.zeros((capacity, num_actions), np.float32)          # [N, A]
        self.final_frames = self._empty_frames(16)                                 # [episodes, *F], grows
        self.num_final = 0
        self.size = 0
        self.cur_start = np.arange(num_envs, dtype=np.int64)   # [E] first index of each env's running episode

    def __len__(self):
        return self.size

    def _empty_frames(self, n):
        return torch.empty((n, *self.frame_shape), dtype=self.frame_dtype, device=self.device)

    def _newest_frame(self, obs):
        """[E, *O] -> [E, *F] on the buffer's device: the last frame of each stack (frame-major channels)."""
        obs = torch.as_tensor(np.asarray(obs)).to(self.device)
        return obs.reshape(len(obs), self.stack, *self.frame_shape)[:, -1]

    # ---------------------------------------------------------------------------------------------
    # Storing
    # ---------------------------------------------------------------------------------------------

    def add(self, obs, action, reward, done, root_value, visit_dist, final_obs=None):
        """One lockstep step of the E envs. obs [E, *O] is the observation each action was taken in;
        reward [E] raw; done [E] ends the episode after this transition; final_obs [E, *O] valid where done."""
        E, n = self.num_envs, self.size
        if n + E > self.capacity:
            raise ValueError(f"replay buffer full ({self.capacity} transitions); it does not evict")
        done = np.asarray(done, bool)
        if done.any() and final_obs is None:
            raise ValueError("final_obs is needed where done")
        new = slice(n, n + E)
        self.frames[new] = self._newest_frame(obs)
        self.actions[new] = action
        self.raw_rewards[new] = reward
        self.rewards[new] = np.sign(reward)                       # EZ_SPEC §1: clipped reward for all targets
        self.dones[new] = done
        self.root_values[new] = root_value
        self.child_visits[new] = visit_dist
        self.priorities[new] = self.priorities[:n].max() if n else 1.0   # EZ_SPEC §4.1: new data at max priority
        self.ep_start[new] = self.cur_start
        self.ep_end[new] = -1
        self.final_slot[new] = -1
        self.size = n + E
        for e in np.flatnonzero(done):
            self._end_episode(e, final_obs[e])

    def _end_episode(self, e, final_obs):
        """Close env e's running episode at its newest transition; final_obs [*O] follows its last action."""
        E, last = self.num_envs, self.size - self.num_envs + e
        self.dones[last] = True
        self.ep_end[self.cur_start[e]:last + 1:E] = last           # env e's steps are E apart
        if self.num_final == len(self.final_frames):
            self.final_frames = torch.cat([self.final_frames, torch.empty_like(self.final_frames)])
        self.final_frames[self.num_final] = self._newest_frame(np.asarray(final_obs)[None])[0]
        self.final_slot[last] = self.num_final
        self.num_final += 1
        self.cur_start[e] = last + E

    def end_running_episodes(self, final_obs):
        """End every running episode at its newest transition, with final observation final_obs [E, *O]
        (e.g. on resume, when the envs restart). Ended like any episode: no bootstrap past that transition."""
        for e in range(self.num_envs):
            if self.cur_start[e] < self.size:                      # env e has transitions in a running episode
                self._end_episode(e, final_obs[e])

    def update_priorities(self, indices, priorities):
        self.priorities[np.asarray(indices)] = priorities

    # ---------------------------------------------------------------------------------------------
    # Episode geometry
    # ---------------------------------------------------------------------------------------------

    def _sampleable(self, window):
        """Global indices t whose next `window` transitions are stored, or whose episode has ended."""
        head = max(self.size - window * self.num_envs, 0)         # t < head  <=>  t + window * E < size
        tail = np.arange(head, self.size)
        return np.concatenate([np.arange(head), tail[self.ep_end[tail] >= 0]])

    def num_sampleable(self, num_unroll_steps=5, td_steps=5):
        return len(self._sampleable(num_unroll_steps + td_steps))

    def _episode_left(self, t, cap):
        """[M] transitions from t to its episode's end (t included), capped at `cap` (also while running)."""
        end = self.ep_end[t]
        left = (end - t) // self.num_envs + 1
        return np.where(end >= 0, np.minimum(left, cap), cap)

    def stacks(self, indices, offsets):
        """[M] indices, [M] offsets -> [M, *O] the obs stack at step t + offset of t's episode (on the device)."""
        t = np.asarray(indices, np.int64)[:, None]                # [M, 1]
        E = self.num_envs
        q = np.asarray(offsets, np.int64)[:, None] - (self.stack - 1) + np.arange(self.stack)  # [M, S] steps
        q = np.maximum(q, (self.ep_start[t] - t) // E)            # before the start: the first frame
        end = self.ep_end[t]                                      # [M, 1], -1 while running
        ended = end >= 0
        last_stored = (self.size - 1 - t) // E                    # running episode: clamp to the newest step
        q = np.where(ended, np.minimum(q, (end - t) // E + 1), np.minimum(q, last_stored))
        is_final = ended & (q == (end - t) // E + 1)              # [M, S] the step after the last action
        pos = np.where(is_final, t, t + q * E).reshape(-1)        # [M * S] positions in the frame store
        frames = self.frames.index_select(0, torch.from_numpy(pos).to(self.device))   # [M * S, *F] one gather
        final = np.flatnonzero(is_final)                          # known on the host: no device sync
        if len(final):
            slot = np.broadcast_to(self.final_slot[np.maximum(end, 0)], is_final.shape).reshape(-1)[final]
            frames[torch.from_numpy(final).to(self.device)] = self.final_frames[torch.from_numpy(slot).to(self.device)]
        return frames.reshape(len(t), *self.obs_shape)             # [M, S * F[0], *F[1:]] frame-major

    # ---------------------------------------------------------------------------------------------
    # Sampling (EZ_SPEC §4.2, §4.4)
    # ---------------------------------------------------------------------------------------------

    def sample(self, batch_size, num_unroll_steps, td_steps, beta, rng):
        B, K, W, E = batch_size, num_unroll_steps, num_unroll_steps + td_steps, self.num_envs
        candidates = self._sampleable(W)                                       # [N']
        probs = self.priorities[candidates] ** self.alpha                      # P(i) ~ p_i^alpha
        probs /= probs.sum()
        # Without replacement, as the original (np.random.choice(..., replace=False, p=...)).
        pick = rng.choice(len(candidates), size=B, replace=False, p=probs)     # [B]
        t = candidates[pick]                                                   # [B]
        weights = (len(candidates) * probs[pick]) ** (-beta)                   # EZ_SPEC §4.4 IS weights
        weights /= weights.max()

        episode_left = self._episode_left(t, W + 1)                            # [B]
        steps = np.arange(W + 1)
        exists = steps < episode_left[:, None]                                 # [B, W+1] transition t+m stored
        pos = np.where(exists, t[:, None] + steps * E, t[:, None])             # [B, W+1] safe gather positions
        random_actions = rng.integers(self.num_actions, size=(B, K))           # EZ_SPEC §4.2: random past the end
        actions = np.where(exists[:, :K], self.actions[pos[:, :K]], random_actions)
        rewards = np.where(exists[:, :W], self.rewards[pos[:, :W]], 0.0)
        alive = exists[:, :K + 1]                                              # [B, K+1]
        child_visits = np.where(alive[..., None], self.child_visits[pos[:, :K + 1]], 0.0)
        root_values = np.where(alive, self.root_values[pos[:, :K + 1]], 0.0)
        obs = self.stacks(np.repeat(t, K + 1), np.tile(np.arange(K + 1), B))   # [B * (K+1), *O]
        return Batch(indices=t, weights=weights.astype(np.float32),
                     obs=obs.reshape(B, K + 1, *self.obs_shape),
                     actions=actions.astype(np.int64), mask=exists[:, :K].astype(np.float32),
                     rewards=rewards.astype(np.float32), episode_left=episode_left.astype(np.int64),
                     child_visits=child_visits.astype(np.float32), root_values=root_values.astype(np.float32),
                     ages=(self.size - t).astype(np.int64))

    # ---------------------------------------------------------------------------------------------
    # Checkpointing
    # ---------------------------------------------------------------------------------------------

    def _arrays(self):
        return ["child_visits", *self.FIELDS]

    def nbytes(self):
        """Bytes held by the stored data (the filled part; untouched preallocated pages cost nothing)."""
        per_transition = sum(getattr(self, name)[0].nbytes for name in self._arrays())
        frame_bytes = self.frames[0].nelement() * self.frames.element_size()
        return self.size * (per_transition + frame_bytes) + self.num_final * frame_bytes

    def state_dict(self):
        d = {name: getattr(self, name)[:self.size].copy() for name in self._arrays()}
        d.update(frames=self.frames[:self.size].cpu().numpy().copy(),
                 final_frames=self.final_frames[:self.num_final].cpu().numpy().copy(), cur_start=self.cur_start.copy(),
                 size=self.size, num_envs=self.num_envs, frame_shape=self.frame_shape, stack=self.stack,
                 num_actions=self.num_actions)
        return d

    def load_state_dict(self, d):
        for key in ("num_envs", "frame_shape", "stack", "num_actions"):
            if tuple(np.atleast_1d(d[key])) != tuple(np.atleast_1d(getattr(self, key))):
                raise ValueError(f"replay state has {key}={d[key]}, this buffer {getattr(self, key)}")
        n = int(d["size"])
        if n > self.capacity:
            raise ValueError(f"replay state holds {n} transitions, capacity is {self.capacity}")
        for name in self._arrays():
            getattr(self, name)[:n] = d[name]
        self.frames[:n] = torch.as_tensor(d["frames"]).to(self.device)
        self.num_final = len(d["final_frames"])
        self.final_frames = self._empty_frames(max(self.num_final, 16))
        self.final_frames[:self.num_final] = torch.as_tensor(d["final_frames"]).to(self.device)
        self.cur_start = np.array(d["cur_start"], np.int64)
        self.size = n


if __name__ == "__main__":
    # Memory and sampling time of a full Atari 100k buffer: `python replay.py` (numbers in the report of this file).
    import resource
    import time

    E, A, K, td, B = 4, 18, 5, 5, 256
    rng = np.random.default_rng(0)
    rss_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # peak RSS (KB on Linux)
    pool = rng.integers(0, 256, size=(64, E, 12, 96, 96), dtype=np.uint8)          # random frames to add
    start = rss_mb()
    buf = ReplayBuffer(100_000, E, (3, 96, 96), 4, A)
    visit = np.full((E, A), 1 / A, np.float32)
    for i in range(100_000 // E):
        obs = pool[i % 64]
        buf.add(obs, rng.integers(A, size=E), rng.normal(size=E), rng.random(E) < 1 / 200, rng.normal(size=E),
                visit, obs)
    print(f"{len(buf)} transitions, {buf.num_final} episodes: nbytes {buf.nbytes() / 2**30:.3f} GiB, "
          f"peak RSS {rss_mb() / 1024:.3f} GiB ({start / 1024:.3f} GiB before the buffer)")
    for _ in range(3):
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            batch = buf.sample(B, K, td, 0.4, rng)
            t1 = time.perf_counter()
            offsets = np.arange(K + 1)[None] + rng.integers(1, td + 1, size=(B, 1))     # bootstrap at t+j+l
            boot = buf.stacks(np.repeat(batch.indices, K + 1), offsets.reshape(-1))     # [B*(K+1), 12, 96, 96]
            t2 = time.perf_counter()
            times.append((t1 - t0, t2 - t1))
        s, b = np.median(times, axis=0) * 1e3
        print(f"sample({B}, {K}, {td}) {s:.1f} ms + bootstrap stacks {b:.1f} ms "
              f"(obs {batch.obs.nbytes / 2**20:.0f} MiB, bootstrap {boot.nbytes / 2**20:.0f} MiB); "
              f"peak RSS {rss_mb() / 1024:.3f} GiB")
