"""The two VLA policy families of RL-Co and what RL needs from them.

openvla  OpenVLA (Kim et al. 2024): fused DINOv2 + SigLIP patch features -> 3-layer MLP projector ->
         Llama causal LM. Each action dimension is one token (256 bins on [-1, 1], the last 256 ids
         of the tokenizer's vocabulary). RL by PPO as in RL4VLA: sampled action tokens, their
         log-probability under the softmax restricted to the 256 action ids, a value head on the
         hidden state just before the first action token.
pi05     pi0.5 (Physical Intelligence 2025): PaliGemma prefix (SigLIP + Gemma) whose keys/values the
         Gemma action expert attends to layer by layer; time enters the expert through adaptive
         RMSNorm; the robot state is written into the prompt as 256-bin tokens. Flow matching for
         SFT; RL by ReinFlow (Zhang et al. 2025): every Euler step adds Gaussian noise whose std a
         noise head predicts, so the whole denoising chain has an exact log-probability.

Both are built from transformers' modules (LlamaForCausalLM, PaliGemmaModel, GemmaAttention,
GemmaMLP); the timm-layout ViTs of OpenVLA are written out here because OpenVLA stores them with
fused qkv weights that no transformers vision model has. Each kind has a `tiny` random-init
configuration for a CPU and a `full` one with the published sizes that loads openvla/openvla-7b or
LeRobot's pi05_base (see PUBLISHED_NAME_MAP below for the tensor-name mapping).

Interface (docs/interfaces.md): make_policy, load_policy, Policy.save / sft_loss / act / evaluate.
"""

import json
import math
import re
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GemmaConfig, LlamaConfig, LlamaForCausalLM, PaliGemmaConfig, SiglipVisionConfig
from transformers.models.gemma.modeling_gemma import GemmaAttention, GemmaMLP, apply_rotary_pos_emb
from transformers.models.paligemma.modeling_paligemma import PaliGemmaModel

KINDS = ("openvla", "pi05")
SIZES = ("tiny", "full")

# OpenVLA's prompt (openvla/openvla README; RL4VLA uses the same); the instruction is lower-cased.
OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
# pi0.5's prompt with the discretised state (openpi PaligemmaTokenizer.tokenize, pi05 format).
PI05_PROMPT = "Task: {instruction}, State: {state};\nAction: "

NUM_ACTION_BINS = 256  # OpenVLA action tokens and pi0.5 state tokens both use 256 bins on [-1, 1]

# ImageNet statistics for DINOv2's input; SigLIP takes pixels scaled to [-1, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_chunk_size(kind: str) -> int:
    """Action-chunk length H a new policy of this kind predicts unless told otherwise."""
    return {"openvla": 1, "pi05": 4}[_check_kind(kind)]


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown policy kind {kind!r}; choose one of {KINDS}")
    return kind


# ------------------------------------------------------------------------------------------------
# Architecture configurations. Everything a policy needs to be rebuilt lives in one flat dict
# (config["model"]); make_policy(**overrides) may change any of its keys.
# ------------------------------------------------------------------------------------------------

def _model_defaults(kind: str, size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    if kind == "openvla":
        common = dict(
            gradient_checkpointing=False,  # recompute each transformer layer in backward (less memory)
            temperature=1.0,      # sampling temperature of the action tokens (RL4VLA: 1.0 in rollouts)
            unnorm_key=None,      # full size: dataset whose published action statistics to use
            value_hidden=(512, 128),  # RL4VLA's value head: hidden -> 512 -> 128 -> 1
        )
        if size == "tiny":
            # ~2.5M parameters, 16 image patches per backbone, a 2-layer Llama
            return dict(common, image_size=64, patch_size=16,
                        dino_width=96, dino_depth=2, dino_heads=4, dino_mlp=384, dino_registers=4,
                        siglip_width=96, siglip_depth=2, siglip_heads=4, siglip_mlp=384,
                        llm_width=256, llm_depth=2, llm_heads=4, llm_mlp=512, rms_norm_eps=1e-6,
                        vocab_size=None, action_token_end=None, bos_token_id=None, pad_token_id=None,
                        prompt_end_ids=[], lora_rank=0, dtype="float32")
        # openvla/openvla-7b: DINOv2 ViT-L/14 (4 registers) + SigLIP So400m/14 at 224 px, Llama-2 7B.
        # OpenVLA reads the output of each ViT's second-to-last block, so of the 24 / 27 published
        # blocks we build and run 23 / 26 (the last block, final norm and SigLIP's attention-pool head
        # are stored in the checkpoint but never used: see _unused_published_patterns).
        return dict(common, image_size=224, patch_size=14,
                    dino_width=1024, dino_depth=23, dino_heads=16, dino_mlp=4096, dino_registers=4,
                    siglip_width=1152, siglip_depth=26, siglip_heads=16, siglip_mlp=4304,
                    llm_width=4096, llm_depth=32, llm_heads=32, llm_mlp=11008,
                    rms_norm_eps=1e-6,    # what openvla-7b's config.json gives LlamaConfig
                    vocab_size=32064,     # Llama's 32000 padded to a multiple of 64 (<PAD> = 32000)
                    action_token_end=32000,  # action tokens are ids 31744..31999 (RL4VLA)
                    bos_token_id=1, pad_token_id=32000,
                    prompt_end_ids=[29871],  # OpenVLA's predict_action appends the "▁" token
                    lora_rank=32, dtype="bfloat16")
    if kind == "pi05":
        common = dict(
            gradient_checkpointing=False,  # recompute each transformer layer in backward (less memory)
            min_period=4e-3, max_period=4.0,  # sinusoidal time embedding (openpi)
            num_steps=4,          # K: Euler steps of the denoising chain, sampled (ReinFlow) and noise-free alike
            sigma_min=0.08, sigma_max=0.16,  # noise-std bounds (RLinf's flow_noise defaults)
            noise_steps=None,     # the denoising steps that draw that noise (None: all K); Stage II's --noise-steps
            noise_hidden=128, value_hidden=(512, 128),
            # openpi's Pi0Config.discrete_state_input: True (pi0.5) writes the state into the prompt
            # as 256-bin tokens; False gives pi0.5 no state at all (its prompt is pi0's text format)
            discrete_state_input=True,
            # which state dimensions the prompt carries (None: all 8). A lever of the miniature, not
            # of openpi: (3, 4, 5, 6, 7) gives the tcp orientation and the gripper but not the tcp
            # position, from which the demos can be fit without reading the image
            state_input_dims=None,
            # the value head also reads the normalised robot state (all dims), beside the pooled
            # prefix: an asymmetric critic for a policy that does not read the state. Not openpi
            # or RLinf (their critic reads what the actor reads); set by Stage II's --critic-state
            value_state_input=False,
            # the value head also reads the task's shaping potential phi(s) (envs: the normalised
            # dense reward, privileged sim state that obs["potential"] carries in Stage II's
            # rollouts): with potential-based shaping the critic fits V - phi. Set by --critic-potential
            value_potential_input=False,
            # a second camera view, from the Panda's hand (obs["wrist_image"]; envs' wrist_camera),
            # embedded like the first and put beside it in the prefix, as openpi's left_wrist_0_rgb
            wrist_camera=False,
        )
        if size == "tiny":
            # ~2.2M parameters, 16 image tokens, 2-layer Gemma VLM and expert
            return dict(common, image_size=64, patch_size=16,
                        vision_width=96, vision_depth=2, vision_heads=4, vision_mlp=384,
                        vlm_width=256, vlm_depth=2, vlm_mlp=512, num_heads=4, num_kv_heads=1,
                        head_dim=64, expert_width=128, expert_mlp=256,
                        max_state_dim=None, max_action_dim=None,  # None: state_dim / action_dim
                        vocab_size=None, bos_token_id=None, pad_token_id=None,
                        train_expert_only=False, dtype="float32")
        # LeRobot pi05_base: SigLIP So400m/14 at 224 px, Gemma 2B (width 2048, 18 layers, 8 heads,
        # 1 KV head, head dim 256), Gemma 300M action expert (width 1024, MLP 4096); state and
        # actions padded to 32 dims.
        return dict(common, image_size=224, patch_size=14,
                    vision_width=1152, vision_depth=27, vision_heads=16, vision_mlp=4304,
                    vlm_width=2048, vlm_depth=18, vlm_mlp=16384, num_heads=8, num_kv_heads=1,
                    head_dim=256, expert_width=1024, expert_mlp=4096,
                    max_state_dim=32, max_action_dim=32,
                    vocab_size=257152, bos_token_id=2, pad_token_id=0,
                    train_expert_only=True,  # RLinf trains the expert and heads, VLM frozen
                    dtype="bfloat16")
    raise ValueError(f"unknown policy kind {kind!r}; choose one of {KINDS}")


# ------------------------------------------------------------------------------------------------
# Tokenizer of the tiny policies
# ------------------------------------------------------------------------------------------------

class WordTokenizer:
    """Word-level tokenizer for the tiny policies: lower-cased words and punctuation marks.

    Its vocabulary is built from the prompts the policy will see (the task instructions put into
    the kind's prompt template) and stored in the checkpoint; unknown words map to <unk>. It has the
    two methods of a transformers tokenizer that the policies use: encode() and the special ids.
    """

    SPECIALS = ("<pad>", "<unk>", "<bos>")
    pad_token_id, unk_token_id, bos_token_id = 0, 1, 2

    def __init__(self, vocab):
        self.vocab = list(vocab)
        if tuple(self.vocab[:3]) != self.SPECIALS:
            raise ValueError(f"a word vocabulary starts with {self.SPECIALS}")
        self.ids = {word: i for i, word in enumerate(self.vocab)}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text.lower())

    @classmethod
    def build(cls, texts, tail_tokens=()):
        """Vocabulary = specials + the sorted words of `texts` + `tail_tokens` (kept last, in order)."""
        words = sorted({w for text in texts for w in cls.split(text)} - set(tail_tokens))
        return cls(list(cls.SPECIALS) + words + list(tail_tokens))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.ids.get(w, self.unk_token_id) for w in self.split(text)]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def __len__(self):
        return len(self.vocab)


