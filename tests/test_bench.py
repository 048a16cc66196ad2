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
    # cartpole preset: 8 envs, 20,000 updates for 10,000 transitions -> rounds of 16 updates and 1 self-play step
    assert rec["bench"] == "train" and rec["game"] == "CartPole-v1" and rec["device"] == "cpu"
    assert (rec["updates_per_round"], rec["selfplay_steps_per_round"]) == (16, 1)
    assert rec["timed_updates"] == 16 and rec["total_updates"] == 20_000          # 4 rounded up to a round
    assert rec["update_ms_median"] > 0 and rec["selfplay_step_ms_median"] > 0
    assert abs(2 * rec["env_steps_per_s"] - rec["updates_per_s"]) < 1e-2 * rec["updates_per_s"]  # 8 steps / 16 updates
    # 1,250 rounds of 16 updates + 1 self-play step: no less than the updates' median share
    assert rec["projected_hours"] * 3600 >= 0.5 * 20_000 * rec["update_ms_median"] / 1e3
    assert "round 2/2" in proc.stderr                                            # 1 warm-up round + 1 timed


def test_bench_device_tiny_runs_every_stage_and_writes_its_report(tmp_path):
    """`bench.py device` is the one command of a GPU session: run here with --tiny (small sizes, CartPole)
    so that it cannot rot between sessions. Every stage must pass and land in the JSON and the table."""
    out = tmp_path / "device.json"
    proc = subprocess.run([sys.executable, "bench.py", "device", "--tiny", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["cuda tests", "search", "tree share", "train, AMP on", "train, AMP off", "train.py run",
                            "eval.py"]
    assert all(s["status"] == "ok" for s in stages.values()), {k: (s["status"], s.get("output_tail", [])[-5:])
                                                               for k, s in stages.items()}
    search = stages["search"]["results"]
    assert {(r["setting"], r["B"], r["N"], r["A"]) for r in search} == {("atari-net", 2, 4, 9)}
    assert all(r["ms_median"] > 0 and r["sims_per_s"] > 0 for r in search)
    assert 0 < stages["tree share"]["results"][0]["tree_ops_share"] < 1
    assert [r["bench"] for s in ("train, AMP on", "train, AMP off") for r in stages[s]["results"]] == ["train"] * 2
    assert any(line.startswith("env ") for line in stages["train.py run"]["output_tail"])  # progress lines
    assert any(": mean " in line for line in stages["eval.py"]["output_tail"])              # eval of the checkpoint
    table = out.with_suffix(".md").read_text()
    assert "| search | ok |" in table and "| atari-net | torch |" in table and "| CartPole-v1 |" in table
