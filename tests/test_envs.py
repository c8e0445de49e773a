"""Tests of envs.py: observation format, seeding, domains, variants, rewards, experts, chunked
stepping without rendering, auto-reset and the worker-process batch."""

import numpy as np
import pytest
import torch

import envs

IMAGE = 64  # small images keep the tests fast


def run_expert(env, max_steps=None):
    """Run the scripted expert without rendering until every sub-env finished once; returns
    (success per sub-env, steps taken per sub-env, rewards [T, B])."""
    max_steps = max_steps or env.max_episode_steps
    done = np.zeros(env.num_envs, bool)
    success = np.zeros(env.num_envs, bool)
    steps = np.zeros(env.num_envs, int)
    rewards = []
    for _ in range(max_steps):
        _, reward, terminated, truncated, info = env.step(env.expert_action(), render=False)
        rewards.append(reward)
        success |= info["success"] & ~done
        steps += ~done
        done |= terminated | truncated
        if done.all():
            break
    return success, steps, np.array(rewards)


def expert_episode(task, seed):
    """One episode of the scripted expert in a single env, without rendering: (states [T + 1, 8],
    actions [T, 7], success)."""
    with envs.make_env(task, image_size=IMAGE, num_envs=1) as env:
        obs, _ = env.reset(seed=seed)
        states, actions, done = [obs["state"][0]], [], False
        while not done:
            action = env.expert_action()
            obs, _, terminated, truncated, info = env.step(action, render=False)
            states.append(obs["state"][0])
            actions.append(action[0])
            done = terminated[0] or truncated[0]
    return np.array(states), np.array(actions), bool(info["success"][0])


# ---- seeds ----------------------------------------------------------------------------------
def test_eval_seeds_are_disjoint_from_training_seeds():
    evaluation = set(envs.eval_seeds(1000))
    assert len(evaluation) == 1000 and min(evaluation) == envs.EVAL_SEED_START
    assert envs.train_seed(0) == 0 and envs.train_seed(envs.EVAL_SEED_START - 1) < envs.EVAL_SEED_START
    assert not evaluation & {envs.train_seed(i) for i in range(0, envs.EVAL_SEED_START, 997)}
    with pytest.raises(ValueError):
        envs.train_seed(envs.EVAL_SEED_START)


def test_auto_reset_moves_on_to_training_seeds_even_after_an_eval_seed():
    with envs.make_env("open_drawer", image_size=IMAGE, auto_reset=True, max_episode_steps=1) as env:
        env.reset(seed=envs.eval_seeds(1)[0])
        hold = np.array([envs.HOLD_ACTION], np.float32)
        seeds = []
        for _ in range(3):
            _, _, _, truncated, info = env.step(hold, render=False)
            assert truncated[0]
            seeds.append(int(info["seed"][0]))
        assert seeds[0] == envs.EVAL_SEED_START  # the finished episode
        assert all(s < envs.EVAL_SEED_START for s in seeds[1:])  # every later one
        assert seeds[1] != seeds[2]


# ---- observations and stepping --------------------------------------------------------------
@pytest.mark.parametrize("task", envs.TASKS)
def test_observation_format(task):
    with envs.make_env(task, image_size=IMAGE, seed=3) as env:
        obs, info = env.reset()
        assert obs["image"].shape == (1, IMAGE, IMAGE, 3) and obs["image"].dtype == np.uint8
        assert obs["image"].std() > 5  # a real picture, not a blank frame
        assert obs["state"].shape == (1, 8) and obs["state"].dtype == np.float32
        assert isinstance(obs["instruction"], list) and len(obs["instruction"]) == 1
        assert isinstance(obs["instruction"][0], str) and obs["instruction"][0]
        quat = obs["state"][0, 3:7]
        assert np.isclose(np.linalg.norm(quat), 1.0, atol=1e-4) and quat[1] >= 0
        assert 0.07 < obs["state"][0, 7] <= 0.081  # gripper starts open (opening in metres)
        assert info["seed"].tolist() == [3]

        obs, reward, terminated, truncated, info = env.step(env.expert_action(), render=False)
        assert obs["image"] is None  # no camera work for steps inside an action chunk
        assert obs["state"].shape == (1, 8)
        assert reward.shape == (1,) and reward.dtype == np.float32
        assert terminated.dtype == bool and truncated.dtype == bool and info["success"].dtype == bool
        frame = env.render_frame()
        assert frame.shape == (1, IMAGE, IMAGE, 3) and frame.dtype == np.uint8
        obs, *_ = env.step(env.expert_action(), render=True)
        assert obs["image"].shape == (1, IMAGE, IMAGE, 3)


