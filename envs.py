"""The four digital-twin tasks of RL-Co (ManiSkill3), their domains and variants, scripted
experts and `make_env`, the entry point every script uses.

Read top to bottom:
  1. constants: tasks, domains, variants, seeds, control rate, episode lengths
  2. the two domains: `sim` (the low-fidelity twin RL trains in) and `proxy_real` (a second,
     deliberately different rendering and dynamics that stands in for the real robot)
  3. small geometry helpers used by the experts (top-down gripper poses, pose-tracking actions)
  4. `TwinTaskEnv`, the ManiSkill env all tasks share: table, Panda, camera, lights, domain
     action effects (noise, latency), robot state, camera rendering on demand
  5. the tasks: PickAndPlace, PushCube, OpenDrawer, CloseDrawer, each with its layout sampler,
     success test, dense reward and scripted expert
  6. `LocalEnvs` (the sub-envs living in one process: time limit, seeds, auto-reset), the worker
     process loop, `TwinVecEnv` and `make_env`

Conventions (docs/interfaces.md): actions are 7-D normalized pd_ee_delta_pose actions in [-1, 1]
(dx, dy, dz, droll, dpitch, dyaw, gripper; 1 = 10 cm / 0.1 rad per step; gripper +1 open,
-1 closed). Observations are {"image": uint8 [B, H, W, 3] or None, "state": float32 [B, 8],
"instruction": list[str]}; state = tcp position in the robot base frame, tcp quaternion (wxyz,
sign fixed so that x >= 0, which is continuous for a downward-pointing gripper), gripper opening
in metres. The initial state of an episode is a function of its seed only, identical in every
domain and variant except for what the variant itself changes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import traceback

import numpy as np
import sapien
import torch

from mani_skill.agents.controllers.pd_ee_pose import PDEEPoseController, PDEEPoseControllerConfig
from mani_skill.agents.robots.panda.panda import Panda
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.sensors.camera import CameraConfig
from mani_skill.utils import gym_utils, sapien_utils
from mani_skill.utils.geometry.rotation_conversions import (
    quaternion_invert,
    quaternion_multiply,
    quaternion_to_axis_angle,
    quaternion_to_matrix,
)
from mani_skill.utils.registration import register_env
from mani_skill.utils.structs.pose import Pose
from mani_skill.utils.structs.types import SimConfig

# --------------------------------------------------------------------------------------------
# 1. Constants
# --------------------------------------------------------------------------------------------
TASKS = ("pick_and_place", "push_cube", "open_drawer", "close_drawer")
DOMAINS = ("sim", "proxy_real")
VARIANTS = ("in_distribution", "unseen_objects", "unseen_states")

EVAL_SEED_START = 1_000_000  # evaluation seeds: EVAL_SEED_START + i; training never uses them


def eval_seeds(n: int) -> list[int]:
    """The first n evaluation seeds (the same for every method, so all see identical states)."""
    return [EVAL_SEED_START + i for i in range(n)]


def train_seed(i: int) -> int:
    """The i-th training seed. Training seeds are 0 .. EVAL_SEED_START - 1."""
    if not 0 <= i < EVAL_SEED_START:
        raise ValueError(f"training seed index must be in [0, {EVAL_SEED_START}), got {i}")
    return i


ENV_IDS = {
    "pick_and_place": "RLCo-PickAndPlace-v1",
    "push_cube": "RLCo-PushCube-v1",
    "open_drawer": "RLCo-OpenDrawer-v1",
    "close_drawer": "RLCo-CloseDrawer-v1",
}
CONTROL_FREQ = 10  # Hz; one policy step = 10 physics steps at 100 Hz
SIM_FREQ = 100
# 1.7-2x the longest scripted-expert episode (docs/expert_success.md): slack for slower policies.
MAX_EPISODE_STEPS = {"pick_and_place": 100, "push_cube": 80, "open_drawer": 50, "close_drawer": 50}

ROBOT_BASE_XYZ = (-0.615, 0.0, 0.0)  # robot base on the table top (z = 0)
# The optional wrist camera: where ManiSkill's panda_wristcam (panda_v3.urdf) mounts its RealSense,
# the realsense_joint then camera_link_joint from panda_hand, looking along the fingers; its fov.
WRIST_CAMERA = {"link": "panda_hand", "fov": np.pi / 2,
                "pose": sapien.Pose(p=[0.035, 0.0, 0.036], q=[0.0, np.sqrt(0.5), 0.0, np.sqrt(0.5)])  # rpy (0, -pi/2, pi)
                        * sapien.Pose(p=[0.0, 0.02, 0.0115])}
# The fixed initial robot pose: gripper open, pointing straight down, 27 cm above the table (high
# enough not to hide the objects from the camera).
HOME_QPOS = np.array([0.0, np.pi / 8 - 0.2, 0.0, -np.pi * 5 / 8, 0.0, np.pi * 3 / 4 - 0.2, np.pi / 4, 0.04, 0.04])
POS_SCALE = 0.1  # metres per unit of normalized position action (pd_ee_delta_pose bounds)
ROT_SCALE = 0.1  # radians per unit of normalized rotation action
HOLD_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # keep still, gripper open
HOME_YAW = 0.0  # gripper_yaw of the tcp at HOME_QPOS

# --------------------------------------------------------------------------------------------
# 2. Domains
# --------------------------------------------------------------------------------------------
# Everything that differs between the twin and the stand-in for the real robot. Colours of the
# task objects live with each task (they differ per domain too).
DOMAIN_PARAMS = {
    "sim": dict(
        table_rgb=(0.70, 0.70, 0.70), floor_rgb=(0.25, 0.25, 0.25), textured=False,
        ambient=(0.3, 0.3, 0.3),
        lights=[((1, 1, -1), (1.0, 1.0, 1.0)), ((0, 0, -1), (1.0, 1.0, 1.0))],  # (direction, rgb)
        shadow=False,
        camera_shift=(0.0, 0.0, 0.0), camera_target_shift=(0.0, 0.0, 0.0), camera_roll=0.0,
        camera_fov=0.8,
        object_friction=0.8, object_density=800.0,
        arm_stiffness=1e3, arm_damping=1e2,
        drawer_friction=0.5, drawer_damping=5.0, drawer_density=300.0,
        action_noise_std=0.0,  # in normalized action units, dims 0-5
        action_latency=0,  # control steps between command and execution
    ),
    "proxy_real": dict(
        table_rgb=(0.55, 0.40, 0.26), floor_rgb=(0.35, 0.33, 0.30), textured=True,
        ambient=(0.22, 0.21, 0.20),
        lights=[((-0.4, 0.8, -1.0), (1.25, 1.10, 0.90)), ((0.3, -0.2, -1.0), (0.45, 0.45, 0.55))],
        shadow=True,
        # a fixed mounting error of the camera: 3-4 cm, about 3 degrees pan/tilt and 2 roll
        camera_shift=(0.03, -0.035, 0.025), camera_target_shift=(0.0, 0.03, -0.02),
        camera_roll=np.deg2rad(2.0), camera_fov=0.83,
        object_friction=0.5, object_density=1200.0,
        arm_stiffness=8.5e2, arm_damping=1.15e2,
        drawer_friction=1.0, drawer_damping=8.0, drawer_density=450.0,
        action_noise_std=0.03,
        action_latency=1,
    ),
}


class PDEEDeltaPoseController(PDEEPoseController):
    """pd_ee_delta_pose with the rotation sign of a real Franka. ManiSkill 3.0.1 scales the
    rotation part by its (negative) lower bound, so a positive rotation action turns the wrong
    way (ManiSkill issue #1469); here +droll/+dpitch/+dyaw rotate positively about the base axes."""

    def _clip_and_scale_action(self, action):
        pos = gym_utils.clip_and_scale_action(action[:, :3], self.action_space_low[:3], self.action_space_high[:3])
        rot = action[:, 3:6]
        rot = rot / torch.linalg.norm(rot, dim=1, keepdim=True).clamp(min=1.0)  # clipped by norm
        return torch.hstack([pos, rot * self.config.rot_upper])


@dataclasses.dataclass
class PDEEDeltaPoseControllerConfig(PDEEPoseControllerConfig):
    controller_cls = PDEEDeltaPoseController


def _lerp(a, b, gap: float):
    """a at gap 0, b at gap 1: numbers interpolated (integers rounded), flags switched at 0.5,
    sequences element by element."""
    if gap in (0.0, 1.0):  # the ends are the two domains exactly
        return b if gap == 1.0 else a
    if isinstance(a, bool):
        return b if gap >= 0.5 else a
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return int(np.floor(a + (b - a) * gap + 0.5))  # half up: a flag-like integer switches at 0.5 too
    if isinstance(a, (tuple, list)):
        return type(a)(_lerp(x, y, gap) for x, y in zip(a, b))
    return float(a + (b - a) * gap)


def domain_params(domain: str, gap: float | None = None) -> dict:
    """DOMAIN_PARAMS of `domain`; for proxy_real at a `gap` in [0, 1] every parameter is moved that
    far from the twin's value towards proxy_real's (0 = the sim twin, 1 = proxy_real, the default)."""
    if domain == "sim" or gap is None:
        return dict(DOMAIN_PARAMS[domain])
    return {k: _lerp(DOMAIN_PARAMS["sim"][k], v, gap) for k, v in DOMAIN_PARAMS["proxy_real"].items()}


class PandaSim(Panda):
    """The Panda as the twin models it (ManiSkill's default joint gains)."""

    arm_stiffness = DOMAIN_PARAMS["sim"]["arm_stiffness"]
    arm_damping = DOMAIN_PARAMS["sim"]["arm_damping"]

    @property
    def _controller_configs(self):
        configs = super()._controller_configs
        arm = configs["pd_ee_delta_pose"]["arm"]
        fields = {f.name: getattr(arm, f.name) for f in dataclasses.fields(arm)}
        configs["pd_ee_delta_pose"]["arm"] = PDEEDeltaPoseControllerConfig(**fields)
        return configs


class PandaProxyReal(PandaSim):
    """The Panda of the proxy-real domain: softer, more damped joint controllers."""

    arm_stiffness = DOMAIN_PARAMS["proxy_real"]["arm_stiffness"]
    arm_damping = DOMAIN_PARAMS["proxy_real"]["arm_damping"]


ROBOT_CLASS = {"sim": PandaSim, "proxy_real": PandaProxyReal}


def robot_class(params: dict):
    """The Panda with the joint gains of `params` (a class per pair of gains: ManiSkill builds the
    controller from class attributes)."""
    for cls in ROBOT_CLASS.values():
        if (cls.arm_stiffness, cls.arm_damping) == (params["arm_stiffness"], params["arm_damping"]):
            return cls
    key = f"PandaGains_{params['arm_stiffness']:g}_{params['arm_damping']:g}"
    if key not in _GAIN_CLASSES:
        _GAIN_CLASSES[key] = type(key, (PandaSim,), {"arm_stiffness": params["arm_stiffness"],
                                                     "arm_damping": params["arm_damping"]})
    return _GAIN_CLASSES[key]


_GAIN_CLASSES = {}


def _texture(rgb, seed: int, grain: bool, size: int = 64) -> sapien.render.RenderTexture2D:
    """A fixed procedural texture of colour `rgb` (wood grain or mottled)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((8, 8))
    smooth = np.kron(coarse, np.ones((size // 8, size // 8)))
    if grain:  # stripes along one axis, like wood
        stripes = 0.5 + 0.5 * np.sin(np.linspace(0, 18 * np.pi, size))[None, :] + 0.3 * smooth
        level = 0.72 + 0.28 * stripes / stripes.max()
    else:
        level = 0.80 + 0.12 * smooth + 0.08 * rng.random((size, size))
    rgba = np.ones((size, size, 4), np.uint8) * 255
    rgba[..., :3] = (np.clip(level[..., None] * np.asarray(rgb), 0, 1) * 255).astype(np.uint8)
    return sapien.render.RenderTexture2D(rgba, "R8G8B8A8Unorm")


def _material(rgb, textured: bool, texture_seed: int = 0, grain: bool = False):
    """Render material: a flat colour in sim; a texture of that colour in proxy_real."""
    material = sapien.render.RenderMaterial(base_color=(*rgb, 1.0))
    if textured:
        material.base_color = (1.0, 1.0, 1.0, 1.0)  # the texture replaces the colour; keep it untinted
        material.base_color_texture = _texture(rgb, texture_seed, grain)
        material.roughness = 0.5
    return material


# --------------------------------------------------------------------------------------------
# 3. Geometry helpers for the experts (batched torch)
# --------------------------------------------------------------------------------------------
def top_down_quat(yaw: torch.Tensor) -> torch.Tensor:
    """Quaternion (wxyz) of a gripper pointing straight down, rotated by `yaw` about world z.
    At yaw 0 the fingers close along the world y axis; at yaw the closing axis is at yaw - 90 deg."""
    zeros = torch.zeros_like(yaw)
    return torch.stack([zeros, torch.cos(yaw / 2), torch.sin(yaw / 2), zeros], dim=-1)


def yaw_quat(yaw: torch.Tensor) -> torch.Tensor:
    """Quaternion (wxyz) of a rotation by `yaw` about the world z axis."""
    zeros = torch.zeros_like(yaw)
    return torch.stack([torch.cos(yaw / 2), zeros, zeros, torch.sin(yaw / 2)], dim=-1)


def gripper_yaw(q: torch.Tensor) -> torch.Tensor:
    """Yaw of the gripper's x axis projected on the table plane."""
    x_axis = quaternion_to_matrix(q)[..., :, 0]
    return torch.atan2(x_axis[..., 1], x_axis[..., 0])


def nearest_equivalent_yaw(target: torch.Tensor, current: torch.Tensor, period: float) -> torch.Tensor:
    """The yaw equal to `target` modulo `period` that is closest to `current` (the gripper looks
    the same after a 180-degree turn, boxes after 90 degrees)."""
    return target + period * torch.round((current - target) / period)


def pose_action(tcp_pose: Pose, target_p: torch.Tensor, target_q: torch.Tensor, gripper: torch.Tensor,
                max_step: float = 0.06, gain: float = 0.8) -> torch.Tensor:
    """Normalized pd_ee_delta_pose action moving the tcp toward a target pose: `gain` times the
    position error, at most `max_step` metres, and the rotation error (axis-angle, base frame)
    clipped to 0.1 rad. A gain below 1 keeps the approach smooth under one step of latency."""
    delta = gain * (target_p - tcp_pose.p)
    norm = torch.linalg.norm(delta, dim=-1, keepdim=True).clamp(min=1e-9)
    delta = delta * torch.clamp(max_step / norm, max=1.0)
    q_err = quaternion_multiply(target_q, quaternion_invert(tcp_pose.q))
    q_err = torch.where(q_err[..., :1] < 0, -q_err, q_err)  # shortest way round
    rot = quaternion_to_axis_angle(q_err) / ROT_SCALE
    rot_norm = torch.linalg.norm(rot, dim=-1, keepdim=True).clamp(min=1.0)
    return torch.cat([delta / POS_SCALE, rot / rot_norm, gripper[..., None]], dim=-1).clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# 4. The scene every task shares
# --------------------------------------------------------------------------------------------
# SAPIEN frees its renderer, and the shaders it compiled (seconds of work on a CPU), when the last
# render system goes away. One idle render system per device keeps it for envs built later.
_IDLE_RENDER_SYSTEMS = {}


class TwinTaskEnv(BaseEnv):
    """Table, Panda with pd_ee_delta_pose control, one fixed third-person camera, lights, and
    the domain's action effects. Subclasses add the task objects (`_load_task`), sample an
    episode layout from a seed (`sample_layout`), place it (`_place_layout`), and define
    `evaluate`, `compute_dense_reward` and `expert_action`.

    The ManiSkill observation is switched off (obs_mode="none"); `robot_state()` and
    `render_views()` produce the observation parts on demand, so that steps whose image is
    not needed (inside an action chunk) cost physics only. wrist_camera=True adds a second camera
    on the Panda's hand (see WRIST_CAMERA), the same in every domain.
    """

    SUPPORTED_REWARD_MODES = ("normalized_dense", "dense", "sparse", "none")
    task = ""
    camera_eye = (0.0, 0.0, 0.0)  # the task's fixed third-person camera (sim domain): position ...
    camera_target = (0.0, 0.0, 0.0)  # ... and the point it looks at

    def __init__(self, *args, domain: str = "sim", variant: str = "in_distribution", image_size: int = 128,
                 gap: float | None = None, wrist_camera: bool = False, **kwargs):
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        self.domain, self.variant, self.image_size = domain, variant, image_size
        self.wrist_camera = bool(wrist_camera)
        # how far proxy_real is from the twin: every domain parameter and object colour (gap 1 = proxy_real)
        self.gap = 0.0 if domain == "sim" else (1.0 if gap is None else float(gap))
        self.params = domain_params(domain, self.gap if domain != "sim" else None)
        kwargs.setdefault("obs_mode", "none")
        kwargs.setdefault("control_mode", "pd_ee_delta_pose")
        kwargs.setdefault("enhanced_determinism", True)  # reset() without a seed draws a fresh episode seed
        super().__init__(*args, robot_uids=robot_class(self.params), **kwargs)
        if self._render_device is not None and str(self._render_device) not in _IDLE_RENDER_SYSTEMS:
            _IDLE_RENDER_SYSTEMS[str(self._render_device)] = sapien.render.RenderSystem(self._render_device)

    @property
    def _default_sim_config(self):
        return SimConfig(sim_freq=SIM_FREQ, control_freq=CONTROL_FREQ)

    @property
    def _default_sensor_configs(self):
        p = self.params
        eye = np.array(self.camera_eye) + p["camera_shift"]
        target = np.array(self.camera_target) + p["camera_target_shift"]
        pose = sapien_utils.look_at(eye=eye, target=target).sp
        roll = p["camera_roll"]  # rotation about the camera's viewing axis (its local x)
        pose = pose * sapien.Pose(q=[np.cos(roll / 2), np.sin(roll / 2), 0, 0])
        cameras = [CameraConfig("front", pose, self.image_size, self.image_size, p["camera_fov"], 0.01, 10)]
        if self.wrist_camera:
            cameras.append(CameraConfig("wrist", WRIST_CAMERA["pose"], self.image_size, self.image_size,
                                        WRIST_CAMERA["fov"], 0.01, 10,
                                        mount=self.agent.robot.links_map[WRIST_CAMERA["link"]]))
        return cameras

    def _load_agent(self, options: dict):
        super()._load_agent(options, sapien.Pose(p=list(ROBOT_BASE_XYZ)))

    def _load_lighting(self, options: dict):
        p = self.params
        self.scene.set_ambient_light(list(p["ambient"]))
        for i, (direction, rgb) in enumerate(p["lights"]):
            self.scene.add_directional_light(list(direction), list(rgb), shadow=p["shadow"] and i == 0,
                                             shadow_scale=2.0, shadow_map_size=1024)

    def _load_scene(self, options: dict):
        # table top at z = 0 (a box, so that its colour and texture can change with the domain)
        table = self.scene.create_actor_builder()
        half = [0.75, 0.8, 0.02]
        table.add_box_collision(half_size=half)
        table.add_box_visual(half_size=half, material=_material(self.params["table_rgb"], self.params["textured"], 1, grain=True))
        table.initial_pose = sapien.Pose(p=[-0.3, 0, -half[2]])
        self.table = table.build_static(name="table")
        floor = self.scene.create_actor_builder()
        floor.add_box_collision(half_size=[2.0, 2.0, 0.01])
        floor.add_box_visual(half_size=[2.0, 2.0, 0.01], material=_material(self.params["floor_rgb"], self.params["textured"], 2))
        floor.initial_pose = sapien.Pose(p=[0, 0, -0.76])
        self.floor = floor.build_static(name="floor")
        self.object_material = sapien.physx.PhysxMaterial(
            static_friction=self.params["object_friction"], dynamic_friction=self.params["object_friction"],
            restitution=0.0)
        self._load_task()
        n = self.num_envs
        # domain state: the action waiting one step (latency) and the action-noise generators
        self._pending_action = torch.tensor(HOLD_ACTION, device=self.device).repeat(n, 1)
        self._noise_rngs = [np.random.default_rng(0) for _ in range(n)]
        self.instructions = [""] * n
        self.expert_phase = torch.zeros(n, dtype=torch.long, device=self.device)
        self.expert_timer = torch.zeros(n, dtype=torch.long, device=self.device)

    # ---- episodes ----------------------------------------------------------------------------
    def sample_layout(self, seed: int) -> dict:
        """Everything random about an episode's initial state, drawn from `seed` alone. The draws
        are the same in every domain and variant; the variant only changes how they are used."""
        raise NotImplementedError

    def robot_init_qpos(self, rng: np.random.Generator) -> np.ndarray:
        """Fixed home pose (the training distribution has no perturbation at all). `unseen_states`
        perturbs five arm joints by 0.1-0.3 rad each: base and wrist joints either way, shoulder
        and elbow only in the direction that lifts the gripper (so it never starts in the table).
        Always draws the same numbers, whatever the variant."""
        magnitude = rng.uniform([0.15, 0.10, 0.10, 0.15, 0.15], [0.30, 0.25, 0.25, 0.30, 0.30])
        sign = rng.choice([-1.0, 1.0], size=5) * np.array([1, 0, 0, 1, 1]) + np.array([0, -1, 1, 0, 0])
        qpos = HOME_QPOS.copy()
        if self.variant == "unseen_states":
            qpos[[0, 1, 3, 4, 6]] += magnitude * sign
        return qpos

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
        # ManiSkill sets _episode_seed to the seeds given to reset(), aligned with env_idx
        seeds = [int(s) for s in np.asarray(self._episode_seed).reshape(-1)[: len(env_idx)]]
        layouts = [self.sample_layout(s) for s in seeds]
        qpos = self.tensor(np.stack([lay["robot_qpos"] for lay in layouts]))
        self.agent.reset(qpos)
        self.agent.robot.set_pose(sapien.Pose(p=list(ROBOT_BASE_XYZ)))
        self._place_layout(env_idx, layouts)
        for k, i in enumerate(env_idx.tolist()):
            self.instructions[i] = layouts[k]["instruction"]
            # the domain's noise generator is seeded by the episode seed too (reproducible runs)
            self._noise_rngs[i] = np.random.default_rng([seeds[k], 1])
        self._pending_action[env_idx] = torch.tensor(HOLD_ACTION, device=self.device)
        self.expert_phase[env_idx] = 0
        self.expert_timer[env_idx] = 0

    def _load_task(self):
        raise NotImplementedError

    def _place_layout(self, env_idx: torch.Tensor, layouts: list[dict]):
        raise NotImplementedError

    def rgb(self, per_domain: dict) -> tuple:
        """An object's colour at this env's gap, from its {"sim": rgb, "proxy_real": rgb}."""
        return _lerp(tuple(per_domain["sim"]), tuple(per_domain["proxy_real"]), self.gap)

    def material(self, per_domain: dict, texture_seed: int, grain: bool = False):
        return _material(self.rgb(per_domain), self.params["textured"], texture_seed, grain)

    def tensor(self, x) -> torch.Tensor:
        """float32 tensor on the simulation's device."""
        return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    # ---- stepping with the domain's action effects --------------------------------------------
    def step(self, action):
        action = torch.as_tensor(action, dtype=torch.float32, device=self.device).reshape(self.num_envs, 7)
        if self.params["action_latency"] > 0:  # the action executed now is the one commanded last step
            action, self._pending_action = self._pending_action, action.clone()
        std = self.params["action_noise_std"]
        if std > 0:
            noise = np.stack([rng.normal(0.0, std, size=6) for rng in self._noise_rngs])
            action = action.clone()
            action[:, :6] += torch.as_tensor(noise, dtype=torch.float32, device=self.device)
        return super().step(action.clamp(-1, 1))

    # ---- observation parts ------------------------------------------------------------------
    def robot_state(self) -> torch.Tensor:
        """[B, 8]: tcp position in the robot base frame, tcp quaternion (wxyz, x >= 0), gripper opening (m)."""
        tcp = self.agent.robot.pose.inv() * self.agent.tcp_pose
        q = torch.where(tcp.q[:, 1:2] < 0, -tcp.q, tcp.q)
        opening = self.agent.robot.get_qpos()[:, -2:].sum(dim=-1, keepdim=True)
        return torch.cat([tcp.p, q, opening], dim=-1)

    def render_views(self, front_only: bool = False) -> dict:
        """{"image": [B, H, W, 3] uint8 of the fixed third-person camera, and with the wrist camera
        "wrist_image", the same of the hand camera} (renders now; front_only: the first alone)."""
        self.scene.update_render(update_sensors=True, update_human_render_cameras=False)
        views = {}
        for key, name in (("image", "front"), ("wrist_image", "wrist")):
            if name in self.scene.sensors and (key == "image" or not front_only):
                camera = self.scene.sensors[name]
                camera.capture()
                views[key] = camera.get_obs(rgb=True, depth=False, position=False, segmentation=False)["rgb"]
        return views

    # ---- rewards ----------------------------------------------------------------------------
    def compute_sparse_reward(self, obs, action, info):
        return info["success"].float()

    def compute_normalized_dense_reward(self, obs, action, info):
        return self.compute_dense_reward(obs, action, info)

    # ---- experts ----------------------------------------------------------------------------
    def expert_action(self) -> torch.Tensor:
        raise NotImplementedError

    def _advance(self, mask: torch.Tensor, to_phase: int):
        """Move the expert of the envs in `mask` to `to_phase` and restart its timer."""
        self.expert_phase = torch.where(mask, torch.full_like(self.expert_phase, to_phase), self.expert_phase)
        self.expert_timer = torch.where(mask, torch.zeros_like(self.expert_timer), self.expert_timer)


# --------------------------------------------------------------------------------------------
# 5a. Pick and place
# --------------------------------------------------------------------------------------------
# Object shapes built from primitives. Training uses the first set; `unseen_objects` the second
# (shapes never seen in training). Each shape: its name in the instruction, its parts, the height
# of its origin when resting on the table, the grasp point (local, from the origin), the
# direction of the fingers' closing axis (local yaw), and its yaw symmetry for the grasp
# (None: any yaw works, e.g. a cylinder).
TRAIN_SHAPES = ("cube", "cylinder", "ball", "block")
UNSEEN_SHAPES = ("capsule", "dumbbell", "tee", "bottle")
SHAPES = {
    # the 4 cm cube fits the open fingers (8 cm) at any yaw, its diagonal too: no turn (turning to a
    # cube's yaw, a few degrees hard to see in a 64 px image, is a decision a policy cannot imitate)
    "cube": dict(name="cube", rest_z=0.02, grasp=(0, 0, 0), close_yaw=np.pi / 2, period=None,
                 parts=[("box", (0.02, 0.02, 0.02), (0, 0, 0))]),
    "cylinder": dict(name="cylinder", rest_z=0.03, grasp=(0, 0, 0.005), close_yaw=0.0, period=None,
                     parts=[("cylinder_z", (0.02, 0.03), (0, 0, 0))]),
    "ball": dict(name="ball", rest_z=0.022, grasp=(0, 0, 0), close_yaw=0.0, period=None,
                 parts=[("sphere", (0.022,), (0, 0, 0))]),
    "block": dict(name="block", rest_z=0.02, grasp=(0, 0, 0), close_yaw=np.pi / 2, period=np.pi,
                  parts=[("box", (0.045, 0.016, 0.02), (0, 0, 0))]),
    "capsule": dict(name="capsule", rest_z=0.038, grasp=(0, 0, 0), close_yaw=0.0, period=None,
                    parts=[("capsule_z", (0.018, 0.02), (0, 0, 0))]),
    "dumbbell": dict(name="dumbbell", rest_z=0.02, grasp=(0, 0, 0), close_yaw=np.pi / 2, period=np.pi,
                     parts=[("cylinder_x", (0.01, 0.035), (0, 0, 0)), ("sphere", (0.02,), (0.045, 0, 0)),
                            ("sphere", (0.02,), (-0.045, 0, 0))]),
    "tee": dict(name="T-shaped block", rest_z=0.018, grasp=(0, -0.015, 0), close_yaw=0.0, period=np.pi,
                parts=[("box", (0.045, 0.012, 0.018), (0, 0.03, 0)), ("box", (0.012, 0.03, 0.018), (0, -0.012, 0))]),
    "bottle": dict(name="bottle", rest_z=0.03, grasp=(0, 0, 0.02), close_yaw=0.0, period=None,
                   parts=[("cylinder_z", (0.022, 0.03), (0, 0, 0)), ("cylinder_z", (0.01, 0.015), (0, 0, 0.045))]),
}
SHAPE_RGB = {  # per shape, per domain
    "sim": {"cube": (0.90, 0.20, 0.15), "cylinder": (0.15, 0.45, 0.90), "ball": (0.95, 0.75, 0.10),
            "block": (0.20, 0.70, 0.30), "capsule": (0.80, 0.30, 0.75), "dumbbell": (0.95, 0.50, 0.10),
            "tee": (0.20, 0.75, 0.75), "bottle": (0.55, 0.35, 0.20)},
    "proxy_real": {"cube": (0.72, 0.25, 0.22), "cylinder": (0.25, 0.42, 0.70), "ball": (0.85, 0.70, 0.25),
                   "block": (0.30, 0.58, 0.33), "capsule": (0.65, 0.35, 0.60), "dumbbell": (0.85, 0.50, 0.25),
                   "tee": (0.30, 0.62, 0.62), "bottle": (0.50, 0.38, 0.28)},
}
CONTAINER = dict(inner_half=0.065, wall=0.008, floor=0.006, height=0.05)
CONTAINER_RGB = {"sim": (0.35, 0.35, 0.40), "proxy_real": (0.45, 0.38, 0.30)}
CARRY_Z = 0.16  # tcp height while carrying an object over the container's walls


def _add_part(builder, kind, size, pos, material, physx_material, density):
    """One primitive (collision + visual) of an object. Cylinders and capsules in SAPIEN lie along x."""
    upright = [np.cos(np.pi / 4), 0, np.sin(np.pi / 4), 0]  # x axis -> z axis
    if kind == "box":
        pose = sapien.Pose(pos)
        builder.add_box_collision(pose, size, material=physx_material, density=density)
        builder.add_box_visual(pose, size, material=material)
    elif kind == "sphere":
        pose = sapien.Pose(pos)
        builder.add_sphere_collision(pose, size[0], material=physx_material, density=density)
        builder.add_sphere_visual(pose, size[0], material=material)
    elif kind in ("cylinder_x", "cylinder_z"):
        pose = sapien.Pose(pos, upright if kind == "cylinder_z" else [1, 0, 0, 0])
        builder.add_cylinder_collision(pose, size[0], size[1], material=physx_material, density=density)
        builder.add_cylinder_visual(pose, size[0], size[1], material=material)
    elif kind == "capsule_z":
        pose = sapien.Pose(pos, upright)
        builder.add_capsule_collision(pose, size[0], size[1], material=physx_material, density=density)
        builder.add_capsule_visual(pose, size[0], size[1], material=material)
    else:
        raise ValueError(kind)


def _parking_pose(i: int) -> list[float]:
    """Where unused objects wait: on the floor, out of the camera's view."""
    return [1.2, -0.6 + 0.3 * i, -0.7]


@register_env(ENV_IDS["pick_and_place"], max_episode_steps=MAX_EPISODE_STEPS["pick_and_place"])
class PickAndPlaceEnv(TwinTaskEnv):
    """Grasp the one object on the table and put it into the open box. All shapes of the
    variant's set are built once; each episode moves one of them onto the table and parks the rest."""

    task = "pick_and_place"
    camera_eye = (0.30, 0.0, 0.50)  # in front of the robot, looking back at it and down on the table
    camera_target = (-0.08, 0.0, 0.0)

    def _load_task(self):
        self.shape_keys = UNSEEN_SHAPES if self.variant == "unseen_objects" else TRAIN_SHAPES
        self.objects = []
        for i, key in enumerate(self.shape_keys):
            builder = self.scene.create_actor_builder()
            material = self.material({d: SHAPE_RGB[d][key] for d in DOMAINS}, 10 + i)
            for kind, size, pos in SHAPES[key]["parts"]:
                _add_part(builder, kind, size, pos, material, self.object_material, self.params["object_density"])
            builder.initial_pose = sapien.Pose(p=_parking_pose(i))
            self.objects.append(builder.build(name=key))
        c = CONTAINER
        builder = self.scene.create_actor_builder()
        material = self.material(CONTAINER_RGB, 20)
        outer = c["inner_half"] + c["wall"]
        walls = [  # (half size, centre): floor and four walls
            ((outer, outer, c["floor"] / 2), (0, 0, c["floor"] / 2)),
            ((c["wall"] / 2, outer, c["height"] / 2), (outer - c["wall"] / 2, 0, c["height"] / 2)),
            ((c["wall"] / 2, outer, c["height"] / 2), (-outer + c["wall"] / 2, 0, c["height"] / 2)),
            ((outer, c["wall"] / 2, c["height"] / 2), (0, outer - c["wall"] / 2, c["height"] / 2)),
            ((outer, c["wall"] / 2, c["height"] / 2), (0, -outer + c["wall"] / 2, c["height"] / 2)),
        ]
        for half, centre in walls:
            builder.add_box_collision(sapien.Pose(centre), half)
            builder.add_box_visual(sapien.Pose(centre), half, material=material)
        builder.initial_pose = sapien.Pose(p=[-0.05, 0.14, 0])
        self.container = builder.build_kinematic(name="container")
        n = self.num_envs
        self.active = torch.zeros(n, dtype=torch.long, device=self.device)  # which shape is on the table
        shape_table = lambda field: torch.tensor([SHAPES[k][field] for k in self.shape_keys], device=self.device)
        self.shape_grasp = shape_table("grasp").float()  # [S, 3]
        self.shape_close_yaw = shape_table("close_yaw").float()
        self.shape_period = torch.tensor([SHAPES[k]["period"] or 0.0 for k in self.shape_keys], device=self.device)
        self.shape_rest_z = shape_table("rest_z").float()

    def sample_layout(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        shape_index = int(rng.integers(4))  # both shape sets have 4 shapes: the same draw in every variant
        object_xy = rng.uniform([-0.16, -0.18], [-0.02, -0.04])
        object_yaw = rng.uniform(-np.pi / 4, np.pi / 4)
        container_xy = rng.uniform([-0.12, 0.10], [0.0, 0.17])
        key = self.shape_keys[shape_index]
        return dict(shape_index=shape_index, object_xy=object_xy, object_yaw=object_yaw, container_xy=container_xy,
                    robot_qpos=self.robot_init_qpos(rng), instruction=f"put the {SHAPES[key]['name']} in the box")

    def _place_layout(self, env_idx, layouts):
        b = len(layouts)
        shape_index = torch.tensor([lay["shape_index"] for lay in layouts], device=self.device)
        self.active[env_idx] = shape_index
        q = yaw_quat(self.tensor([lay["object_yaw"] for lay in layouts]))
        identity = self.tensor([1.0, 0.0, 0.0, 0.0])
        for i, obj in enumerate(self.objects):
            on_table = shape_index == i
            rest = self.tensor([[*lay["object_xy"], SHAPES[self.shape_keys[i]]["rest_z"] + 0.001] for lay in layouts])
            p = torch.where(on_table[:, None], rest, self.tensor(_parking_pose(i)))
            obj.set_pose(Pose.create_from_pq(p, torch.where(on_table[:, None], q, identity)))
            obj.set_linear_velocity(torch.zeros(b, 3, device=self.device))
            obj.set_angular_velocity(torch.zeros(b, 3, device=self.device))
        self.container.set_pose(Pose.create_from_pq(self.tensor([[*lay["container_xy"], 0.0] for lay in layouts])))

    # privileged quantities of the object on the table
    def object_pose(self) -> Pose:
        raw = torch.stack([obj.pose.raw_pose for obj in self.objects])  # [S, B, 7]
        return Pose.create(raw[self.active, torch.arange(self.num_envs, device=self.device)])

    def object_velocity(self) -> torch.Tensor:
        v = torch.stack([obj.linear_velocity for obj in self.objects])
        return v[self.active, torch.arange(self.num_envs, device=self.device)]

    def object_grasped(self) -> torch.Tensor:
        grasped = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        for i in self.active.unique().tolist():  # contact queries only for shapes on some table
            grasped |= (self.active == i) & self.agent.is_grasping(self.objects[i])
        return grasped

    def grasp_point(self, pose: Pose) -> torch.Tensor:
        local = self.shape_grasp[self.active]
        return pose.p + torch.einsum("bij,bj->bi", quaternion_to_matrix(pose.q), local)

    def evaluate(self):
        obj = self.object_pose()
        rel = obj.p - self.container.pose.p
        margin = CONTAINER["inner_half"] - 0.01
        inside = (rel[:, 0].abs() < margin) & (rel[:, 1].abs() < margin) & (rel[:, 2] < CONTAINER["height"])
        grasped = self.object_grasped()
        at_rest = torch.linalg.norm(self.object_velocity(), dim=-1) < 0.03
        return dict(success=inside & ~grasped & at_rest, is_inside=inside, is_grasped=grasped)

    def compute_dense_reward(self, obs, action, info):
        # reach the grasp point (0-1), hold (0/1), bring it over the box (0-2), inside (0/1); / 5
        obj = self.object_pose()
        reach = 1 - torch.tanh(5 * torch.linalg.norm(self.grasp_point(obj) - self.agent.tcp_pose.p, dim=-1))
        to_box = torch.linalg.norm(obj.p[:, :2] - self.container.pose.p[:, :2], dim=-1)
        reward = (reach + info["is_grasped"].float() + 2 * (1 - torch.tanh(5 * to_box)) + info["is_inside"].float()) / 5
        return torch.where(info["success"], torch.ones_like(reward), reward.clamp(max=0.9))

    def expert_action(self) -> torch.Tensor:
        """Above the object -> down -> close -> lift -> over the box -> lower -> open -> back up.
        If the object slips out while carrying, start again."""
        tcp, obj = self.agent.tcp_pose, self.object_pose()
        up = lambda z: torch.stack([torch.zeros_like(z), torch.zeros_like(z), z], dim=-1)
        grasp = self.grasp_point(obj)
        # yaw of the fingers' closing axis across the object; gripper yaw = closing axis + 90 deg
        period = self.shape_period[self.active]
        yaw_now = gripper_yaw(tcp.q)
        yaw = gripper_yaw(obj.q) + self.shape_close_yaw[self.active] + np.pi / 2
        safe_period = period.clamp(min=1e-3)  # period 0: any yaw grasps it, keep the current one
        yaw = torch.where(period > 0, yaw + safe_period * torch.round((yaw_now - yaw) / safe_period), yaw_now)
        yaw_err = (yaw - yaw_now).abs()
        above_object = grasp + up(torch.full_like(grasp[:, 0], 0.10))
        box = self.container.pose.p
        above_box = torch.cat([box[:, :2], torch.full_like(box[:, :1], CARRY_Z)], dim=-1)
        # height of the grasp point above the object's bottom
        grasp_height = grasp[:, 2] - (obj.p[:, 2] - self.shape_rest_z[self.active])
        release = torch.cat([box[:, :2], (CONTAINER["floor"] + grasp_height + 0.025)[:, None]], dim=-1)
        dist = lambda target: torch.linalg.norm(target - tcp.p, dim=-1)
        xy_dist = lambda target: torch.linalg.norm(target[:, :2] - tcp.p[:, :2], dim=-1)
        held = torch.linalg.norm(grasp - tcp.p, dim=-1) < 0.03

        self._advance((self.expert_phase == 0) & (dist(above_object) < 0.015) & (yaw_err < 0.08), 1)
        self._advance((self.expert_phase == 1) & (dist(grasp) < 0.01), 2)
        # lift once the fingers hold the object, not after a fixed wait (as open_drawer's expert)
        self._advance((self.expert_phase == 2) & (self.object_grasped() | (self.expert_timer >= 5)), 3)
        self._advance((self.expert_phase == 3) & (tcp.p[:, 2] > CARRY_Z - 0.02), 4)
        self._advance((self.expert_phase == 4) & (xy_dist(above_box) < 0.015), 5)
        self._advance((self.expert_phase == 5) & (dist(release) < 0.015), 6)
        self._advance((self.expert_phase == 6) & (self.expert_timer >= 3), 7)
        self._advance((self.expert_phase >= 3) & (self.expert_phase <= 5) & ~held, 0)  # dropped: try again

        phase = self.expert_phase
        lift = torch.cat([tcp.p[:, :2], torch.full_like(tcp.p[:, :1], CARRY_Z)], dim=-1)
        targets = [above_object, grasp, grasp, lift, above_box, release, release, lift]
        target = torch.stack(targets)[phase, torch.arange(self.num_envs, device=self.device)]
        gripper = torch.where((phase >= 2) & (phase <= 5), -1.0, 1.0).to(self.device)
        # keep the grasp yaw once holding; the box does not care about yaw
        q_target = top_down_quat(torch.where(phase >= 2, yaw_now, yaw))
        self.expert_timer = self.expert_timer + 1
        return pose_action(tcp, target, q_target, gripper)


# --------------------------------------------------------------------------------------------
# 5b. Push cube via instruction
# --------------------------------------------------------------------------------------------
TRAIN_COLOURS = ("red", "green", "blue")
UNSEEN_COLOURS = ("yellow", "purple", "orange")
COLOUR_RGB = {
    "sim": {"red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.10, 0.25, 0.90),
            "yellow": (0.95, 0.85, 0.10), "purple": (0.55, 0.15, 0.75), "orange": (1.00, 0.50, 0.05)},
    "proxy_real": {"red": (0.75, 0.20, 0.17), "green": (0.28, 0.60, 0.32), "blue": (0.22, 0.32, 0.70),
                   "yellow": (0.85, 0.76, 0.28), "purple": (0.50, 0.28, 0.60), "orange": (0.88, 0.52, 0.22)},
}
GOAL_RGB = {"sim": (0.95, 0.95, 0.95), "proxy_real": (0.90, 0.86, 0.65)}
CUBE_HALF = 0.02
GOAL_RADIUS = 0.04  # success: the named cube's centre within this distance of the goal's centre
PUSH_STANDOFF = 0.032  # tcp distance behind the cube's centre while pushing


@register_env(ENV_IDS["push_cube"], max_episode_steps=MAX_EPISODE_STEPS["push_cube"])
class PushCubeEnv(TwinTaskEnv):
    """Three cubes of different colours in a row; push the one the instruction names onto the
    goal disk without moving the other two (each must move < 2 cm)."""

    task = "push_cube"
    camera_eye = (0.30, 0.0, 0.50)
    camera_target = (-0.08, 0.0, 0.0)

    def _load_task(self):
        self.colours = UNSEEN_COLOURS if self.variant == "unseen_objects" else TRAIN_COLOURS
        self.cubes = []
        for i, colour in enumerate(self.colours):
            builder = self.scene.create_actor_builder()
            material = self.material({d: COLOUR_RGB[d][colour] for d in DOMAINS}, 30 + i)
            _add_part(builder, "box", (CUBE_HALF,) * 3, (0, 0, 0), material, self.object_material,
                      self.params["object_density"])
            builder.initial_pose = sapien.Pose(p=[-0.1, 0.1 * i, CUBE_HALF])
            self.cubes.append(builder.build(name=f"{colour}_cube"))
        builder = self.scene.create_actor_builder()  # a flat marker, no collision
        builder.add_cylinder_visual(sapien.Pose(q=[np.cos(np.pi / 4), 0, np.sin(np.pi / 4), 0]), GOAL_RADIUS, 0.0005,
                                    material=self.material(GOAL_RGB, 33))
        builder.initial_pose = sapien.Pose(p=[0.05, 0, 0.0006])
        self.goal = builder.build_kinematic(name="goal")
        n = self.num_envs
        self.target = torch.zeros(n, dtype=torch.long, device=self.device)  # index of the named cube
        self.cube_start_xy = torch.zeros(n, 3, 2, device=self.device)

    def sample_layout(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        slot_of_cube = rng.permutation(3)  # which of the three row positions each cube takes
        target = int(rng.integers(3))
        slot_y = np.array([-0.12, 0.0, 0.12])
        jitter = rng.uniform(-0.015, 0.015, size=(3, 2))
        cube_xy = np.stack([np.array([-0.13, slot_y[s]]) + jitter[i] for i, s in enumerate(slot_of_cube)])
        cube_yaw = rng.uniform(-np.pi / 4, np.pi / 4, size=3)
        goal_xy = rng.uniform([0.05, -0.06], [0.09, 0.06])  # ahead of the row: short, shallow pushes
        return dict(cube_xy=cube_xy, cube_yaw=cube_yaw, target=target, goal_xy=goal_xy,
                    robot_qpos=self.robot_init_qpos(rng),
                    instruction=f"push the {self.colours[target]} cube to the goal")

    def _place_layout(self, env_idx, layouts):
        b = len(layouts)
        for i, cube in enumerate(self.cubes):
            p = self.tensor([[*lay["cube_xy"][i], CUBE_HALF + 0.001] for lay in layouts])
            cube.set_pose(Pose.create_from_pq(p, yaw_quat(self.tensor([lay["cube_yaw"][i] for lay in layouts]))))
            cube.set_linear_velocity(torch.zeros(b, 3, device=self.device))
            cube.set_angular_velocity(torch.zeros(b, 3, device=self.device))
        self.goal.set_pose(Pose.create_from_pq(self.tensor([[*lay["goal_xy"], 0.0006] for lay in layouts])))
        self.target[env_idx] = torch.tensor([lay["target"] for lay in layouts], device=self.device)
        self.cube_start_xy[env_idx] = self.tensor(np.stack([lay["cube_xy"] for lay in layouts]))

    def cube_xy(self) -> torch.Tensor:
        return torch.stack([cube.pose.p[:, :2] for cube in self.cubes], dim=1)  # [B, 3, 2]

    def evaluate(self):
        xy = self.cube_xy()
        rows = torch.arange(self.num_envs, device=self.device)
        to_goal = torch.linalg.norm(xy[rows, self.target] - self.goal.pose.p[:, :2], dim=-1)
        moved = torch.linalg.norm(xy - self.cube_start_xy, dim=-1)  # [B, 3]
        others_moved = moved.masked_fill(torch.nn.functional.one_hot(self.target, 3).bool(), 0.0).amax(dim=-1)
        success = (to_goal <= GOAL_RADIUS) & (others_moved < 0.02)
        return dict(success=success, to_goal=to_goal, others_moved=others_moved)

    def push_geometry(self):
        """The named cube's position, the unit push direction toward the goal, and its distance."""
        rows = torch.arange(self.num_envs, device=self.device)
        cube = self.cube_xy()[rows, self.target]
        to_goal = self.goal.pose.p[:, :2] - cube
        distance = torch.linalg.norm(to_goal, dim=-1)
        return cube, to_goal / distance.clamp(min=1e-6)[:, None], distance

    def compute_dense_reward(self, obs, action, info):
        # reach behind the named cube (0-1), bring it to the goal (0-2), minus moving the others; / 3
        cube, direction, _ = self.push_geometry()
        behind = torch.cat([cube - PUSH_STANDOFF * direction, torch.full_like(cube[:, :1], CUBE_HALF)], dim=-1)
        reach = 1 - torch.tanh(5 * torch.linalg.norm(behind - self.agent.tcp_pose.p, dim=-1))
        progress = 1 - torch.tanh(5 * info["to_goal"])
        penalty = torch.tanh(20 * info["others_moved"])
        reward = ((reach + 2 * progress - penalty) / 3).clamp(min=0)
        return torch.where(info["success"], torch.ones_like(reward), reward.clamp(max=0.9))

    def expert_action(self) -> torch.Tensor:
        """Closed gripper above a point behind the cube -> down to the table -> push toward the goal,
        re-aiming every step; if the cube slides off the pushing line, back off (staying low) to a
        point behind it on the new line and push again."""
        tcp = self.agent.tcp_pose
        cube, direction, distance = self.push_geometry()
        z = lambda h: torch.full_like(cube[:, :1], h)
        behind_xy = cube - 0.055 * direction
        above_behind = torch.cat([behind_xy, z(0.08)], dim=-1)
        behind = torch.cat([behind_xy, z(0.018)], dim=-1)
        pushed = torch.cat([cube + direction * (distance.clamp(max=0.04)[:, None] - PUSH_STANDOFF), z(0.018)], dim=-1)
        # the closed fingertips push whatever the yaw: keep the home yaw (turning the gripper to the
        # push direction made up to 90-degree turns whose sign flips with the layout, the largest
        # part of a policy's imitation error)
        yaw = nearest_equivalent_yaw(torch.full_like(cube[:, 0], HOME_YAW), gripper_yaw(tcp.q), np.pi)
        offset = tcp.p[:, :2] - cube
        lateral = (offset - (offset * direction).sum(-1, keepdim=True) * direction).norm(dim=-1)
        dist = lambda target: torch.linalg.norm(target - tcp.p, dim=-1)

        self._advance((self.expert_phase == 0) & (dist(above_behind) < 0.015), 1)
        self._advance((self.expert_phase == 1) & (dist(behind) < 0.01), 2)
        self._advance((self.expert_phase == 2) & (lateral > 0.018), 3)  # off the line: back off
        self._advance((self.expert_phase == 3) & (dist(behind) < 0.012), 2)
        phase = self.expert_phase
        rows = torch.arange(self.num_envs, device=self.device)
        target = torch.stack([above_behind, behind, pushed, behind])[phase, rows]
        self.expert_timer = self.expert_timer + 1
        return pose_action(tcp, target, top_down_quat(yaw), torch.full_like(cube[:, 0], -1.0), max_step=0.04)


# --------------------------------------------------------------------------------------------
# 5c. Open / close drawer
# --------------------------------------------------------------------------------------------
# The training cabinet, and for `unseen_objects` one never seen in training (other proportions,
# a thicker and longer handle closer to the front, other colours). Same travel, same success test.
CABINETS = {
    "train": dict(depth=0.24, width=0.30, height=0.14, wall=0.01, handle_standoff=0.05, handle_length=0.07,
                  handle_radius=0.008,
                  rgb={"sim": (0.85, 0.85, 0.80), "proxy_real": (0.62, 0.45, 0.30)},
                  drawer_rgb={"sim": (0.55, 0.70, 0.85), "proxy_real": (0.80, 0.78, 0.72)},
                  handle_rgb={"sim": (0.15, 0.15, 0.15), "proxy_real": (0.55, 0.55, 0.58)}),
    "unseen": dict(depth=0.26, width=0.36, height=0.17, wall=0.012, handle_standoff=0.045, handle_length=0.09,
                   handle_radius=0.011,
                   rgb={"sim": (0.35, 0.25, 0.20), "proxy_real": (0.30, 0.30, 0.32)},
                   drawer_rgb={"sim": (0.90, 0.60, 0.30), "proxy_real": (0.75, 0.35, 0.30)},
                   handle_rgb={"sim": (0.80, 0.75, 0.20), "proxy_real": (0.70, 0.62, 0.30)}),
}
DRAWER_TRAVEL = 0.16  # metres the drawer slides from closed to fully open


class DrawerEnv(TwinTaskEnv):
    """A cabinet built from boxes with one prismatic drawer (bar handle, vertical) facing the robot."""

    start_open_range = (0.0, 0.0)  # initial opening as a fraction of the travel
    camera_eye = (-0.25, 0.50, 0.60)  # beside the robot, seeing the drawer front and its handle
    camera_target = (0.0, -0.05, 0.06)

    def _load_task(self):
        c = CABINETS["unseen" if self.variant == "unseen_objects" else "train"]
        d, w, h, t = c["depth"], c["width"], c["height"], c["wall"]
        builder = self.scene.create_articulation_builder()
        builder.disable_self_collisions = True  # the drawer slides inside the body on its joint
        body = builder.create_link_builder()
        body.set_name("body")
        body_mat = self.material(c["rgb"], 3, grain=True)
        panels = [  # (half size, centre) in the cabinet frame: origin at the bottom centre, front at -x
            ((d / 2, w / 2, t / 2), (0, 0, t / 2)),  # bottom
            ((d / 2, w / 2, t / 2), (0, 0, h - t / 2)),  # top
            ((d / 2, t / 2, h / 2), (0, w / 2 - t / 2, h / 2)),  # sides
            ((d / 2, t / 2, h / 2), (0, -w / 2 + t / 2, h / 2)),
            ((t / 2, w / 2, h / 2), (d / 2 - t / 2, 0, h / 2)),  # back
        ]
        for half, centre in panels:
            body.add_box_collision(sapien.Pose(centre), half)
            body.add_box_visual(sapien.Pose(centre), half, material=body_mat)

        drawer = builder.create_link_builder(body)
        drawer.set_name("drawer")
        drawer.set_joint_name("drawer_joint")
        # joint frame rotated 180 deg about z: positive joint position pulls the drawer toward -x
        flip = sapien.Pose(q=[0, 0, 0, 1])
        drawer.set_joint_properties("prismatic", limits=[[0.0, DRAWER_TRAVEL]], pose_in_parent=flip, pose_in_child=flip)
        drawer_mat = self.material(c["drawer_rgb"], 4)
        inner_w, tray_h, tray_d = w - 2 * t - 0.006, 0.07, d - 2 * t
        front_x = -d / 2 + t / 2
        drawer_panels = [
            ((t / 2, inner_w / 2, (h - 2 * t - 0.006) / 2), (front_x, 0, h / 2)),  # front
            ((tray_d / 2, inner_w / 2, t / 2), (front_x + tray_d / 2, 0, t + t / 2 + 0.003)),  # tray bottom
            ((tray_d / 2, t / 2, tray_h / 2), (front_x + tray_d / 2, inner_w / 2 - t / 2, t + tray_h / 2)),
            ((tray_d / 2, t / 2, tray_h / 2), (front_x + tray_d / 2, -inner_w / 2 + t / 2, t + tray_h / 2)),
            ((t / 2, inner_w / 2, tray_h / 2), (front_x + tray_d, 0, t + tray_h / 2)),  # tray back
        ]
        for half, centre in drawer_panels:
            drawer.add_box_collision(sapien.Pose(centre), half, density=self.params["drawer_density"])
            drawer.add_box_visual(sapien.Pose(centre), half, material=drawer_mat)
        # vertical bar handle held by two horizontal posts
        handle_mat = self.material(c["handle_rgb"], 5)
        so, hl, r = c["handle_standoff"], c["handle_length"], c["handle_radius"]
        handle_centre = np.array([front_x - t / 2 - so, 0.0, h / 2])
        # where the fingers hold (expert) or push (close) the bar: 3 cm below its top end, so that
        # the palm stays above the bar
        self.handle_local = handle_centre + [0.0, 0.0, hl / 2 - 0.03]
        upright = sapien.Pose(handle_centre, q=[np.cos(np.pi / 4), 0, np.sin(np.pi / 4), 0])  # cylinder axis x -> z
        drawer.add_cylinder_collision(upright, r, hl / 2, density=self.params["drawer_density"])
        drawer.add_cylinder_visual(upright, r, hl / 2, material=handle_mat)
        for dz in (-hl / 2 + 0.005, hl / 2 - 0.005):
            centre = (front_x - t / 2 - so / 2, 0, h / 2 + dz)
            drawer.add_box_collision(sapien.Pose(centre), (so / 2, 0.005, 0.005), density=self.params["drawer_density"])
            drawer.add_box_visual(sapien.Pose(centre), (so / 2, 0.005, 0.005), material=handle_mat)

        builder.set_initial_pose(sapien.Pose(p=[0.15, 0, 0]))
        self.cabinet = builder.build(name="cabinet", fix_root_link=True)
        self.drawer_joint = self.cabinet.active_joints[0]
        self.drawer_joint.set_friction(self.params["drawer_friction"])
        self.drawer_joint.set_drive_properties(0.0, self.params["drawer_damping"])
        self.drawer_link = self.cabinet.links_map["drawer"]
        self.initial_opening = torch.zeros(self.num_envs, device=self.device)

    def sample_layout(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        xy = rng.uniform([0.10, -0.12], [0.18, 0.12])
        yaw = rng.uniform(-0.15, 0.15)
        opening = rng.uniform(*self.start_open_range) * DRAWER_TRAVEL
        return dict(cabinet_xy=xy, cabinet_yaw=yaw, opening=opening, robot_qpos=self.robot_init_qpos(rng),
                    instruction=self.instruction)

    def _place_layout(self, env_idx, layouts):
        p = self.tensor([[*lay["cabinet_xy"], 0.0] for lay in layouts])
        q = yaw_quat(self.tensor([lay["cabinet_yaw"] for lay in layouts]))
        self.cabinet.set_root_pose(Pose.create_from_pq(p, q))
        opening = self.tensor([lay["opening"] for lay in layouts])
        self.cabinet.set_qpos(opening[:, None])
        self.cabinet.set_qvel(torch.zeros_like(opening[:, None]))
        self.initial_opening[env_idx] = opening

    # privileged quantities the success test, the reward and the expert share
    def opening(self) -> torch.Tensor:
        return self.cabinet.get_qpos()[:, 0]

    def handle_pos(self) -> torch.Tensor:
        """World position of the handle's grasp point (on the bar, 3 cm below its top)."""
        local = torch.tensor(self.handle_local, dtype=torch.float32, device=self.device)
        return self.drawer_link.pose.p + torch.einsum("bij,j->bi", quaternion_to_matrix(self.drawer_link.pose.q), local)

    def pull_direction(self) -> torch.Tensor:
        """Unit vector (world) in which the drawer opens: the cabinet's -x axis."""
        return -quaternion_to_matrix(self.cabinet.pose.q)[:, :, 0]

    def cabinet_yaw(self) -> torch.Tensor:
        x_axis = quaternion_to_matrix(self.cabinet.pose.q)[:, :, 0]
        return torch.atan2(x_axis[:, 1], x_axis[:, 0])


@register_env(ENV_IDS["open_drawer"], max_episode_steps=MAX_EPISODE_STEPS["open_drawer"])
class OpenDrawerEnv(DrawerEnv):
    """Open the drawer: it starts closed; success once it is open >= 80% of its travel."""

    task = "open_drawer"
    instruction = "open the drawer"
    start_open_range = (0.0, 0.0)

    def evaluate(self):
        fraction = self.opening() / DRAWER_TRAVEL
        grasped = self.agent.is_grasping(self.drawer_link)
        return dict(success=fraction >= 0.8, open_fraction=fraction, is_grasped=grasped)

    def compute_dense_reward(self, obs, action, info):
        # reach the handle (0-1), hold it (0/1), opening progress (0-2); success = 1 after normalizing by 4
        reach = 1 - torch.tanh(5 * torch.linalg.norm(self.handle_pos() - self.agent.tcp_pose.p, dim=-1))
        progress = info["open_fraction"].clamp(0, 1) / 0.8
        reward = (reach + info["is_grasped"].float() + 2 * progress.clamp(max=1)) / 4
        return torch.where(info["success"], torch.ones_like(reward), reward.clamp(max=0.9))

    def expert_action(self) -> torch.Tensor:
        """Above the handle -> down around it -> close the fingers -> pull along the drawer axis."""
        tcp = self.agent.tcp_pose
        handle, pull = self.handle_pos(), self.pull_direction()
        # the fingers straddle the round bar whatever the cabinet's small yaw (+-0.15 rad): keep the
        # home yaw (turning the gripper to the cabinet's yaw, a few degrees hard to see in a 64 px
        # image, was the largest imitation error of a policy's first decision)
        yaw = nearest_equivalent_yaw(torch.full_like(handle[:, 0], HOME_YAW), gripper_yaw(tcp.q), np.pi)
        q_target = top_down_quat(yaw)
        above = handle + torch.tensor([0, 0, 0.10], device=self.device)
        at_handle = handle.clone()
        remaining = (0.95 * DRAWER_TRAVEL - self.opening()).clamp(min=0)
        pulled = at_handle + pull * remaining[:, None]
        dist = lambda target: torch.linalg.norm(target - tcp.p, dim=-1)

        self._advance((self.expert_phase == 0) & (dist(above) < 0.02), 1)
        self._advance((self.expert_phase == 1) & (dist(at_handle) < 0.012), 2)
        # pull once the fingers hold the bar (the gripper's opening, in the policy's state, shows it),
        # not after a fixed wait: a still, closed gripper that waits and one that pulls would look alike
        self._advance((self.expert_phase == 2) & (self.agent.is_grasping(self.drawer_link) | (self.expert_timer >= 5)), 3)
        phase = self.expert_phase
        target = torch.where((phase == 0)[:, None], above, torch.where((phase <= 2)[:, None], at_handle, pulled))
        gripper = torch.where(phase >= 2, -1.0, 1.0).to(self.device)
        self.expert_timer = self.expert_timer + 1
        return pose_action(tcp, target, q_target, gripper)


@register_env(ENV_IDS["close_drawer"], max_episode_steps=MAX_EPISODE_STEPS["close_drawer"])
class CloseDrawerEnv(DrawerEnv):
    """Close the drawer: it starts 60-100% open; success once it is within 1 cm of closed."""

    task = "close_drawer"
    instruction = "close the drawer"
    start_open_range = (0.6, 1.0)

    def evaluate(self):
        opening = self.opening()
        return dict(success=opening <= 0.01, opening=opening)

    def compute_dense_reward(self, obs, action, info):
        # reach the front of the handle (0-1), closing progress (0-3); success = 1 after normalizing by 4
        push_point = self.handle_pos() + 0.03 * self.pull_direction()
        reach = 1 - torch.tanh(5 * torch.linalg.norm(push_point - self.agent.tcp_pose.p, dim=-1))
        progress = 1 - info["opening"] / self.initial_opening.clamp(min=1e-3)
        reward = (reach + 3 * progress.clamp(0, 1)) / 4
        return torch.where(info["success"], torch.ones_like(reward), reward.clamp(max=0.9))

    def expert_action(self) -> torch.Tensor:
        """Closed gripper in front of the handle -> push it along the drawer axis until shut."""
        tcp = self.agent.tcp_pose
        handle, pull = self.handle_pos(), self.pull_direction()
        yaw = nearest_equivalent_yaw(self.cabinet_yaw(), gripper_yaw(tcp.q), np.pi)
        q_target = top_down_quat(yaw)
        front = handle + 0.035 * pull  # just in front of the bar, on the robot's side
        above_front = front + torch.tensor([0, 0, 0.08], device=self.device)
        # the bar's position once closed, and 1 cm beyond it (the joint limit stops the drawer)
        shut = handle - pull * (self.opening()[:, None] + 0.01)
        dist = lambda target: torch.linalg.norm(target - tcp.p, dim=-1)

        self._advance((self.expert_phase == 0) & (dist(above_front) < 0.02), 1)
        self._advance((self.expert_phase == 1) & (dist(front) < 0.015), 2)
        phase = self.expert_phase
        target = torch.where((phase == 0)[:, None], above_front, torch.where((phase == 1)[:, None], front, shut))
        gripper = torch.full_like(tcp.p[:, 0], -1.0)
        self.expert_timer = self.expert_timer + 1
        return pose_action(tcp, target, q_target, gripper)


TASK_CLASSES = {"pick_and_place": PickAndPlaceEnv, "push_cube": PushCubeEnv, "open_drawer": OpenDrawerEnv,
                "close_drawer": CloseDrawerEnv}
REWARD_MODES = {"dense": "normalized_dense", "sparse": "sparse"}  # our name -> ManiSkill's


# --------------------------------------------------------------------------------------------
# 6. Batched env: sub-envs in this process or in worker processes
# --------------------------------------------------------------------------------------------
class LocalEnvs:
    """The sub-envs that live in one process, with their episode bookkeeping (seeds, time limit,
    auto-reset). On the CPU backend each sub-env is its own ManiSkill env (PhysX CPU simulates one
    scene per env); on the GPU backend all of them are one batched physx_cuda env."""

    def __init__(self, task, domain, variant, num_envs, image_size, sim_backend, reward_mode, max_episode_steps,
                 first_seeds, seed_stride, gap=None, wrist_camera=False):
        env_cls = TASK_CLASSES[task]
        kwargs = dict(domain=domain, variant=variant, image_size=image_size, reward_mode=REWARD_MODES[reward_mode],
                      gap=gap, wrist_camera=wrist_camera)
        if sim_backend == "gpu":
            self.envs = [env_cls(num_envs=num_envs, sim_backend="physx_cuda", **kwargs)]
            self.rows = [np.arange(num_envs)]  # rows of the batch that each ManiSkill env holds
        else:
            self.envs = [env_cls(num_envs=1, sim_backend="physx_cpu", **kwargs) for _ in range(num_envs)]
            self.rows = [np.array([i]) for i in range(num_envs)]
        self.num_envs, self.image_size = num_envs, image_size
        self.view_keys = ("image", "wrist_image") if wrist_camera else ("image",)  # the obs keys of the cameras
        self.max_episode_steps, self.seed_stride = max_episode_steps, seed_stride
        self.seeds = np.asarray(first_seeds, dtype=np.int64)  # seed of each sub-env's current episode
        self.next_seeds = self.seeds.copy()
        self.elapsed = np.zeros(num_envs, dtype=np.int64)

    # ---- observation parts ----
    def states(self) -> np.ndarray:
        return np.concatenate([env.robot_state().cpu().numpy() for env in self.envs]).astype(np.float32)

    def views(self, rows=None, front_only: bool = False) -> dict:
        """{obs key: camera images [B, H, W, 3]} of the given rows (all by default); the other rows
        stay zero. front_only: the fixed camera's "image" alone (videos)."""
        wanted = np.zeros(self.num_envs, bool)
        wanted[np.arange(self.num_envs) if rows is None else np.asarray(rows)] = True
        keys = self.view_keys[:1] if front_only else self.view_keys
        out = {key: np.zeros((self.num_envs, self.image_size, self.image_size, 3), np.uint8) for key in keys}
        for env, env_rows in zip(self.envs, self.rows):
            if wanted[env_rows].any():  # a batched GPU env renders all its rows at once
                for key, image in env.render_views(front_only).items():
                    out[key][env_rows] = image.cpu().numpy()
        for image in out.values():
            image[~wanted] = 0
        return out

    def images(self, rows=None) -> np.ndarray:
        """The fixed camera's images of the given rows (all by default); the other rows stay zero."""
        return self.views(rows, front_only=True)["image"]

    def instructions(self) -> list[str]:
        return [text for env in self.envs for text in env.instructions]

    def observation(self, render: bool) -> dict:
        views = self.views() if render else dict.fromkeys(self.view_keys)
        return {**views, "state": self.states(), "instruction": self.instructions()}

    # ---- episodes ----
    def reset_rows(self, rows, seeds):
        """Start new episodes in the given rows with the given seeds."""
        seed_of = {int(r): int(s) for r, s in zip(rows, seeds)}
        for env, env_rows in zip(self.envs, self.rows):
            mine = [k for k, r in enumerate(env_rows) if r in seed_of]  # indices inside this ManiSkill env
            if not mine:
                continue
            options = {} if len(mine) == len(env_rows) else {"env_idx": torch.tensor(mine, device=env.device)}
            env.reset(seed=[seed_of[env_rows[k]] for k in mine], options=options)
        for r, s in seed_of.items():
            self.seeds[r] = s
            self.next_seeds[r] = (s + self.seed_stride) % EVAL_SEED_START  # auto-resets stay on training seeds
            self.elapsed[r] = 0

    def reset(self, seeds=None, rows=None):
        rows = list(range(self.num_envs)) if rows is None else [int(r) for r in rows]
        seeds = self.next_seeds[rows].copy() if seeds is None else np.asarray(seeds, dtype=np.int64)
        self.reset_rows(rows, seeds)
        return self.observation(render=True), {"seed": self.seeds.copy()}

    def dense_reward(self) -> np.ndarray:
        """The normalized dense reward of the current states ([0, 0.9] before success, 1 at it):
        the potential of Stage II's reward shaping, also at a reset state, where no step paid it."""
        out = [env.compute_normalized_dense_reward(None, None, env.evaluate()) for env in self.envs]
        return torch.cat(out).float().cpu().numpy()

    def step(self, actions: np.ndarray, render: bool, auto_reset: bool):
        reward = np.zeros(self.num_envs, np.float32)
        success = np.zeros(self.num_envs, bool)
        for env, env_rows in zip(self.envs, self.rows):
            action = torch.as_tensor(actions[env_rows], dtype=torch.float32, device=env.device)
            _, r, _, _, info = env.step(action)
            reward[env_rows] = r.float().cpu().numpy()
            success[env_rows] = info["success"].cpu().numpy()
        self.elapsed += 1
        terminated = success.copy()  # an episode ends at its first success
        truncated = (self.elapsed >= self.max_episode_steps) & ~terminated
        obs = self.observation(render)
        info = {"success": success, "elapsed_steps": self.elapsed.copy(), "seed": self.seeds.copy()}
        if auto_reset:
            done = np.flatnonzero(terminated | truncated)
            final_obs = {**{key: np.zeros((self.num_envs, self.image_size, self.image_size, 3), np.uint8)
                            for key in self.view_keys},
                         "state": obs["state"].copy(), "instruction": list(obs["instruction"])}
            if len(done):
                last = obs if render else self.views(done)
                for key in self.view_keys:
                    final_obs[key][done] = last[key][done]
                self.reset_rows(list(done), self.next_seeds[done])
                obs["state"][done] = self.states()[done]
                obs["instruction"] = self.instructions()
                if render:
                    first = self.views(done)
                    for key in self.view_keys:
                        obs[key][done] = first[key][done]
            info["final_obs"], info["final_success"] = final_obs, success.copy()
        return obs, reward, terminated, truncated, info

    def expert_action(self) -> np.ndarray:
        return np.concatenate([env.expert_action().cpu().numpy() for env in self.envs]).astype(np.float32)

    def privileged_state(self) -> dict:
        return {"robot_qpos": np.concatenate([env.agent.robot.get_qpos().cpu().numpy() for env in self.envs]),
                "sim_state": np.concatenate([env.get_state().cpu().numpy() for env in self.envs])}

    def close(self):
        for env in self.envs:
            env.close()
        self.envs = []


def _worker_main(conn, local_kwargs: dict):
    """Worker process: owns a LocalEnvs and answers (command, args) messages until "close"."""
    # Ctrl-C in a terminal reaches the whole process group; the parent handles it and closes
    # the workers, so a worker ignores it instead of printing its own traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        local = LocalEnvs(**local_kwargs)
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            command, args = conn.recv()
        except EOFError:  # the parent went away
            local.close()
            return
        try:
            if command == "close":
                local.close()
                conn.send(("ok", None))
                return
            conn.send(("ok", getattr(local, command)(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _concat_obs(parts: list[dict]) -> dict:
    views = {key: None if parts[0][key] is None else np.concatenate([p[key] for p in parts])
             for key in parts[0] if key not in ("state", "instruction")}
    return {**views, "state": np.concatenate([p["state"] for p in parts]),
            "instruction": [text for p in parts for text in p["instruction"]]}


class TwinVecEnv:
    """A batch of `num_envs` sub-envs of one task, domain and variant (see `make_env`).

    reset(seed) -> (obs, info); step(action [B, 7], render=True) -> (obs, reward, terminated,
    truncated, info). obs = {"image": uint8 [B, H, W, 3] or None, "state": float32 [B, 8],
    "instruction": list[str]}, and with wrist_camera "wrist_image" (as "image", of the hand camera).
    terminated = the episode reached success (it ends there); truncated = the time limit was reached without success. info always has "success" (bool [B]),
    "elapsed_steps" and "seed" (the seed of the episode this step belonged to). With auto_reset=True a finished
    sub-env starts its next episode at once, on its next training seed (its seed + num_envs), and
    info also has "final_obs" (full-batch obs dict with the rendered last observation, valid where
    terminated | truncated) and "final_success".
    """

    action_dim = 7
    state_dim = 8

    def __init__(self, task, domain, variant, num_envs, image_size, sim_backend, seed, reward_mode,
                 max_episode_steps, auto_reset, num_workers, gap=None, wrist_camera=False):
        self.task, self.domain, self.variant = task, domain, variant
        self.gap = (0.0 if domain == "sim" else 1.0) if gap is None else float(gap)  # see make_env
        self.num_envs, self.image_size, self.sim_backend = num_envs, image_size, sim_backend
        self.wrist_camera = bool(wrist_camera)
        self.reward_mode, self.auto_reset = reward_mode, auto_reset
        self.control_freq = CONTROL_FREQ
        self.max_episode_steps = max_episode_steps
        if seed is None:  # a random training seed
            seed = int(np.random.default_rng().integers(EVAL_SEED_START - num_envs))
        first_seeds = seed + np.arange(num_envs)
        common = dict(task=task, domain=domain, variant=variant, image_size=image_size, sim_backend=sim_backend,
                      reward_mode=reward_mode, max_episode_steps=max_episode_steps, seed_stride=num_envs, gap=gap,
                      wrist_camera=self.wrist_camera)
        self._local, self._workers = None, []
        if num_workers == 0:
            self._local = LocalEnvs(num_envs=num_envs, first_seeds=first_seeds, **common)
            return
        # contiguous blocks of sub-envs per worker process
        blocks = np.array_split(np.arange(num_envs), num_workers)
        context = mp.get_context("spawn")  # a fresh interpreter: no inherited renderer or torch state
        for rows in blocks:
            parent_end, child_end = context.Pipe()
            kwargs = dict(num_envs=len(rows), first_seeds=first_seeds[rows], **common)
            process = context.Process(target=_worker_main, args=(child_end, kwargs), daemon=True)
            process.start()
            child_end.close()
            self._workers.append((process, parent_end, rows))
        for w in range(len(self._workers)):
            self._receive(w)

    # ---- talking to the worker processes ----
    def _receive(self, w: int):
        process, conn, _ = self._workers[w]
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError(f"env worker {w} (pid {process.pid}) died unexpectedly") from None
        if status == "error":
            raise RuntimeError(f"env worker {w} failed:\n{payload}")
        return payload

    def _call(self, command: str, per_worker_args: list[tuple]):
        for (_, conn, _), args in zip(self._workers, per_worker_args):
            conn.send((command, args))
        return [self._receive(w) for w in range(len(self._workers))]

    # ---- the env API ----
    def reset(self, seed: int | list[int] | None = None, rows: list[int] | None = None) -> tuple[dict, dict]:
        """seed int: sub-env i gets seed + i; list: one seed per sub-env; None: each sub-env's next
        seed (the make_env seed + i at first). rows: reset only these sub-envs (seed then holds one
        seed per row, or None for their next seeds); the others keep their episodes. The returned
        observation is the whole batch's, rendered."""
        if seed is None or rows is not None:
            seeds = None
        elif np.ndim(seed) == 0:
            seeds = int(seed) + np.arange(self.num_envs)
        else:
            seeds = np.asarray(seed, dtype=np.int64)
            if seeds.shape != (self.num_envs,):
                raise ValueError(f"reset got {len(seeds)} seeds for {self.num_envs} sub-envs")
        if seeds is not None and (seeds < 0).any():
            raise ValueError(f"seeds must be non-negative, got {seeds.tolist()}")
        if rows is not None:  # only these sub-envs start a new episode (one seed each)
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            seeds = None if seed is None else np.asarray(seed, dtype=np.int64).reshape(-1)
            if seeds is not None and seeds.shape != rows.shape:
                raise ValueError(f"reset got {len(seeds)} seeds for {len(rows)} rows")
        if self._local is not None:
            return self._local.reset(seeds, rows)
        per_worker = []
        for _, _, block in self._workers:
            if rows is None:
                per_worker.append((None if seeds is None else seeds[block], None))
            else:  # the rows of this worker, as indices into its own block
                mine = np.isin(rows, block)
                per_worker.append((None if seeds is None else seeds[mine], rows[mine] - block[0]))
        results = self._call("reset", per_worker)
        return _concat_obs([obs for obs, _ in results]), {"seed": np.concatenate([i["seed"] for _, i in results])}

    def dense_reward(self) -> np.ndarray:
        """[B] float32: the normalized dense reward of the current states, whatever the reward mode
        (see LocalEnvs.dense_reward)."""
        if self._local is not None:
            return self._local.dense_reward()
        return np.concatenate(self._call("dense_reward", [()] * len(self._workers)))

    def step(self, action: np.ndarray, render: bool = True):
        """One control step for every sub-env. render=False skips the cameras (obs["image"] and
        obs["wrist_image"] are None): use it for all but the last action of a chunk."""
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.num_envs, self.action_dim):
            raise ValueError(f"action must have shape ({self.num_envs}, {self.action_dim}), got {action.shape}")
        if self._local is not None:
            return self._local.step(action, render, self.auto_reset)
        results = self._call("step", [(action[rows], render, self.auto_reset) for _, _, rows in self._workers])
        obs = _concat_obs([r[0] for r in results])
        reward, terminated, truncated = (np.concatenate([r[k] for r in results]) for k in (1, 2, 3))
        info = {key: np.concatenate([r[4][key] for r in results]) for key in ("success", "elapsed_steps", "seed")}
        if self.auto_reset:
            info["final_obs"] = _concat_obs([r[4]["final_obs"] for r in results])
            info["final_success"] = np.concatenate([r[4]["final_success"] for r in results])
        return obs, reward, terminated, truncated, info

    def expert_action(self) -> np.ndarray:
        """[B, 7] scripted-expert actions for the current states (privileged simulator state)."""
        if self._local is not None:
            return self._local.expert_action()
        return np.concatenate(self._call("expert_action", [()] * len(self._workers)))

    def render_frame(self) -> np.ndarray:
        """[B, H, W, 3] uint8 images of the fixed camera, of the current states (e.g. for videos)."""
        if self._local is not None:
            return self._local.images()
        return np.concatenate(self._call("images", [()] * len(self._workers)))

    def render_views(self) -> dict:
        """Every camera's images of the current states, under their obs keys ("image", and
        "wrist_image" with the wrist camera): what a step with render=False left out."""
        if self._local is not None:
            return self._local.views()
        parts = self._call("views", [()] * len(self._workers))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def privileged_state(self) -> dict:
        """Simulator state no policy sees, for tests and debugging: "robot_qpos" [B, 9] and
        "sim_state" [B, D] (ManiSkill's flattened state: poses and velocities of every object,
        joint positions and velocities of every articulation)."""
        if self._local is not None:
            return self._local.privileged_state()
        parts = self._call("privileged_state", [()] * len(self._workers))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def close(self):
        if self._local is not None:
            self._local.close()
            self._local = None
        for process, conn, _ in self._workers:
            try:
                conn.send(("close", ()))
                conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def make_env(task: str, domain: str = "sim", variant: str = "in_distribution", num_envs: int = 1,
             image_size: int = 128, sim_backend: str = "cpu", seed: int | None = None, reward_mode: str = "dense",
             max_episode_steps: int | None = None, auto_reset: bool = False,
             num_workers: int | None = None, gap: float | None = None, wrist_camera: bool = False) -> TwinVecEnv:
    """Build a batch of `num_envs` sub-envs of one twin task.

    task: one of TASKS; domain: "sim" (the twin RL trains in) or "proxy_real" (the stand-in for the
    real robot); variant: "in_distribution", "unseen_objects" or "unseen_states".
    image_size: side of the square camera image. sim_backend: "cpu" (PhysX CPU; with num_envs > 1
    the sub-envs run in `num_workers` worker processes, default min(num_envs, cpu count); 0 keeps
    them all in this process) or "gpu" (one batched physx_cuda env in this process).
    seed: the first reset(None) uses seed + i for sub-env i (random training seeds if None).
    reward_mode: "dense" (normalized to [0, 1], 1 at success) or "sparse" (1 at success, else 0).
    max_episode_steps: time limit (default MAX_EPISODE_STEPS[task]).
    gap: (proxy_real only) how far from the twin, in [0, 1]: every domain parameter and object
    colour is interpolated between sim (0) and proxy_real (1, the default); flags (textures,
    shadows) switch at 0.5 and the action latency is rounded.
    wrist_camera: a second camera on the Panda's hand (obs["wrist_image"], image_size square, the
    same in every domain), for policies that take two views.
    """
    checks = [("task", task, TASKS), ("domain", domain, DOMAINS), ("variant", variant, VARIANTS),
              ("reward_mode", reward_mode, tuple(REWARD_MODES)), ("sim_backend", sim_backend, ("cpu", "gpu"))]
    for what, value, valid in checks:
        if value not in valid:
            raise ValueError(f"unknown {what} {value!r}; valid {what}s: {', '.join(valid)}")
    if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    if not (isinstance(image_size, (int, np.integer)) and 16 <= image_size <= 1024):
        raise ValueError(f"image_size must be an integer in [16, 1024], got {image_size!r}")
    if gap is not None and (domain != "proxy_real" or not 0.0 <= gap <= 1.0):
        raise ValueError(f"gap must lie in [0, 1] and applies to the proxy_real domain only, got gap={gap!r} "
                         f"for domain {domain!r}")
    if seed is not None and not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    max_episode_steps = MAX_EPISODE_STEPS[task] if max_episode_steps is None else int(max_episode_steps)
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
    if num_workers is None:
        num_workers = 0 if (num_envs == 1 or sim_backend == "gpu") else min(num_envs, os.cpu_count() or 1)
    if sim_backend == "gpu":
        num_workers = 0  # one batched GPU env lives in this process
    if not 0 <= num_workers <= num_envs:
        raise ValueError(f"num_workers must be in [0, num_envs={num_envs}], got {num_workers}")
    return TwinVecEnv(task, domain, variant, num_envs, image_size, sim_backend, seed, reward_mode,
                      max_episode_steps, auto_reset, num_workers, gap, wrist_camera)


# --------------------------------------------------------------------------------------------
# 7. The success-rate rollout: every success rate the project reports comes from here
# --------------------------------------------------------------------------------------------
def decision_key(episode_seed: int, decision: int) -> int:
    """A number that names one decision of one evaluation episode. A policy that draws noise at
    evaluation (pi0.5's x0) seeds it with this key, so an episode's actions depend on its seed
    alone: not on the batch it runs in, the number of sub-envs, or the caller."""
    return (int(episode_seed) * 1_000_003 + int(decision)) % 2**62


def evaluate_success(env: TwinVecEnv, act_fn, seeds: list[int], exec_horizon: int | None = None,
                     video_seeds: int = 0, progress=None) -> tuple[list[dict], dict]:
    """One episode per seed (the initial state is a function of the seed: identical for every
    method evaluated on the same seeds), in batches of env.num_envs.

    act_fn(obs, keys) -> actions [B, H, 7] in the robot's action space, keys[i] =
    decision_key(seed of sub-env i, its decision index). At each decision the first exec_horizon
    actions of the chunk (all H if None) are executed; the camera renders only at decision
    points. An episode ends at its first success or at the time limit; a finished sub-env is held
    (zero actions, not counted) until its batch is done, and the spare sub-envs of a short last
    batch replay its last seed and are dropped. progress(n) is called after each batch.

    Returns per-episode records {"seed", "success", "steps"} in seed order and {seed: frames} for
    the first `video_seeds` seeds (one frame per decision, plus the last state)."""
    B = env.num_envs
    records, videos = [], {}
    for start in range(0, len(seeds), B):
        batch = [int(s) for s in seeds[start:start + B]]
        n = len(batch)
        batch_seeds = batch + [batch[-1]] * (B - n)
        obs, _ = env.reset(seed=batch_seeds)
        done = np.zeros(B, bool)
        done[n:] = True
        success = np.zeros(B, bool)
        steps = np.zeros(B, int)
        film = [i for i in range(n) if start + i < video_seeds]
        for i in film:
            videos[batch[i]] = []
        decision = 0
        while not done.all():
            for i in film:
                if not done[i]:
                    videos[batch[i]].append(np.asarray(obs["image"][i]))
            keys = [decision_key(s, decision) for s in batch_seeds]
            chunk = np.asarray(act_fn(obs, keys), np.float32)
            if chunk.ndim != 3 or chunk.shape[0] != B or chunk.shape[2] != env.action_dim:
                raise ValueError(f"the policy returned actions of shape {chunk.shape}, expected [{B}, H, 7]")
            n_exec = chunk.shape[1] if exec_horizon is None else min(int(exec_horizon), chunk.shape[1])
            for j in range(n_exec):
                action = np.where(done[:, None], 0.0, chunk[:, j]).astype(np.float32)
                obs, _, terminated, truncated, info = env.step(action, render=j == n_exec - 1)
                live = ~done
                success |= live & np.asarray(info["success"], bool)
                steps += live
                finished = live & (np.asarray(terminated, bool) | np.asarray(truncated, bool))
                done |= finished
                if any(finished[i] for i in film):
                    frame = env.render_frame()
                    for i in film:
                        if finished[i]:
                            videos[batch[i]].append(frame[i])
                if done.all():
                    break
            if obs["image"] is None and not done.all():  # an episode ended mid-chunk: render the others
                obs = {**obs, **env.render_views()}
            decision += 1
        records += [{"seed": batch[i], "success": bool(success[i]), "steps": int(steps[i])} for i in range(n)]
        if progress is not None:
            progress(n)
    return records, videos