def _tiny_tokenizer(kind: str, instructions) -> WordTokenizer:
    instructions = list(instructions) or ["do the task"]
    if kind == "openvla":
        texts = [OPENVLA_PROMPT.format(instruction=i.lower()) for i in instructions]
        # the 256 action tokens are the last ids of the vocabulary, as in OpenVLA
        return WordTokenizer.build(texts, tail_tokens=[f"<act_{i}>" for i in range(NUM_ACTION_BINS)])
    state_words = " ".join(str(b) for b in range(NUM_ACTION_BINS))
    texts = [PI05_PROMPT.format(instruction=i, state=state_words) for i in instructions]
    return WordTokenizer.build(texts)


# ------------------------------------------------------------------------------------------------
# Pieces shared by both kinds
# ------------------------------------------------------------------------------------------------

def make_value_head(width: int, hidden=(512, 128)) -> nn.Sequential:
    """RL4VLA's critic: MLP hidden -> 512 -> 128 -> 1 with GELU."""
    return nn.Sequential(nn.Linear(width, hidden[0]), nn.GELU(), nn.Linear(hidden[0], hidden[1]),
                         nn.GELU(), nn.Linear(hidden[1], 1))


def _images_to_pixels(image, size: int, device) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or torch) -> float [B, 3, size, size] in [0, 1] (plain resize, as
    OpenVLA's "resize-naive"; pi0.5 pads to a square first, which is the same for square cameras)."""
    x = torch.as_tensor(image)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"obs['image'] must be uint8 [B, H, W, 3], got shape {tuple(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _stats_or_identity(stats: dict | None, dim: int, what: str):
    """(q01, q99) of one feature, or (-1, 1) (identity on [-1, 1]) without statistics."""
    if stats is None:
        return torch.full((dim,), -1.0), torch.ones(dim)
    q01, q99 = torch.tensor(stats["q01"], dtype=torch.float32), torch.tensor(stats["q99"], dtype=torch.float32)
    if q01.shape != (dim,) or q99.shape != (dim,):
        raise ValueError(f"norm_stats['{what}'] has {len(stats['q01'])} dims but the policy has {dim}")
    return q01, q99


def _gaussian_log_prob(x, mean, std):
    """Elementwise log N(x; mean, std^2)."""
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _checkpointed_forward(self, *args, **kwargs):
    if self.checkpointing and torch.is_grad_enabled():
        return checkpoint(self.inner_forward, *args, use_reentrant=False, **kwargs)
    return self.inner_forward(*args, **kwargs)


def _make_checkpointable(layer: nn.Module, forward=None):
    """Give `layer` a forward (default: its class's) that runs under activation checkpointing when
    layer.checkpointing is set and gradients are on, whether the model is in train or eval mode
    (Stage II updates in eval mode). The checkpoint sits inside forward, not around the module call,
    so module hooks (FSDP2's all-gather) stay outside it and run once. Bound methods, not closures:
    a deep copy of the policy calls its own layers."""
    layer.checkpointing = False
    layer.inner_forward = types.MethodType(forward or type(layer).forward, layer)
    layer.forward = types.MethodType(_checkpointed_forward, layer)


class Policy(nn.Module):
    """Base of both kinds: configuration, normalisation, tokenisation, parameter groups, save()."""

    kind = None

    def __init__(self, config: dict, tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.chunk_size = int(config["chunk_size"])
        self.action_dim = int(config["action_dim"])
        self.state_dim = int(config["state_dim"])
        norm = config.get("norm_stats") or {}
        # Actions map q01/q99 -> [-1, 1] (OpenVLA's BOUNDS_Q99); the state the same way (pi0.5's
        # quantile normalisation, which its 256-bin state tokens need; OpenVLA ignores the state).
        a_lo, a_hi = _stats_or_identity(norm.get("action"), self.action_dim, "action")
        s_lo, s_hi = _stats_or_identity(norm.get("observation.state"), self.state_dim, "observation.state")
        self.register_buffer("action_q01", a_lo, persistent=False)
        self.register_buffer("action_q99", a_hi, persistent=False)
        self.register_buffer("state_q01", s_lo, persistent=False)
        self.register_buffer("state_q99", s_hi, persistent=False)

    # ---- normalisation ----
    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        span = (self.action_q99 - self.action_q01).clamp(min=1e-8)
        return (2 * (actions - self.action_q01) / span - 1).clamp(-1, 1)

    def denormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions.clamp(-1, 1) + 1) / 2 * (self.action_q99 - self.action_q01) + self.action_q01

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        span = (self.state_q99 - self.state_q01).clamp(min=1e-8)
        return (2 * (state - self.state_q01) / span - 1).clamp(-1, 1)

    # ---- evaluation protocol ----
    @property
    def exec_horizon(self) -> int:
        """Actions of each chunk executed before the next decision, as the policy was trained
        (Stage II may execute fewer than the chunk; evaluation then does the same)."""
        return int(self.config.get("exec_horizon") or self.chunk_size)

    def protocol(self, deterministic: bool = True) -> str:
        """The sampler an evaluation used, in words, for its records and table captions."""
        H, n = self.chunk_size, self.exec_horizon
        if self.kind == "openvla":
            how = "greedy action tokens" if deterministic else \
                f"action tokens sampled at temperature {self.config['model']['temperature']:g}"
        else:
            K = self.config["model"]["num_steps"]
            how = (f"noise-free flow ODE, K={K} Euler steps, fresh x0 per decision" if deterministic
                   else f"ReinFlow noisy chain, K={K}, "
                        + (f"noise at steps {self.noisy_steps(K)}, " if self.config["model"].get("noise_steps") else "")
                        + f"sigma in [{self.config['model']['sigma_min']:g}, {self.config['model']['sigma_max']:g}]")
        return f"{how}; chunk {H}, {n} executed"

    # ---- helpers ----
    @property
    def device(self) -> torch.device:
        return self.action_q01.device

    def _autocast(self):
        # bf16 autocast on a GPU always; on a CPU only when the config dtype is bf16 (the full
        # sizes: frozen bf16 weights meet fp32 activations and fp32 trainable weights), so fp32
        # policies (the tiny ones) stay exactly fp32 there
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config["model"]["dtype"] == "bfloat16")

    @property
    def view_keys(self) -> tuple:
        """The obs keys of the camera views the policy reads: the fixed camera, and the wrist camera
        where the config asks for it (pi0.5 only)."""
        return ("image", "wrist_image") if self.config["model"].get("wrist_camera") else ("image",)

    def _obs(self, obs):
        missing = [key for key in self.view_keys if obs.get(key) is None]
        if missing:
            raise ValueError(f"the policy reads the camera views {list(self.view_keys)}, but obs lacks {missing}"
                             + (" (make the env with wrist_camera=True)" if "wrist_image" in missing else ""))
        views = [obs[key] for key in self.view_keys]
        state = torch.as_tensor(obs["state"], dtype=torch.float32).to(self.device)
        instructions = [str(s) for s in obs["instruction"]]
        if state.shape != (len(instructions), self.state_dim):
            raise ValueError(f"obs['state'] must be [B, {self.state_dim}], got {tuple(state.shape)}")
        return views, state, instructions

    def _encode_left_padded(self, token_lists):
        """Left-pad token id lists -> ids [B, T], mask [B, T] (1 = real token)."""
        length = max(len(t) for t in token_lists)
        ids = torch.full((len(token_lists), length), self.config["model"]["pad_token_id"], dtype=torch.long)
        mask = torch.zeros((len(token_lists), length), dtype=torch.long)
        for row, tokens in enumerate(token_lists):
            if tokens:
                ids[row, length - len(tokens):] = torch.tensor(tokens)
                mask[row, length - len(tokens):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ---- transformer layers: activation checkpointing, FSDP units ----
    def transformer_layers(self) -> list:
        """Every transformer layer (ViT blocks, LM / expert decoder layers), in forward order: the
        units of activation checkpointing and of FSDP sharding."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool):
        """Recompute each transformer layer's activations in backward instead of keeping them
        (config key gradient_checkpointing; saved with the checkpoint). Gradients are unchanged."""
        self.config["model"]["gradient_checkpointing"] = bool(enabled)
        for layer in self.transformer_layers():
            layer.checkpointing = bool(enabled)

    # ---- parameter groups (Stage II uses separate learning rates for the critic) ----
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def actor_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("value_head.")]

    def critic_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and n.startswith("value_head.")]

    # ---- checkpoint ----
    def save(self, path, extra: dict | None = None):
        """Write config.json + model.safetensors (+ tokenizer/ for the full sizes) to `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dict(self.config)
        if extra is not None:
            config["extra"] = extra
        if not isinstance(self.tokenizer, WordTokenizer):
            self.tokenizer.save_pretrained(path / "tokenizer")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(config, indent=2))
        self.config = config


# ------------------------------------------------------------------------------------------------
# openvla
# ------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels):
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, num_patches, width]


class FusedQKVAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ViTMLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """DINOv2's LayerScale; OpenVLA stores gamma as `scale_factor`."""

    def __init__(self, width, init=0.1):  # init only matters for random init
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((width,), init))

    def forward(self, x):
        return x * self.scale_factor


class ViTBlock(nn.Module):
    def __init__(self, width, heads, mlp, layer_scale):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = FusedQKVAttention(width, heads)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = ViTMLP(width, mlp)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmViT(nn.Module):
    """A ViT with timm's parameter layout, as OpenVLA's checkpoint stores its two backbones.

    DINOv2 (`vit_large_patch14_reg4_dinov2`): class token + 4 register tokens, LayerScale, and the
    position embedding added to the patch tokens only (timm's no_embed_class). SigLIP
    (`vit_so400m_patch14_siglip_224`): neither. forward() returns the patch tokens after the last
    built block, without the final norm: OpenVLA's `get_intermediate_layers(n={depth - 2})`.
    """

    def __init__(self, image_size, patch_size, width, depth, heads, mlp, registers=0, dino=False):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if dino else None
        self.reg_token = nn.Parameter(torch.zeros(1, registers, width)) if dino and registers else None
        self.num_prefix_tokens = (1 + registers) if dino else 0
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp, layer_scale=dino) for _ in range(depth))

    def forward(self, pixels):
        x = self.patch_embed(pixels) + self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x[:, self.num_prefix_tokens:]


class FusedMLPProjector(nn.Module):
    """OpenVLA's "fused-gelu-mlp": fused patch dim -> 4x -> LLM width -> LLM width."""

    def __init__(self, vision_width, llm_width):
        super().__init__()
        self.fc1 = nn.Linear(vision_width, 4 * vision_width)
        self.fc2 = nn.Linear(4 * vision_width, llm_width)
        self.fc3 = nn.Linear(llm_width, llm_width)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class OpenVLAPolicy(Policy):
    """OpenVLA with a value head; actions are H x A tokens sampled from the 256 action ids."""

    kind = "openvla"

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        m = config["model"]
        self.vision_backbone = nn.ModuleDict({
            "dino": TimmViT(m["image_size"], m["patch_size"], m["dino_width"], m["dino_depth"],
                            m["dino_heads"], m["dino_mlp"], m["dino_registers"], dino=True),
            "siglip": TimmViT(m["image_size"], m["patch_size"], m["siglip_width"], m["siglip_depth"],
                              m["siglip_heads"], m["siglip_mlp"]),
        })
        self.projector = FusedMLPProjector(m["dino_width"] + m["siglip_width"], m["llm_width"])
        self.language_model = LlamaForCausalLM(LlamaConfig(
            vocab_size=m["vocab_size"], hidden_size=m["llm_width"], intermediate_size=m["llm_mlp"],
            num_hidden_layers=m["llm_depth"], num_attention_heads=m["llm_heads"],
            num_key_value_heads=m["llm_heads"], rms_norm_eps=m["rms_norm_eps"],
            max_position_embeddings=2048, pad_token_id=m["pad_token_id"], bos_token_id=m["bos_token_id"],
            tie_word_embeddings=False))
        self.value_head = make_value_head(m["llm_width"], m["value_hidden"])
        for layer in self.transformer_layers():
            _make_checkpointable(layer)
        self.set_gradient_checkpointing(m.get("gradient_checkpointing", False))
        edges = torch.linspace(-1, 1, NUM_ACTION_BINS)
        self.register_buffer("bin_edges", edges, persistent=False)
        self.register_buffer("bin_centers", (edges[:-1] + edges[1:]) / 2, persistent=False)

    def transformer_layers(self):
        return [*self.vision_backbone["dino"].blocks, *self.vision_backbone["siglip"].blocks,
                *self.language_model.model.layers]

    # ---- action tokens (OpenVLA ActionTokenizer) ----
    @property
    def action_ids(self) -> tuple[int, int]:
        """[lo, hi): the 256 action token ids."""
        end = self.config["model"]["action_token_end"]
        return end - NUM_ACTION_BINS, end

    def actions_to_tokens(self, actions_norm: torch.Tensor) -> torch.Tensor:
        """[..., A] in [-1, 1] -> token ids. OpenVLA: token = vocab - digitize(a, 256 edges)."""
        bins = torch.bucketize(actions_norm.clamp(-1, 1).contiguous(), self.bin_edges, right=True)  # = np.digitize
        return self.action_ids[1] - bins

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> bin centres in [-1, 1] (OpenVLA: centre index clip(vocab - token - 1, 0, 254))."""
        index = (self.action_ids[1] - tokens - 1).clamp(0, NUM_ACTION_BINS - 2)
        return self.bin_centers[index]

    # ---- sequence: [BOS, image patches, prompt tokens (left-padded), action tokens] ----
    def _prefix(self, image, instructions):
        """Embeddings and mask of everything before the first action token."""
        m = self.config["model"]
        pixels = _images_to_pixels(image, m["image_size"], self.device)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=self.device)[:, None, None]
        patches = torch.cat([self.vision_backbone["dino"]((pixels - mean) / std),
                             self.vision_backbone["siglip"](pixels * 2 - 1)], dim=-1)
        patch_embeds = self.projector(patches)
        prompts = [self.tokenizer.encode(OPENVLA_PROMPT.format(instruction=i.lower()), add_special_tokens=False)
                   + list(m["prompt_end_ids"]) for i in instructions]
        text_ids, text_mask = self._encode_left_padded(prompts)
        embed = self.language_model.get_input_embeddings()
        B = len(instructions)
        bos = embed(torch.full((B, 1), m["bos_token_id"], device=self.device))
        # pads sit between the patches and the prompt: the mask hides them and the position ids
        # skip them, so every row sees the same sequence as unpadded OpenVLA, and the action
        # tokens of all rows start at the same index
        embeds = torch.cat([bos, patch_embeds.to(bos.dtype), embed(text_ids)], dim=1)
        mask = torch.cat([torch.ones(B, 1 + patch_embeds.shape[1], dtype=torch.long, device=self.device),
                          text_mask], dim=1)
        return embeds, mask

    def _teacher_forced(self, image, instructions, tokens):
        """Logits [B, N, V] that predict the N action tokens, and the value [B]."""
        embeds, mask = self._prefix(image, instructions)
        prefix_len = embeds.shape[1]
        embeds = torch.cat([embeds, self.language_model.get_input_embeddings()(tokens)], dim=1)
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                           use_cache=False).last_hidden_state
        # position p predicts token p + 1: the N action tokens come from positions prefix_len - 1 ...
        logits = self.language_model.lm_head(hidden[:, prefix_len - 1: prefix_len - 1 + tokens.shape[1]])
        value = self.value_head(hidden[:, prefix_len - 1].float()).squeeze(-1)
        return logits.float(), value.float()

    def _restricted_log_probs(self, logits):
        """log-softmax over the 256 action ids at the sampling temperature."""
        lo, hi = self.action_ids
        return torch.log_softmax(logits[..., lo:hi].float() / self.config["model"]["temperature"], dim=-1)

    def sft_loss(self, batch, generator=None):
        """Cross-entropy of the action tokens (full vocabulary, as OpenVLA trains), valid steps only."""
        (image,), _, instructions = self._obs(batch)
        H, A = self.chunk_size, self.action_dim
        actions = torch.as_tensor(batch["actions"]).to(self.device, torch.float32)[:, :H]
        tokens = self.actions_to_tokens(self.normalize_actions(actions)).reshape(len(instructions), H * A)
        step_mask = batch.get("action_mask")
        step_mask = (torch.ones(actions.shape[:2], dtype=torch.bool) if step_mask is None
                     else torch.as_tensor(step_mask)[:, :H]).to(self.device)
        token_mask = step_mask.repeat_interleave(A, dim=1).float()
        with self._autocast():
            logits, _ = self._teacher_forced(image, instructions, tokens)
        ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view_as(token_mask)
        return (ce * token_mask).sum() / token_mask.sum().clamp(min=1)

    @torch.no_grad()
    def act(self, obs, deterministic=False, generator: torch.Generator | None = None, x0_seeds=None):
        """Sample H x A action tokens one by one (KV cache), restricted to the 256 action ids.
        (x0_seeds: accepted for the common act_fn signature; token decoding draws no x0.)

        deterministic: greedy (argmax). logprob = sum of the token log-probs under the restricted
        softmax at config temperature (also for greedy tokens). value: value head on the last hidden
        state just before the first action token (RL4VLA).
        """
        (image,), _, instructions = self._obs(obs)
        B, N = len(instructions), self.chunk_size * self.action_dim
        lo, _ = self.action_ids
        embed = self.language_model.get_input_embeddings()
        with self._autocast():
            embeds, mask = self._prefix(image, instructions)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            out = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                            use_cache=True)
            hidden = out.last_hidden_state[:, -1]
            value = self.value_head(hidden.float()).squeeze(-1).float()
            next_position = positions[:, -1:] + 1
            tokens, token_logprobs = [], []
            for i in range(N):
                log_probs = self._restricted_log_probs(self.language_model.lm_head(hidden))
                if deterministic:
                    index = log_probs.argmax(-1)
                elif generator is None:
                    index = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
                else:
                    index = torch.multinomial(log_probs.exp().to(generator.device), 1,
                                              generator=generator).squeeze(-1).to(self.device)
                token_logprobs.append(log_probs.gather(-1, index[:, None]).squeeze(-1))
                tokens.append(index + lo)
                if i == N - 1:
                    break
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=self.device)], dim=1)
                out = self.language_model.model(inputs_embeds=embed(tokens[-1][:, None]), attention_mask=mask,
                                                position_ids=next_position, cache=out.cache, use_cache=True)
                hidden = out.last_hidden_state[:, -1]
                next_position = next_position + 1
        tokens = torch.stack(tokens, dim=1)
        actions = self.tokens_to_actions(tokens).view(B, self.chunk_size, self.action_dim)
        step_logprob = torch.stack(token_logprobs, dim=1).view(B, self.chunk_size, self.action_dim).sum(-1)
        return {"actions": self.denormalize_actions(actions).float(), "logprob": step_logprob.sum(-1),
                "step_logprob": step_logprob, "value": value, "action_tokens": tokens}

    def evaluate(self, obs, act_out):
        """Teacher-forced log-prob (same as act's), mean per-token entropy, value; with gradients.
        step_logprob / step_entropy [B, H]: the sum of the log-probs / the mean entropy of the
        A tokens of each chunk step (Stage II masks the steps that were never executed)."""
        (image,), _, instructions = self._obs(obs)
        tokens = torch.as_tensor(act_out["action_tokens"]).to(self.device, torch.long)
        B = tokens.shape[0]
        with self._autocast():
            logits, value = self._teacher_forced(image, instructions, tokens)
        log_probs = self._restricted_log_probs(logits)
        lo, _ = self.action_ids
        token_logprob = log_probs.gather(-1, (tokens - lo)[..., None]).squeeze(-1)
        token_entropy = -(log_probs.exp() * log_probs).sum(-1)
        step_logprob = token_logprob.view(B, self.chunk_size, self.action_dim).sum(-1)
        step_entropy = token_entropy.view(B, self.chunk_size, self.action_dim).mean(-1)
        return {"logprob": step_logprob.sum(-1), "entropy": token_entropy.mean(-1), "value": value,
                "step_logprob": step_logprob, "step_entropy": step_entropy}

    def configure_training(self):
        """LoRA on the LM's linear layers (peft) when lora_rank > 0: then only the adapters and the
        value head train (as RL4VLA); otherwise everything trains."""
        rank = int(self.config["model"]["lora_rank"])
        if rank > 0 and not any("lora_" in n for n, _ in self.named_parameters()):
            from peft import LoraConfig, inject_adapter_in_model
            # OpenVLA's LoRA recipe: alpha = min(rank, 16), no dropout (dropout would make act and
            # evaluate disagree)
            lora = LoraConfig(r=rank, lora_alpha=min(rank, 16), lora_dropout=0.0, init_lora_weights="gaussian",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"])
            inject_adapter_in_model(lora, self.language_model)
        for name, p in self.named_parameters():
            p.requires_grad_(rank == 0 or "lora_" in name or name.startswith("value_head."))


# ------------------------------------------------------------------------------------------------
# pi05
# ------------------------------------------------------------------------------------------------

class AdaRMSNorm(nn.Module):
    """pi0.5's adaptive RMSNorm: scale, shift and a residual gate regressed from the time
    embedding (openpi gemma_pytorch, LeRobot pi_gemma.PiGemmaRMSNorm)."""

    def __init__(self, width, cond_width, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_width, 3 * width)
        nn.init.zeros_(self.dense.weight)  # as openpi: starts as a plain RMSNorm with learned bias

    def forward(self, x, cond):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate


class ExpertLayer(nn.Module):
    """A Gemma decoder layer of the action expert: Gemma attention and MLP, adaptive norms."""

    def __init__(self, config: GemmaConfig, index: int):
        super().__init__()
        self.self_attn = GemmaAttention(config, index)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = AdaRMSNorm(config.hidden_size, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = AdaRMSNorm(config.hidden_size, config.hidden_size, config.rms_norm_eps)


class ActionExpert(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = AdaRMSNorm(config.hidden_size, config.hidden_size, config.rms_norm_eps)


def gemma_layer(layer, x, cos, sin, mask, past_kv=None, cond=None):
    """One Gemma decoder layer, written out so that two models can share attention.

    past_kv: keys/values [B, kv_heads, L_past, d] the queries also attend to (pi0.5: the expert's
    layer l attends to the PaliGemma layer l keys/values of the prefix). cond: time embedding for
    the expert's adaptive norms and gated residuals. mask: bool [B, 1, L, L_past + L].
    Returns the new hidden states and this layer's (keys, values).
    """
    attn = layer.self_attn
    B, L, _ = x.shape
    if cond is None:
        h, gate = layer.input_layernorm(x), None
    else:
        h, gate = layer.input_layernorm(x, cond)
    q = attn.q_proj(h).view(B, L, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(B, L, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys, values = k, v
    if past_kv is not None:
        keys, values = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                         scale=attn.scaling, enable_gqa=True)
    out = attn.o_proj(out.transpose(1, 2).reshape(B, L, -1))
    x = x + out if gate is None else x + out * gate
    if cond is None:
        h, gate = layer.post_attention_layernorm(x), None
    else:
        h, gate = layer.post_attention_layernorm(x, cond)
    out = layer.mlp(h)
    x = x + out if gate is None else x + out * gate
    return x, (k, v)


def sinusoidal_time_embedding(t: torch.Tensor, width: int, min_period: float, max_period: float):
    """openpi's posemb_sincos: [B] -> [B, width]."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.double()[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


def reinflow_time_grid(num_steps: int) -> list[float]:
    """t_k = 1 - k / K, k = 0..K-1: Euler from noise (t = 1) to actions (t = 0). act and evaluate
    both use this one grid (ReinFlow's code once used two different grids)."""
    return [1.0 - k / num_steps for k in range(num_steps)]


def reinflow_noisy_steps(steps, K: int) -> list[int]:
    """noise_steps checked and sorted, duplicates dropped; None: all K steps. ValueError if empty or
    any index lies outside [0, K)."""
    if steps is None:
        return list(range(K))
    if not steps or any(not 0 <= int(k) < K for k in steps):
        raise ValueError(f"noise_steps {steps!r}: expected denoising step indices in [0, {K})")
    return sorted({int(k) for k in steps})


class Pi05Policy(Policy):
    """pi0.5 with a ReinFlow noise head and a value head.

    Log-probability normalisation (the same in act and evaluate):
        logprob = 1/(K+1) * [ sum_{h,a} log N(x0; 0, 1)
                              + sum_{k<K} sum_{h,a} log N(x_{k+1}; mu_k, sigma_k^2) ]
    i.e. averaged over the K + 1 terms of the chain, summed over the H chunk steps and A action
    dims (RLinf's "averaged over steps, summed over actions"). mu_k = x_k - v(x_k, t_k) / K (an
    Euler step towards t = 0), sigma_k from the noise head. Exact: every transition is Gaussian.
    entropy = mean over the K transitions, H steps and A dims of 0.5 log(2 pi e sigma^2).

    config["model"]["noise_steps"] (None: all K) injects the noise at the listed steps only; the
    other steps are the noise-free x_{k+1} = mu_k. The sums above then run over the noisy steps
    (K + 1 becomes their number + 1), and evaluate recomputes each noise-free step from the current
    weights, so mu_k of a noisy step stays a function of x0 and the earlier noisy draws and the
    log-probability stays exact. With noise_steps = [K - 1] the policy is the noise-free chain (the
    one the protocol scores) plus Gaussian noise on its output.
    Padded action dims (full size: actions padded to 32) are held at zero throughout.
    """

    kind = "pi05"

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        m = config["model"]
        dims = m.get("state_input_dims")
        if dims is not None and (not dims or any(not 0 <= int(d) < self.state_dim for d in dims)):
            raise ValueError(f"state_input_dims {dims!r}: expected indices into the {self.state_dim}-dim state")
        self.max_action_dim = m["max_action_dim"] or self.action_dim
        vision = SiglipVisionConfig(hidden_size=m["vision_width"], intermediate_size=m["vision_mlp"],
                                    num_hidden_layers=m["vision_depth"], num_attention_heads=m["vision_heads"],
                                    patch_size=m["patch_size"], image_size=m["image_size"], vision_use_head=False)
        text = GemmaConfig(vocab_size=m["vocab_size"], hidden_size=m["vlm_width"], intermediate_size=m["vlm_mlp"],
                           num_hidden_layers=m["vlm_depth"], num_attention_heads=m["num_heads"],
                           num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"],
                           pad_token_id=m["pad_token_id"])
        self.vlm = PaliGemmaModel(PaliGemmaConfig(vision_config=vision, text_config=text,
                                                  projection_dim=m["vlm_width"]))
        # the expert has the VLM's depth and head layout, so its layer l can attend to layer l's keys
        expert = GemmaConfig(hidden_size=m["expert_width"], intermediate_size=m["expert_mlp"],
                             num_hidden_layers=m["vlm_depth"], num_attention_heads=m["num_heads"],
                             num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"],
                             vocab_size=1, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no text
        self.expert = ActionExpert(expert)
        W = m["expert_width"]
        self.action_in_proj = nn.Linear(self.max_action_dim, W)
        self.action_out_proj = nn.Linear(W, self.max_action_dim)
        self.time_mlp_in = nn.Linear(W, W)
        self.time_mlp_out = nn.Linear(W, W)
        # ReinFlow noise head on the expert's output (RLinf flow_noise): per-step, per-dim std
        self.noise_head = nn.Sequential(nn.Linear(W, m["noise_hidden"]), nn.GELU(),
                                        nn.Linear(m["noise_hidden"], self.action_dim))
        # critic on the mean of the prefix tokens (RLinf), with the state beside it where asked
        self.value_head = make_value_head(self._value_input_width(), m["value_hidden"])
        # the VLM's Gemma layers run gemma_layer as their forward (shared attention with the expert)
        for layer in self.vlm.vision_tower.encoder.layers:
            _make_checkpointable(layer)
        for layer in (*self.vlm.language_model.layers, *self.expert.layers):
            _make_checkpointable(layer, gemma_layer)
        self.set_gradient_checkpointing(m.get("gradient_checkpointing", False))

    def transformer_layers(self):
        return [*self.vlm.vision_tower.encoder.layers, *self.vlm.language_model.layers, *self.expert.layers]

    # ---- prefix: [image tokens, BOS + prompt with state tokens (left-padded)], bidirectional ----
    def _prompts(self, state, instructions):
        if not self.config["model"].get("discrete_state_input", True):
            # openpi PaligemmaTokenizer.tokenize with state=None: the cleaned text, then "\n"
            return [i.strip().replace("_", " ").replace("\n", " ") + "\n" for i in instructions]
        state = self.normalize_state(state)
        dims = self.config["model"].get("state_input_dims")
        if dims is not None:
            state = state[:, list(dims)]
        pad_to = self.config["model"]["max_state_dim"]  # full size: 32 (openpi); tiny: None, no padding
        if pad_to and pad_to > state.shape[1]:
            state = F.pad(state, (0, pad_to - state.shape[1]))
        # np.digitize(x, linspace(-1, 1, 257)[:-1]) - 1 == floor((x + 1) * 128), clipped to 0..255
        bins = ((state + 1) * (NUM_ACTION_BINS / 2)).floor().clamp(0, NUM_ACTION_BINS - 1).long().tolist()
        return [PI05_PROMPT.format(instruction=i.strip().replace("_", " ").replace("\n", " "),
                                   state=" ".join(map(str, b))) for i, b in zip(instructions, bins)]

    def _prefix(self, views, state, instructions):
        """Run PaliGemma on the prefix; returns its per-layer keys/values, mask, length and output.
        views: the camera images (the fixed camera's, then the wrist camera's where the config has
        one); each is embedded on its own and their tokens lie side by side (openpi's base_0_rgb,
        left_wrist_0_rgb)."""
        m = self.config["model"]
        pixels = torch.cat([_images_to_pixels(image, m["image_size"], self.device) for image in views]) * 2 - 1
        image_tokens = self.vlm.multi_modal_projector(self.vlm.vision_tower(pixel_values=pixels).last_hidden_state)
        image_tokens = torch.cat(image_tokens.chunk(len(views)), dim=1)  # [B, views x patches, width]
        prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in self._prompts(state, instructions)]
        ids, text_mask = self._encode_left_padded([[m["bos_token_id"]] + p for p in prompts])
        # Gemma's embedding multiplies by sqrt(width); image tokens are not scaled (openpi)
        text_tokens = self.vlm.language_model.embed_tokens(ids)
        x = torch.cat([image_tokens.to(text_tokens.dtype), text_tokens], dim=1)
        mask = torch.cat([torch.ones(ids.shape[0], image_tokens.shape[1], dtype=torch.long, device=self.device),
                          text_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cos, sin = self.vlm.language_model.rotary_emb(x, positions)
        attn_mask = mask.bool()[:, None, None, :]  # prefix attends bidirectionally to real tokens
        kv = []
        for layer in self.vlm.language_model.layers:
            x, layer_kv = layer(x, cos, sin, attn_mask)
            kv.append(layer_kv)
        out = self.vlm.language_model.norm(x)
        return {"kv": kv, "mask": mask, "length": mask.sum(1), "out": out}

    def _value_input_width(self):
        m = self.config["model"]
        return (m["vlm_width"] + (self.state_dim if m.get("value_state_input", False) else 0)
                + (1 if m.get("value_potential_input", False) else 0))

    def _rebuild_value_head(self, key):
        """A new, randomly initialised value head that also reads `key`'s input (Stage I never trains
        the value head); the key is saved in the config, so a checkpoint reloads with the same head."""
        if self.config["model"].get(key, False):
            return
        self.config["model"][key] = True
        old = self.value_head[0]
        self.value_head = make_value_head(self._value_input_width(), self.config["model"]["value_hidden"]).to(
            device=old.weight.device, dtype=old.weight.dtype)

    def use_state_in_value_head(self):
        """Give the critic the normalised robot state beside the pooled prefix."""
        self._rebuild_value_head("value_state_input")

    def use_potential_in_value_head(self):
        """Give the critic the shaping potential phi(s) that obs["potential"] [B] carries."""
        self._rebuild_value_head("value_potential_input")

    def _value(self, prefix, state, obs):
        """V(s) from the pooled prefix [+ normalised state] [+ phi(s)]. A critic that reads phi(s) is
        NaN where obs has no "potential" (evaluation: no env pays it there, and nothing reads the value)."""
        m = self.config["model"]
        mask = prefix["mask"][..., None].float()
        pooled = (prefix["out"].float() * mask).sum(1) / mask.sum(1)
        if m.get("value_state_input", False):
            pooled = torch.cat([pooled, self.normalize_state(state).float()], dim=-1)
        if m.get("value_potential_input", False):
            potential = obs.get("potential")
            if potential is None:
                return torch.full((pooled.shape[0],), float("nan"), device=pooled.device)
            potential = torch.as_tensor(potential, dtype=torch.float32).to(pooled.device).reshape(-1, 1)
            pooled = torch.cat([pooled, potential], dim=-1)
        return self.value_head(pooled).squeeze(-1).float()

    def velocity(self, prefix, x_t, t):
        """Flow velocity v(x_t, t) [B, H, A] and the expert's output [B, H, W] (for the noise head).
        The expert's layer l attends to the prefix keys/values of PaliGemma layer l and to the
        action tokens (all bidirectionally); the prefix never attends to the actions, so computing
        the prefix first is the same as openpi's joint forward."""
        m = self.config["model"]
        B, H, _ = x_t.shape
        x_in = F.pad(x_t, (0, self.max_action_dim - self.action_dim)) if self.max_action_dim > self.action_dim else x_t
        h = self.action_in_proj(x_in)
        time = sinusoidal_time_embedding(t, h.shape[-1], m["min_period"], m["max_period"]).to(h.dtype)
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time))))
        positions = prefix["length"][:, None] + torch.arange(H, device=self.device)[None]
        cos, sin = self.vlm.language_model.rotary_emb(h, positions)
        attn_mask = torch.cat([prefix["mask"].bool()[:, None, None, :].expand(B, 1, H, -1),
                               torch.ones(B, 1, H, H, dtype=torch.bool, device=self.device)], dim=-1)
        for layer, past_kv in zip(self.expert.layers, prefix["kv"]):
            h, _ = layer(h, cos, sin, attn_mask, past_kv=past_kv, cond=cond)
        h, _ = self.expert.norm(h, cond)
        v = self.action_out_proj(h)[..., : self.action_dim]
        return v.float(), h

    def noisy_steps(self, K: int) -> list[int]:
        """The denoising steps k < K that draw x_{k+1} ~ N(mu_k, sigma_k^2) (the rest are noise-free)."""
        return reinflow_noisy_steps(self.config["model"].get("noise_steps"), K)

    def noise_std(self, expert_out):
        """sigma in [sigma_min, sigma_max] via a tanh-mapped log-std (RLinf flow_noise)."""
        m = self.config["model"]
        raw = torch.tanh(self.noise_head(expert_out).float())
        log_min, log_max = math.log(m["sigma_min"]), math.log(m["sigma_max"])
        return torch.exp(log_min + (log_max - log_min) * (raw + 1) / 2)

    def sft_loss(self, batch, generator=None):
        """Flow matching (pi0): t ~ Beta(1.5, 1) * 0.999 + 0.001, x_t = t noise + (1 - t) a,
        MSE(v(x_t, t), noise - a) over the valid chunk steps and action dims."""
        views, state, instructions = self._obs(batch)
        H = self.chunk_size
        actions = self.normalize_actions(torch.as_tensor(batch["actions"]).to(self.device, torch.float32)[:, :H])
        step_mask = batch.get("action_mask")
        step_mask = (torch.ones(actions.shape[:2], dtype=torch.bool) if step_mask is None
                     else torch.as_tensor(step_mask)[:, :H]).to(self.device).float()
        B = actions.shape[0]
        gen_device = generator.device if generator is not None else self.device
        noise = torch.randn(actions.shape, generator=generator, device=gen_device).to(self.device)
        # Beta(1.5, 1) has CDF t^1.5, so u^(1/1.5) with u ~ U(0, 1) is an exact sample
        t = torch.rand(B, generator=generator, device=gen_device).to(self.device) ** (1 / 1.5) * 0.999 + 0.001
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        with self._autocast():
            v, _ = self.velocity(self._prefix(views, state, instructions), x_t, t)
        err = ((v - (noise - actions)) ** 2).mean(-1)
        return (err * step_mask).sum() / step_mask.sum().clamp(min=1)

    @torch.no_grad()
    def act(self, obs, deterministic=False, generator: torch.Generator | None = None, x0_seeds=None):
        """The chain of K = num_steps Euler steps from x0 ~ N(0, I) at t = 1 to the actions at t = 0.
        deterministic=False: ReinFlow's noisy chain, x_{k+1} ~ N(mu_k, sigma_k^2) at the noisy steps
        (noisy_steps; what Stage II trains); deterministic=True: the noise-free chain x_{k+1} = mu_k on the same K-step grid
        (the evaluation protocol: RLinf and ReinFlow evaluate at the fine-tuning K, noise off).
        x0 is fresh at every call, as openpi infers: sample i's x0 from a generator seeded with
        x0_seeds[i] when given (envs.decision_key: reproducible, independent of the batch), else
        from `generator`, else from torch's global RNG. (A single fixed x0 for every decision was
        measured worse on 48 open_drawer episodes: 12.5 / 27.1 / 14.6 % against 14.6 / 31.2 / 27.1 %
        for the Stage I init and two Stage II runs.) The deterministic logprob is x0's alone.
        Returns actions (de-normalised x_K clipped to [-1, 1] first), logprob [B], step_logprob
        [B, H] (its share of each chunk step, summing to logprob), value, chain [B, K+1, H, A]."""
        m = self.config["model"]
        views, state, instructions = self._obs(obs)
        B, H, A = len(instructions), self.chunk_size, self.action_dim
        K = m["num_steps"]
        if x0_seeds is not None:
            if len(x0_seeds) != B:
                raise ValueError(f"x0_seeds has {len(x0_seeds)} entries for a batch of {B}")
            x0 = torch.stack([torch.randn((H, A), generator=torch.Generator().manual_seed(int(k)))
                              for k in x0_seeds])
        else:
            x0 = torch.randn((B, H, A), generator=generator,
                             device=generator.device if generator is not None else self.device)
        gen_device = generator.device if generator is not None else self.device
        with self._autocast():
            prefix = self._prefix(views, state, instructions)
            value = self._value(prefix, state, obs)
            x = x0.to(self.device, torch.float32)
            step_logprob = _gaussian_log_prob(x, torch.zeros_like(x), torch.ones_like(x)).sum(-1)
            chain = [x]
            noisy = self.noisy_steps(K)
            for k, t in enumerate(reinflow_time_grid(K)):
                v, expert_out = self.velocity(prefix, x, torch.full((B,), t, device=self.device))
                mean = x - v / K
                if deterministic or k not in noisy:
                    x = mean
                else:
                    std = self.noise_std(expert_out)
                    eps = torch.randn((B, H, A), generator=generator, device=gen_device).to(self.device)
                    x = mean + std * eps
                    step_logprob += _gaussian_log_prob(x, mean, std).sum(-1)
                chain.append(x)
        actions = self.denormalize_actions(x.clamp(-1, 1))
        step_logprob = step_logprob / (len(noisy) + 1)
        return {"actions": actions.float(), "logprob": step_logprob.sum(-1), "step_logprob": step_logprob,
                "value": value, "chain": torch.stack(chain, dim=1)}

    def evaluate(self, obs, act_out):
        """Log-prob of the stored chain under the current weights (K from the chain's length, the
        same time grid and normalisation as act), mean Gaussian entropy of the step noise, value.
        step_logprob / step_entropy [B, H]: each chunk step's share (the sum over its A dims of its
        terms, / their number) / its mean entropy over the noisy steps: given x_k, the transitions
        factorise over the chunk steps, so Stage II can mask the steps that were never executed."""
        views, state, instructions = self._obs(obs)
        chain = torch.as_tensor(act_out["chain"]).to(self.device, torch.float32)
        B, K = chain.shape[0], chain.shape[1] - 1
        with self._autocast():
            prefix = self._prefix(views, state, instructions)
            value = self._value(prefix, state, obs)
            x = chain[:, 0]
            step_logprob = _gaussian_log_prob(x, torch.zeros_like(x), torch.ones_like(x)).sum(-1)
            step_entropy = torch.zeros((B, chain.shape[2]), device=self.device)
            noisy = self.noisy_steps(K)
            for k, t in enumerate(reinflow_time_grid(K)):
                v, expert_out = self.velocity(prefix, x, torch.full((B,), t, device=self.device))
                mean = x - v / K
                if k not in noisy:  # noise-free: recomputed from the current weights, gradient through it
                    x = mean
                    continue
                std = self.noise_std(expert_out)
                step_logprob = step_logprob + _gaussian_log_prob(chain[:, k + 1], mean, std).sum(-1)
                step_entropy = step_entropy + (0.5 * math.log(2 * math.pi * math.e) + torch.log(std)).mean(-1)
                x = chain[:, k + 1]
        step_logprob, step_entropy = step_logprob / (len(noisy) + 1), step_entropy / len(noisy)
        return {"logprob": step_logprob.sum(-1), "entropy": step_entropy.mean(-1), "value": value,
                "step_logprob": step_logprob, "step_entropy": step_entropy}

    def configure_training(self):
        """train_expert_only: PaliGemma frozen; the expert, its projections, the time MLP, the noise
        head and the value head train (RLinf's pi0.5 setting). Otherwise everything trains."""
        frozen = bool(self.config["model"]["train_expert_only"])
        for name, p in self.named_parameters():
            p.requires_grad_(not (frozen and name.startswith("vlm.")))


POLICY_CLASSES = {"openvla": OpenVLAPolicy, "pi05": Pi05Policy}


def eval_act_fn(policy: Policy, deterministic: bool = True, generator: torch.Generator | None = None):
    """The act function of envs.evaluate_success: (obs, keys) -> actions [B, H, 7] as numpy.
    deterministic: the evaluation protocol (greedy tokens / the noise-free K-step chain, x0 seeded
    by each decision's key). Sampled: from `generator` (seeded CPU generator) when given."""
    def act(obs: dict, keys=None) -> np.ndarray:
        with torch.no_grad():
            out = policy.act(obs, deterministic=deterministic, generator=generator,
                             x0_seeds=keys if deterministic else None)
        return out["actions"].float().cpu().numpy()
    return act


# ------------------------------------------------------------------------------------------------
# make_policy / load_policy
# ------------------------------------------------------------------------------------------------

def _config(kind, size, chunk_size, action_dim, state_dim, norm_stats, overrides):
    model = _model_defaults(kind, size)
    unknown = sorted(set(overrides) - set(model))
    if unknown:
        raise ValueError(f"unknown {kind} options {unknown}; known: {sorted(model)}")
    model.update(overrides)
    return {"kind": kind, "size": size, "chunk_size": int(chunk_size or default_chunk_size(kind)),
            "action_dim": int(action_dim), "state_dim": int(state_dim), "norm_stats": norm_stats,
            "model": model}


def _cast_for_training(policy):
    """Frozen weights in the config dtype (bf16 for the full sizes), trainable ones in float32."""
    dtype = getattr(torch, policy.config["model"]["dtype"])
    for p in policy.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def make_policy(kind, size="tiny", pretrained=None, *, chunk_size=None, action_dim=7, state_dim=8,
                instructions=(), norm_stats=None, **overrides) -> Policy:
    """A new policy. tiny: random init, word-level tokenizer built from `instructions`.
    full: the published checkpoint (`pretrained`: local folder or hub id already in the local HF
    cache) loaded into this implementation, with its tokenizer. Options: see _model_defaults."""
    _check_kind(kind)
    config = _config(kind, size, chunk_size, action_dim, state_dim, norm_stats, overrides)
    if size == "full":
        return _make_full_policy(config, pretrained)
    if pretrained is not None:
        raise ValueError("pretrained weights exist only for size='full'")
    tokenizer = _tiny_tokenizer(kind, instructions)
    config["tokenizer"] = {"type": "word", "vocab": tokenizer.vocab}
    model = config["model"]
    model.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    if kind == "openvla":
        model["action_token_end"] = len(tokenizer)
    policy = POLICY_CLASSES[kind](config, tokenizer)
    policy.configure_training()
    _cast_for_training(policy)
    return policy


def load_policy(path) -> Policy:
    """Rebuild a policy saved by Policy.save(path) from that folder alone."""
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{path} is not a policy checkpoint: expected config.json and "
                                f"model.safetensors written by Policy.save()")
    config = json.loads(config_file.read_text())
    if config.get("kind") not in KINDS or "model" not in config:
        raise ValueError(f"{config_file} does not describe a policy (no known 'kind' / 'model')")
    if config["tokenizer"]["type"] == "word":
        tokenizer = WordTokenizer(config["tokenizer"]["vocab"])
        policy = POLICY_CLASSES[config["kind"]](config, tokenizer)
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        policy = empty_policy(config, tokenizer)
    policy.configure_training()
    state = load_file(weights_file)
    missing, unexpected = policy.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match its config.json: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    _cast_for_training(policy)
    return policy


# ------------------------------------------------------------------------------------------------
# Published checkpoints
# ------------------------------------------------------------------------------------------------

# Published tensor name prefix -> our parameter name prefix; the first matching rule applies.
PUBLISHED_NAME_MAP = {
    # openvla/openvla-7b (OpenVLAForActionPrediction state_dict)
    "openvla": [
        ("vision_backbone.featurizer.", "vision_backbone.dino."),           # DINOv2
        ("vision_backbone.fused_featurizer.", "vision_backbone.siglip."),   # SigLIP
        ("projector.", "projector."),
        ("language_model.", "language_model."),                             # LlamaForCausalLM
    ],
    # lerobot/pi05_base model.safetensors: openpi's PI0Pytorch layout, no "model." prefix, and the
    # PaliGemma embedding stored only as the lm_head it was tied to
    "pi05": [
        ("paligemma_with_expert.paligemma.lm_head.weight", "vlm.language_model.embed_tokens.weight"),
        # transformers 5 SiglipVisionModel has no inner `vision_model.` level
        ("paligemma_with_expert.paligemma.model.vision_tower.vision_model.", "vlm.vision_tower."),
        ("paligemma_with_expert.paligemma.model.", "vlm."),
        ("paligemma_with_expert.gemma_expert.model.", "expert."),
        ("action_in_proj.", "action_in_proj."),
        ("action_out_proj.", "action_out_proj."),
        ("time_mlp_in.", "time_mlp_in."),
        ("time_mlp_out.", "time_mlp_out."),
    ],
}
# Heads we add; they are not in the published checkpoints and start from random init.
ADDED_HEADS = {"openvla": ("value_head.",), "pi05": ("value_head.", "noise_head.")}


def _unused_published_patterns(kind, model_config) -> list[str]:
    """Published tensors that the model never reads (regexes), so we do not build them."""
    if kind == "openvla":
        m = model_config
        return [rf"vision_backbone\.featurizer\.blocks\.{m['dino_depth']}\.",       # last DINOv2 block
                r"vision_backbone\.featurizer\.norm\.",
                rf"vision_backbone\.fused_featurizer\.blocks\.{m['siglip_depth']}\.",  # last SigLIP block
                r"vision_backbone\.fused_featurizer\.norm\.",
                r"vision_backbone\.fused_featurizer\.attn_pool\."]                     # SigLIP MAP head
    # the expert's LM head (257152 x 1024): stored, but the action path never produces text
    return [r"paligemma_with_expert\.gemma_expert\.lm_head\."]


def published_to_ours(kind, name, model_config) -> str | None:
    """Our parameter name for a published tensor; None if it is one the model never reads."""
    if any(re.match(p, name) for p in _unused_published_patterns(kind, model_config)):
        return None
    for published, ours in PUBLISHED_NAME_MAP[kind]:
        if name.startswith(published):
            return ours + name[len(published):]
    return name  # no rule: reported as unexpected unless it happens to be one of ours


def match_published(policy, published_shapes: dict) -> dict:
    """Compare published tensor names/shapes with the policy's parameters (added heads aside).
    Returns lists: missing (ours not covered), unexpected (published without a parameter),
    shape_mismatch, duplicate (two published tensors onto one parameter), unused (skipped on purpose)."""
    ours = {n: tuple(p.shape) for n, p in policy.named_parameters()
            if not n.startswith(ADDED_HEADS[policy.kind])}
    result = {"missing": [], "unexpected": [], "shape_mismatch": [], "duplicate": [], "unused": []}
    covered = {}
    for name, shape in published_shapes.items():
        target = published_to_ours(policy.kind, name, policy.config["model"])
        if target is None:
            result["unused"].append(name)
        elif target not in ours:
            result["unexpected"].append(name)
        elif target in covered:
            result["duplicate"].append(f"{covered[target]} and {name} -> {target}")
        else:
            covered[target] = name
            if tuple(shape) != ours[target]:
                result["shape_mismatch"].append(f"{name} {tuple(shape)} -> {target} {ours[target]}")
    result["missing"] = sorted(set(ours) - set(covered))
    return result


def load_published_weights(policy, tensors: dict):
    """Copy published tensors (published names) into the policy; a clear error listing missing and
    unexpected tensors when the checkpoint does not fit this architecture."""
    report = match_published(policy, {n: tuple(t.shape) for n, t in tensors.items()})
    problems = {k: v for k, v in report.items() if v and k != "unused"}
    if problems:
        lines = [f"  {kind} ({len(names)}): " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
                 for kind, names in problems.items()]
        raise ValueError(f"the published {policy.kind} checkpoint does not fit this architecture:\n"
                         + "\n".join(lines))
    state = {}
    params = dict(policy.named_parameters())
    for name, tensor in tensors.items():
        target = published_to_ours(policy.kind, name, policy.config["model"])
        if target is not None:
            state[target] = tensor.to(params[target].dtype)
    policy.load_state_dict(state, strict=False, assign=True)


def read_safetensors_folder(folder) -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint folder."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _resolve_pretrained(pretrained) -> Path:
    """A local folder, or a hub id resolved through the local HF cache only (no download)."""
    if pretrained is None:
        raise ValueError("size='full' needs pretrained=<local folder or hub id in the local HF cache>")
    if Path(pretrained).is_dir():
        return Path(pretrained)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(pretrained), local_files_only=True))
    except Exception as e:
        raise FileNotFoundError(f"{pretrained!r} is neither a folder nor in the local HF cache; download it "
                                f"first (e.g. `hf download {pretrained}`)") from e


def empty_policy(config: dict, tokenizer=None) -> Policy:
    """The policy of `config` with its parameters on the meta device (no memory, no weights);
    buffers are real. Used to load published weights and to check parameter names and shapes."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        return POLICY_CLASSES[config["kind"]](config, tokenizer)


def full_config(kind, chunk_size=None, action_dim=7, state_dim=8, norm_stats=None, **overrides) -> dict:
    """The configuration of the full-size policy (published sizes)."""
    return _config(_check_kind(kind), "full", chunk_size, action_dim, state_dim, norm_stats, overrides)


class StandInTokenizer:
    """For full sizes without the published tokenizer files: one id per word or punctuation mark,
    hashed into the ordinary part of the vocabulary (clear of the special and action ids)."""

    def __init__(self, vocab_size: int):
        self.span = vocab_size - 1000

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        import zlib
        return [3 + zlib.crc32(w.encode()) % self.span for w in WordTokenizer.split(text)]


def random_full_policy(kind: str, device="cpu", seed: int = 0, block: int = 1_000_003, **overrides) -> Policy:
    """The full-size policy (published sizes) with random weights on `device`, for benchmarks and
    tests where no published weights are at hand: frozen weights in the config dtype (bf16),
    trainable ones in fp32, as training holds them; a stand-in tokenizer. Every weight matrix is a
    window of one cyclic block of `block` N(0, 0.02^2) draws (a prime length, so no row lines up
    with the period): seconds instead of a minute for pi05's 3.4B values on a CPU, and the layers
    still see different, well-scaled random matrices. Vectors: norm scales 1, biases 0."""
    config = full_config(kind, **overrides)
    config["tokenizer"] = {"type": "stand-in"}
    policy = empty_policy(config, StandInTokenizer(config["model"]["vocab_size"]))
    policy.configure_training()  # LoRA adapters, which parameters train
    frozen_dtype = getattr(torch, config["model"]["dtype"])
    source = torch.empty(block, device=device).normal_(0, 0.02, generator=torch.Generator(device).manual_seed(seed))
    offset = 0
    for module in policy.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, device=device, dtype=torch.float32 if p.requires_grad else frozen_dtype)
            if t.dim() >= 2:
                flat, n = t.view(-1), t.numel()
                cyclic = source.to(t.dtype).roll(-offset)
                reps = n // block
                flat[: reps * block].view(reps, block).copy_(cyclic.expand(reps, block))
                flat[reps * block:].copy_(cyclic[: n - reps * block])
                offset = (offset + n) % block
            else:
                t.fill_(1.0 if name == "weight" else 0.0)
            setattr(module, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))
    return policy.to(device)


def _make_full_policy(config, pretrained):
    from transformers import AutoTokenizer
    kind, model = config["kind"], config["model"]
    folder = _resolve_pretrained(pretrained)
    if kind == "openvla":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if config["norm_stats"] is None:
            config["norm_stats"] = _openvla_published_action_stats(folder, model.get("unnorm_key"))
    else:
        # LeRobot's pi05_base folder holds no tokenizer; PaliGemma's comes from the HF cache
        source = folder if (folder / "tokenizer_config.json").is_file() else _resolve_pretrained(
            "google/paligemma-3b-pt-224")
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.bos_token_id != model["bos_token_id"]:
        raise ValueError(f"{folder}: tokenizer BOS id {tokenizer.bos_token_id}, expected {model['bos_token_id']}")
    config["tokenizer"] = {"type": "hf", "path": "tokenizer"}
    config["pretrained"] = str(pretrained)
    lora_rank = model.get("lora_rank", 0)
    if kind == "openvla":
        model["lora_rank"] = 0  # load the plain Llama first, then add the adapters
    policy = empty_policy(config, tokenizer)
    load_published_weights(policy, read_safetensors_folder(folder))
    # the heads we add start from random init (they were built on the meta device)
    policy.value_head = make_value_head(policy.value_head[0].in_features, model["value_hidden"])
    if kind == "pi05":
        policy.noise_head = nn.Sequential(nn.Linear(model["expert_width"], model["noise_hidden"]), nn.GELU(),
                                          nn.Linear(model["noise_hidden"], policy.action_dim))
    if kind == "openvla":
        model["lora_rank"] = lora_rank
    policy.configure_training()
    _cast_for_training(policy)
    return policy


def _openvla_published_action_stats(folder, unnorm_key):
    """OpenVLA's per-dataset action q01/q99 from its config.json (dims with mask False are not
    normalised: written as q01 = -1, q99 = 1). None without unnorm_key (identity)."""
    if unnorm_key is None:
        return None
    stats = json.loads((Path(folder) / "config.json").read_text())["norm_stats"][unnorm_key]["action"]
    mask = stats.get("mask", [True] * len(stats["q01"]))
    q01 = [q if keep else -1.0 for q, keep in zip(stats["q01"], mask)]
    q99 = [q if keep else 1.0 for q, keep in zip(stats["q99"], mask)]
    return {"action": dict(stats, q01=q01, q99=q99)}