def test_state_reports_tcp_in_robot_base_frame():
    with envs.make_env("open_drawer", image_size=IMAGE) as env:
        obs, _ = env.reset(seed=0)
        # home pose: the tcp is about 60 cm in front of the base, 27 cm up, pointing straight down
        np.testing.assert_allclose(obs["state"][0, :3], [0.595, 0.0, 0.274], atol=0.01)
        np.testing.assert_allclose(np.abs(obs["state"][0, 3:7]), [0, 1, 0, 0], atol=1e-3)


def test_action_axes_follow_a_real_franka():
    """+dx moves the tcp along +x, +dyaw turns it positively about z (ManiSkill 3.0.1 alone
    would turn it the other way)."""
    with envs.make_env("open_drawer", image_size=IMAGE) as env:
        obs, _ = env.reset(seed=0)
        action = np.array([[0.5, 0, 0, 0, 0, 0, 1]], np.float32)
        moved, *_ = env.step(action, render=False)
        assert moved["state"][0, 0] - obs["state"][0, 0] > 0.02
        assert abs(moved["state"][0, 1] - obs["state"][0, 1]) < 0.005
        def yaw(q):  # heading of the tcp's x axis, from the quaternion (w, x, y, z)
            w, x, y, z = q
            return np.arctan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z))
        turned, *_ = env.step(np.array([[0, 0, 0, 0, 0, 1, 1]], np.float32), render=False)
        assert yaw(turned["state"][0, 3:7]) - yaw(moved["state"][0, 3:7]) > 0.03


# ---- seeds, domains, variants ---------------------------------------------------------------
@pytest.mark.parametrize("task", ["push_cube", "close_drawer"])
def test_same_seed_same_initial_state_in_every_domain_and_run(task):
    states = []
    for domain in ("sim", "proxy_real", "sim"):
        with envs.make_env(task, domain=domain, image_size=IMAGE) as env:
            obs, _ = env.reset(seed=11)
            states.append((env.privileged_state()["sim_state"], obs["state"], obs["instruction"]))
    for sim_state, robot_state, instruction in states[1:]:
        np.testing.assert_allclose(sim_state, states[0][0], atol=1e-6)
        np.testing.assert_allclose(robot_state, states[0][1], atol=1e-6)
        assert instruction == states[0][2]
    with envs.make_env(task, image_size=IMAGE) as env:  # and another seed gives another state
        env.reset(seed=12)
        assert np.abs(env.privileged_state()["sim_state"] - states[0][0]).max() > 0.01


def test_domains_render_differently():
    images = {}
    for domain in envs.DOMAINS:
        with envs.make_env("pick_and_place", domain=domain, image_size=IMAGE) as env:
            images[domain] = env.reset(seed=4)[0]["image"][0].astype(np.float32)
    assert np.abs(images["sim"] - images["proxy_real"]).mean() > 10


def test_proxy_real_executes_actions_one_step_late_and_noisily():
    push = np.array([[0.6, 0, 0, 0, 0, 0, 1]], np.float32)
    hold = np.array([envs.HOLD_ACTION], np.float32)
    moves = {}
    for domain in envs.DOMAINS:
        with envs.make_env("open_drawer", domain=domain, image_size=IMAGE) as env:
            start = env.reset(seed=0)[0]["state"][0, :3]
            first = env.step(push, render=False)[0]["state"][0, :3]
            second = env.step(hold, render=False)[0]["state"][0, :3]
            moves[domain] = (first - start, second - first)
    assert moves["sim"][0][0] > 0.02 and moves["sim"][1][0] < 0.02  # sim: moves at once
    assert abs(moves["proxy_real"][0][0]) < 0.01 and moves["proxy_real"][1][0] > 0.02  # one step late
    # the noise is seeded by the episode seed: the same run twice gives the same states
    runs = []
    for _ in range(2):
        with envs.make_env("open_drawer", domain="proxy_real", image_size=IMAGE) as env:
            env.reset(seed=5)
            runs.append([env.step(push, render=False)[0]["state"] for _ in range(3)])
    np.testing.assert_array_equal(np.array(runs[0]), np.array(runs[1]))


