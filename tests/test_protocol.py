"""One evaluation protocol for every number: Stage I's and Stage II's monitoring and eval_real.py
proxy evaluate the same checkpoint on the same seeds to the same per-episode outcomes, through
envs.evaluate_success, with the same actions at every decision."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import envs  # noqa: E402
import eval_real  # noqa: E402
import stage1_sft_cotrain as stage1  # noqa: E402
import stage2_rl_cotrain as stage2  # noqa: E402

EPISODES, MAX_STEPS = 3, 8


@pytest.mark.e2e
def test_stage1_stage2_and_eval_real_agree_episode_by_episode(tiny_data, tmp_path, monkeypatch):
    calls = []  # per evaluate_success call: its records and every decision's (keys, actions)
    real = envs.evaluate_success

    def spy(env, act_fn, seeds, exec_horizon=None, **kw):
        log = []

        def logged(obs, keys):
            actions = act_fn(obs, keys)
            log.append((list(keys), np.array(actions)))
            return actions
        records, videos = real(env, logged, seeds, exec_horizon, **kw)
        calls.append({"domain": env.domain, "records": records, "actions": log, "exec_horizon": exec_horizon})
        return records, videos

    monkeypatch.setattr(envs, "evaluate_success", spy)
    runs = tmp_path / "runs"
    stage1.main(stage1.Args(task="open_drawer", policy="pi05", alpha=0.5, sim_data=str(tiny_data["sim"]),
                            real_data=str(tiny_data["proxy_real"]), total_steps=2, batch_size=4, eval_every=0,
                            eval_episodes=EPISODES, eval_num_envs=1, eval_max_steps=MAX_STEPS,
                            eval_domains=("proxy_real",), save_video=False, runs_dir=str(runs), run_name="s1"))
    from_stage1 = calls[-1]
    final = runs / "s1" / "checkpoints" / "final"

    eval_real.main(["proxy", "--checkpoint", str(final), "--task", "open_drawer", "--episodes", str(EPISODES),
                    "--num-envs", "1", "--max-episode-steps", str(MAX_STEPS), "--videos", "0",
                    "--out-dir", str(tmp_path / "results"), "--name", "same"])
    from_eval_real = calls[-1]

    n = len(calls)
    stage2.main(stage2.Args(task="open_drawer", init=str(final), beta=0.0, num_envs=1, max_episode_steps=MAX_STEPS,
                            total_env_steps=1, eval_episodes=EPISODES, eval_num_envs=1, eval_domains=("proxy_real",),
                            save_video=False, runs_dir=str(runs), run_name="s2"))
    from_stage2 = calls[n]  # iteration 0: the Stage I checkpoint, before any update

    for other in (from_eval_real, from_stage2):
        assert other["domain"] == "proxy_real" and other["exec_horizon"] == from_stage1["exec_horizon"] == 4
        assert other["records"] == from_stage1["records"]
        assert len(other["actions"]) == len(from_stage1["actions"]) > EPISODES  # several decisions each
        for (keys_a, a), (keys_b, b) in zip(other["actions"], from_stage1["actions"]):
            assert keys_a == keys_b
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert [r["seed"] for r in from_stage1["records"]] == envs.eval_seeds(EPISODES)
    # and a different x0 rule would show: the same evaluation sampled differs
    eval_real.main(["proxy", "--checkpoint", str(final), "--task", "open_drawer", "--episodes", "1",
                    "--num-envs", "1", "--max-episode-steps", str(MAX_STEPS), "--videos", "0",
                    "--no-deterministic", "--out-dir", str(tmp_path / "results"), "--name", "sampled"])
    assert not np.allclose(calls[-1]["actions"][0][1], from_stage1["actions"][0][1])
