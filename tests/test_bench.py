"""bench.py train runs the real loop and reports consistent numbers (its speed is never asserted)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_reports_the_loop_and_a_projection():
    proc = subprocess.run([sys.executable, "bench.py", "train", "--preset", "cartpole", "--updates", "4",
                           "--warmup", "2", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    # cartpole preset: 8 envs, 2,000 updates for 2,000 transitions -> rounds of 8 updates and 1 self-play step
    assert rec["bench"] == "train" and rec["game"] == "CartPole-v1" and rec["device"] == "cpu"
    assert (rec["updates_per_round"], rec["selfplay_steps_per_round"]) == (8, 1)
    assert rec["timed_updates"] == 8 and rec["total_updates"] == 2000             # 4 rounded up to a round
    assert rec["update_ms_median"] > 0 and rec["selfplay_step_ms_median"] > 0
    assert abs(rec["env_steps_per_s"] - rec["updates_per_s"]) < 1e-2 * rec["env_steps_per_s"]  # 8 steps / 8 updates
    # 250 rounds of 8 updates + 1 self-play step: no less than the updates' median share
    assert rec["projected_hours"] * 3600 >= 0.5 * 2000 * rec["update_ms_median"] / 1e3
    assert "round 2/2" in proc.stderr                                            # 1 warm-up round + 1 timed