def test_unseen_objects_use_shapes_and_colours_never_used_in_training():
    train_names = {envs.SHAPES[k]["name"] for k in envs.TRAIN_SHAPES}
    unseen_names = {envs.SHAPES[k]["name"] for k in envs.UNSEEN_SHAPES}
    assert not train_names & unseen_names and len(train_names) >= 4
    assert not set(envs.TRAIN_COLOURS) & set(envs.UNSEEN_COLOURS)
    seen = {}
    for variant in ("in_distribution", "unseen_objects"):
        with envs.make_env("pick_and_place", variant=variant, image_size=IMAGE, num_envs=1) as env:
            seen[variant] = {env.reset(seed=s)[0]["instruction"][0] for s in range(12)}
    named = lambda texts, names: {n for n in names for t in texts if f"the {n} in" in t}
    assert named(seen["in_distribution"], train_names) == train_names  # all four shapes appear
    assert not named(seen["in_distribution"], unseen_names)
    assert named(seen["unseen_objects"], unseen_names) and not named(seen["unseen_objects"], train_names)
    with envs.make_env("push_cube", variant="unseen_objects", image_size=IMAGE) as env:
        texts = {env.reset(seed=s)[0]["instruction"][0] for s in range(8)}
    assert all(any(c in t for c in envs.UNSEEN_COLOURS) for t in texts)
    assert not any(c in t for t in texts for c in envs.TRAIN_COLOURS)


def test_unseen_states_perturb_the_robot_beyond_the_training_range():
    qpos = {}
    for variant in ("in_distribution", "unseen_states"):
        with envs.make_env("push_cube", variant=variant, image_size=IMAGE) as env:
            qpos[variant] = np.stack([(env.reset(seed=s), env.privileged_state()["robot_qpos"][0])[1]
                                      for s in range(5)])
    # training: exactly the fixed home pose; unseen: every episode at least 0.1 rad away in a joint
    np.testing.assert_allclose(qpos["in_distribution"], np.tile(envs.HOME_QPOS, (5, 1)), atol=1e-5)
    distance = np.abs(qpos["unseen_states"][:, :7] - envs.HOME_QPOS[:7]).max(axis=1)
    assert (distance >= 0.1).all()
    assert len({tuple(q.round(4)) for q in qpos["unseen_states"]}) == 5  # differs per seed


# ---- rewards and experts --------------------------------------------------------------------
def test_sparse_and_dense_rewards():
    rewards = {}
    for mode in ("sparse", "dense"):
        with envs.make_env("open_drawer", reward_mode=mode, image_size=IMAGE) as env:
            env.reset(seed=2)
            success, steps, rewards[mode] = run_expert(env)
            assert success[0]
    sparse, dense = rewards["sparse"][:, 0], rewards["dense"][:, 0]
    assert len(sparse) == len(dense)  # same seed, same expert, same episode
    assert (sparse[:-1] == 0).all() and sparse[-1] == 1
    assert dense[-1] == 1 and (dense[:-1] < 1).all() and (dense >= 0).all()
    assert dense[len(dense) // 2:-1].mean() > dense[:3].mean()  # progress pays before success


@pytest.mark.e2e
@pytest.mark.parametrize("task", envs.TASKS)
def test_expert_succeeds_in_both_domains(task):
    for domain in envs.DOMAINS:
        with envs.make_env(task, domain=domain, image_size=IMAGE, num_envs=2, num_workers=0) as env:
            env.reset(seed=envs.eval_seeds(2)[0])
            success, steps, _ = run_expert(env)
            assert success.all(), (task, domain, steps)
            assert (steps < env.max_episode_steps).all()


@pytest.mark.parametrize("task,seed_index", [("push_cube", 2), ("open_drawer", 2), ("pick_and_place", 36)])
def test_expert_keeps_the_home_yaw(task, seed_index):
    # the closed fingertips push, the open fingers straddle the drawer's round bar, and they close
    # on the 4 cm cube, whatever the gripper's yaw; turning it to the push direction (up to 90
    # degrees either way), to the cabinet's or to the cube's yaw gave the demos' hardest-to-imitate
    # actions. (pick_and_place's evaluation seed 36: the cube, turned by -0.76 rad, near 45 degrees)
    import torch
    seed = envs.eval_seeds(seed_index + 1)[seed_index]
    if task == "pick_and_place":
        with envs.make_env(task, image_size=IMAGE) as env:
            assert env.reset(seed=seed)[0]["instruction"] == ["put the cube in the box"]
    states, actions, success = expert_episode(task, seed)
    assert success
    yaws = envs.gripper_yaw(torch.as_tensor(states[:, 3:7])).numpy()
    assert abs(yaws[0] - envs.HOME_YAW) < 1e-3  # HOME_YAW is the yaw of HOME_QPOS
    assert np.abs(actions[:, 5]).max() < 0.2  # no turning commands
    assert np.abs(yaws - envs.HOME_YAW).max() < 0.05  # radians, over the whole episode


def test_open_drawer_expert_never_waits_with_closed_still_fingers():
    # a closed, still gripper that waits and one about to pull look alike to a policy (it sees the
    # gripper's opening, not a timer): the expert pulls as soon as the fingers stop closing
    states, actions, success = expert_episode("open_drawer", envs.eval_seeds(2)[1])
    assert success
    openings = states[:, 7]
    for t, a in enumerate(actions):
        if a[6] < 0 and np.linalg.norm(a[:3]) < 0.05:  # closing and (nearly) still
            assert openings[t + 1] < openings[t] - 1e-4, f"step {t}: waits with closed, still fingers"


def test_pick_expert_lifts_once_the_fingers_hold():
    # as open_drawer's: no wait with closed, still fingers before the lift (a policy sees the
    # gripper's opening, not the expert's timer)
    for seed in envs.eval_seeds(3):
        states, actions, success = expert_episode("pick_and_place", seed)
        assert success
        openings = states[:, 7]
        t = int(np.argmax(actions[:, 6] < 0))  # the first closing command
        while openings[t + 1] < openings[t] - 1e-4:  # the fingers are still closing
            t += 1
        assert actions[t, 2] > 0.1, f"seed {seed}, step {t}: fingers stopped, the expert does not lift"


# ---- auto-reset and worker processes ---------------------------------------------------------
def test_auto_reset_returns_rendered_final_observation():
    with envs.make_env("open_drawer", image_size=IMAGE, auto_reset=True) as env:
        env.reset(seed=7)
        for _ in range(env.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(env.expert_action(), render=False)
            if terminated[0]:
                break
        assert terminated[0] and not truncated[0] and info["final_success"][0] and info["success"][0]
        final = info["final_obs"]
        assert final["image"].shape == (1, IMAGE, IMAGE, 3) and final["image"].std() > 5  # rendered anyway
        assert obs["image"] is None
        assert int(info["seed"][0]) == 7
        # the returned obs already belongs to the next episode (seed 8), the final obs to the old one
        with envs.make_env("open_drawer", image_size=IMAGE) as fresh:
            fresh_obs, _ = fresh.reset(seed=8)
            np.testing.assert_allclose(obs["state"], fresh_obs["state"], atol=1e-6)
            np.testing.assert_allclose(env.privileged_state()["sim_state"], fresh.privileged_state()["sim_state"],
                                       atol=1e-6)
        assert np.abs(final["state"] - obs["state"]).max() > 0.05


def test_wrist_camera_rides_on_the_hand_looking_along_the_fingers():
    from mani_skill.utils.geometry.rotation_conversions import quaternion_apply
    with envs.make_env("pick_and_place", image_size=IMAGE, wrist_camera=True, num_workers=0) as env:
        obs, _ = env.reset(seed=5)
        raw = env._local.envs[0]
        camera = raw.scene.sensors["wrist"].camera
        forward = quaternion_apply(camera.global_pose.q, torch.tensor([1.0, 0.0, 0.0]))  # a camera looks along +x
        fingers = quaternion_apply(raw.agent.tcp_pose.q, torch.tensor([0.0, 0.0, 1.0]))
        assert torch.allclose(forward, fingers, atol=1e-3) and forward[0, 2] < -0.99  # straight down at home
        start_camera, start_tcp = camera.global_pose.p.clone(), raw.agent.tcp_pose.p.clone()
        action = np.array([[1.0, 0, 0, 0, 0, 0, 1.0]], np.float32)  # 10 cm/step forward, gripper open
        for _ in range(3):
            obs, *_ = env.step(action, render=True)
        moved_camera, moved_tcp = camera.global_pose.p - start_camera, raw.agent.tcp_pose.p - start_tcp
        assert moved_tcp[0, 0] > 0.1 and torch.allclose(moved_camera, moved_tcp, atol=2e-3)  # it rides on the hand
        assert obs["wrist_image"].std() > 5 and np.abs(obs["wrist_image"].astype(int) - obs["image"]).mean() > 20


@pytest.mark.parametrize("num_workers", [0, 2])
def test_wrist_image_comes_with_every_rendered_observation(num_workers):
    with envs.make_env("push_cube", num_envs=2, image_size=IMAGE, wrist_camera=True, auto_reset=True,
                       max_episode_steps=2, num_workers=num_workers) as env, \
            envs.make_env("push_cube", num_envs=2, image_size=IMAGE, num_workers=num_workers) as plain:
        obs, _ = env.reset(seed=5)
        assert obs["wrist_image"].shape == (2, IMAGE, IMAGE, 3) and obs["wrist_image"].std() > 5
        assert "wrist_image" not in plain.reset(seed=5)[0]  # only where asked for
        np.testing.assert_array_equal(obs["image"], plain.render_frame())  # the fixed view is unchanged
        hold = np.tile(np.asarray(envs.HOLD_ACTION, np.float32), (2, 1))
        obs, _, _, truncated, info = env.step(hold, render=False)
        assert obs["image"] is None and obs["wrist_image"] is None  # inside a chunk no camera renders
        views = env.render_views()
        assert set(views) == {"image", "wrist_image"}
        np.testing.assert_array_equal(views["image"], env.render_frame())
        obs, _, _, truncated, info = env.step(hold, render=False)  # the time limit: auto-reset
        assert truncated.all()
        np.testing.assert_array_equal(info["final_obs"]["wrist_image"], views["wrist_image"])  # held still
        assert obs["wrist_image"] is None


@pytest.mark.e2e
def test_worker_processes_match_in_process_envs():
    seed, steps = 21, 12
    with envs.make_env("push_cube", num_envs=2, image_size=IMAGE, num_workers=2) as batched:
        obs, info = batched.reset(seed=seed)
        assert info["seed"].tolist() == [seed, seed + 1]
        trajectory = [obs["state"]]
        images = obs["image"]
        for _ in range(steps):
            trajectory.append(batched.step(batched.expert_action(), render=False)[0]["state"])
    for i in range(2):
        with envs.make_env("push_cube", image_size=IMAGE) as single:
            obs, _ = single.reset(seed=seed + i)
            np.testing.assert_array_equal(obs["image"][0], images[i])
            single_trajectory = [obs["state"]]
            for _ in range(steps):
                single_trajectory.append(single.step(single.expert_action(), render=False)[0]["state"])
        np.testing.assert_allclose(np.array(single_trajectory)[:, 0], np.array(trajectory)[:, i], atol=1e-6)


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, valid", [
    (dict(task="stack_cube"), "pick_and_place, push_cube, open_drawer, close_drawer"),
    (dict(task="push_cube", domain="real"), "sim, proxy_real"),
    (dict(task="push_cube", variant="unseen"), "in_distribution, unseen_objects, unseen_states"),
    (dict(task="push_cube", reward_mode="shaped"), "dense, sparse"),
])
def test_bad_names_list_the_valid_ones(kwargs, valid):
    with pytest.raises(ValueError, match=valid):
        envs.make_env(**kwargs)


def test_bad_action_shape_and_seed_count():
    with envs.make_env("open_drawer", image_size=IMAGE) as env:
        with pytest.raises(ValueError, match="seeds for 1 sub-envs"):
            env.reset(seed=[1, 2])
        env.reset(seed=1)
        with pytest.raises(ValueError, match=r"shape \(1, 7\)"):
            env.step(np.zeros(7))


def _after_steps(domain, gap, task="push_cube", steps=3):
    env = envs.make_env(task, domain=domain, gap=gap, image_size=48, num_workers=0)
    env.reset(seed=[7])
    for _ in range(steps):
        obs, *_ = env.step(np.array([[0.4, 0.2, -0.3, 0, 0, 0.2, 1]], np.float32))
    env.close()
    return obs


def test_gap_interpolates_proxy_real_from_the_twin():
    # gap 0 is the sim twin exactly, gap 1 today's proxy_real; halfway the numbers are halfway
    sim, zero = _after_steps("sim", None), _after_steps("proxy_real", 0.0)
    assert np.array_equal(sim["image"], zero["image"]) and np.array_equal(sim["state"], zero["state"])
    full, one = _after_steps("proxy_real", None), _after_steps("proxy_real", 1.0)
    assert np.array_equal(full["image"], one["image"]) and np.array_equal(full["state"], one["state"])
    half = _after_steps("proxy_real", 0.5)
    d_half, d_full = (np.abs(x["image"].astype(float) - sim["image"]).mean() for x in (half, full))
    assert 0 < d_half < d_full
    p, s, r = envs.domain_params("proxy_real", 0.5), envs.DOMAIN_PARAMS["sim"], envs.DOMAIN_PARAMS["proxy_real"]
    assert p["arm_stiffness"] == pytest.approx((s["arm_stiffness"] + r["arm_stiffness"]) / 2)
    assert p["camera_shift"] == pytest.approx(tuple(0.5 * np.asarray(r["camera_shift"])))
    assert p["textured"] is True and p["action_latency"] == 1  # discrete ones switch at 0.5
    q = envs.domain_params("proxy_real", 0.25)
    assert q["textured"] is False and q["action_latency"] == 0 and q["action_noise_std"] == pytest.approx(0.0075)
    with pytest.raises(ValueError, match="gap"):
        envs.make_env("push_cube", domain="sim", gap=0.5)
    with pytest.raises(ValueError, match="gap"):
        envs.make_env("push_cube", domain="proxy_real", gap=1.5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reset_of_some_rows_keeps_the_others_and_dense_reward_of_reset_states(num_workers):
    # what Stage II does at a chunk boundary: only the sub-envs whose episode ended start anew
    with envs.make_env("open_drawer", num_envs=3, image_size=IMAGE, num_workers=num_workers) as env:
        env.reset(seed=[1, 2, 3])
        for _ in range(4):
            moved = env.step(env.expert_action(), render=False)[0]["state"]
        phi_moved = env.dense_reward()
        obs, info = env.reset(seed=[50], rows=[1])
        assert info["seed"].tolist() == [1, 50, 3] and obs["image"].shape == (3, IMAGE, IMAGE, 3)
        np.testing.assert_array_equal(obs["state"][[0, 2]], moved[[0, 2]])  # untouched
        phi = env.dense_reward()
        np.testing.assert_allclose(phi[[0, 2]], phi_moved[[0, 2]], atol=1e-6)
        with envs.make_env("open_drawer", image_size=IMAGE) as fresh:
            start, _ = fresh.reset(seed=[50])
            np.testing.assert_allclose(obs["state"][1], start["state"][0], atol=1e-6)
            np.testing.assert_allclose(phi[1], fresh.dense_reward()[0], atol=1e-6)
            # the potential of a reset state is what a step's dense reward would pay there
            assert 0 <= phi[1] < 0.9
