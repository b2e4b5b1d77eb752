"""Stable Diffusion 2.1-base for CLIPer's refinement: VAE, UNet, empty-prompt embedding, scheduler.

`build_sd` returns an `SDModels` built with diffusers/transformers classes in one of three modes:

- real (default): from a diffusers-format folder (the Hugging Face repository snapshot of
  ``stabilityai/stable-diffusion-2-1-base``: ``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``), located in the project's order — explicit path → ``$S2CLIP_WEIGHTS_DIR/sd21_base/``
  → the Hugging Face hub cache snapshot → a download of only those subfolders (fp16 weight files when
  the repository has them) unless offline. Weights are read from safetensors with
  ``local_files_only=True``. A missing or incomplete folder is one `S2ClipError` line naming the
  folder and ``s2clip models download sd21_base``.
- ``tiny=True``: small randomly initialised models of the same classes (4-block UNet whose last up
  block is a `CrossAttnUpBlock2D` with 5-head self-attention, as the real one; 4-block VAE, so the
  latent is 1/8 of the image; 2-layer CLIP text encoder) and the real checkpoint's scheduler. A
  tokenizer needs vocabulary files, which do not exist offline, so the tiny empty-prompt embedding
  is the text encoder's output on fixed ids ``[BOS, EOS, PAD, …]`` — the layout SD-2's tokenizer
  produces for ``""`` (its pad token ``!`` is id 0). Default image size 128 px → 16×16 latent.
- ``random=True``: the full-size SD-2.1-base architectures (configs below, copied from the
  checkpoint's ``config.json`` files) with random weights, for timing. Empty prompt = the SD-2
  tokenizer's ids for ``""`` (49406, 49407, then 0).

The text encoder is only run once, at build time, to compute the empty-prompt embedding
``[1, 77, D]`` that CLIPer conditions on (``encode_prompt("")`` without classifier-free guidance);
it is not kept.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import S2ClipError, one_line
from . import weights
from .registry import SD_SPECS

SD_SPEC = SD_SPECS["sd21_base"]
DOWNLOAD_COMMAND = f"s2clip models download {SD_SPEC.name}"
SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
SEED = 0
MAX_TRAIN_TIMESTEPS = 100_000  # SD uses 1000

REAL_IMAGE_SIZE = 512  # CLIPer feeds SD 512×512 images → 64×64 latent → 4096 tokens
TINY_IMAGE_SIZE = 128  # → 16×16 latent → 256 tokens

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-2-1-base.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# unet/config.json (diffusers' `attention_head_dim` holds the number of heads: 320 channels / 5 = 64).
UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": (5, 10, 20, 20),
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "upcast_attention": False,
    "use_linear_projection": True,
}

# vae/config.json.
VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}

# text_encoder/config.json (OpenCLIP ViT-H/14 text tower without its last layer).
TEXT_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
# What SD-2's CLIPTokenizer gives for "" padded to 77: <|startoftext|>, <|endoftext|>, then "!" (id 0).
SD2_EMPTY_PROMPT_IDS = (49406, 49407) + (0,) * 75

TINY_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "attention_head_dim": (5, 5, 5, 5),
    "block_out_channels": (40, 40, 40, 40),
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": TINY_IMAGE_SIZE // 8,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    **VAE_CONFIG,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": TINY_IMAGE_SIZE,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 16,
    "vocab_size": 64,
    # SD-2's token layout on a small vocabulary: BOS/EOS the last two ids, pad 0.
    "bos_token_id": 62,
    "eos_token_id": 63,
    "pad_token_id": 0,
}

# Weight files per subfolder (stem; a `.fp16` variant sits before the suffix).
_WEIGHT_STEMS = {"vae": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model", "text_encoder": "model"}


@dataclass
class SDModels:
    """What one SD attention pass needs, on one device and dtype.

    vae: `AutoencoderKL` (only its encoder is used). unet: `UNet2DConditionModel`.
    scheduler: the checkpoint's scheduler (PNDM for SD-2.1-base). prompt_embeds: ``[1, L, D]`` the
    text encoder's last hidden state for the empty prompt. mode: "real", "tiny" or "random".
    source: the folder the weights came from, or ``random-<mode>-seed<n>``. image_size: the square
    size images are resized to before the VAE (512 real/random, 128 tiny).
    """

    vae: Any
    unet: Any
    scheduler: Any
    prompt_embeds: Tensor
    mode: str
    source: str
    image_size: int

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent cell along one side (8 for SD's 4-block VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_random(self) -> bool:
        return self.mode != "real"


# ------------------------------------------------------------------------------------------ locating


def check_sd_folder(folder: Path) -> str | None:
    """None when `folder` holds a complete diffusers SD folder, else the first missing item."""
    if not folder.is_dir():
        return "folder not found"
    for sub in SUBFOLDERS:
        if not (folder / sub).is_dir():
            return f"no {sub}/"
    for sub, stem in _WEIGHT_STEMS.items():
        if not (folder / sub / "config.json").is_file():
            return f"no {sub}/config.json"
        if not any((folder / sub / f"{stem}{v}.safetensors").is_file() for v in ("", ".fp16")):
            return f"no {sub}/{stem}.safetensors"
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        return "no scheduler/scheduler_config.json"
    tok = folder / "tokenizer"
    if not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        return "no tokenizer/vocab.json + merges.txt (or tokenizer.json)"
    return None


def missing_sd_message(folder: Path, problem: str) -> str:
    """One line: which folder, what is wrong, how to fetch it."""
    return one_line(
        f"missing Stable Diffusion weights for {SD_SPEC.name}: {folder} ({problem}); it must be a "
        f"diffusers folder ({', '.join(s + '/' for s in SUBFOLDERS)}) of hf://{SD_SPEC.hf_repo} — "
        f"run `{DOWNLOAD_COMMAND}` on a machine with internet"
    )


def missing_default_sd_message(note: str = "") -> str:
    """`missing_sd_message` for the folder in the weights dir, where a missing SD checkpoint goes."""
    folder = weights.weights_dir() / SD_SPEC.filename
    return missing_sd_message(folder, (check_sd_folder(folder) or "incomplete") + note)


def _download_patterns(fp16: bool) -> list[str]:
    variant = ".fp16" if fp16 else ""
    patterns = ["model_index.json", "scheduler/*.json", "tokenizer/*"]
    for sub, stem in _WEIGHT_STEMS.items():
        patterns += [f"{sub}/config.json", f"{sub}/{stem}{variant}.safetensors"]
    return patterns


def _hf_cached_folder() -> Path | None:
    """The hub-cache snapshot folder holding the SD repository's ``unet/config.json`` (None when
    not cached); whether it is complete is for `check_sd_folder` to say."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id=SD_SPEC.hf_repo, filename="unet/config.json",
                                 cache_dir=weights.hf_cache_dir())
    return Path(hit).parent.parent if isinstance(hit, str) else None


def _hf_download(fp16: bool) -> Path:
    """`snapshot_download` of only the files SD refinement needs into the hub cache."""
    import logging

    from huggingface_hub import snapshot_download

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # errors reach the user as ours
    return Path(snapshot_download(repo_id=SD_SPEC.hf_repo, allow_patterns=_download_patterns(fp16),
                                  cache_dir=weights.hf_cache_dir()))


def locate_sd(explicit: str | Path | None = None) -> weights.Located:
    """Find a complete SD folder without downloading: explicit → weights dir → hub cache.

    An explicit folder that is missing or incomplete is an error (no fallback)."""
    if explicit is not None:
        folder = Path(explicit).expanduser()
        problem = check_sd_folder(folder)
        if problem:
            raise S2ClipError(missing_sd_message(folder, problem))
        return weights.Located(folder, "explicit")
    local = weights.weights_dir() / SD_SPEC.filename
    if check_sd_folder(local) is None:
        return weights.Located(local, "weights dir")
    cached = _hf_cached_folder()
    if cached is not None and check_sd_folder(cached) is None:
        return weights.Located(cached, "hf cache")
    return weights.Located(None, "missing")


def download_sd() -> Path:
    """Download only the subfolders SD refinement needs (fp16 weight files when the repository
    has them, else full precision) into the hub cache; returns the snapshot folder."""
    try:
        folder = _hf_download(fp16=True)
        if check_sd_folder(folder) is not None:  # the repository has no fp16 files
            folder = _hf_download(fp16=False)
    except Exception as exc:  # noqa: BLE001 - network errors of every kind
        raise S2ClipError(f"could not download {SD_SPEC.name} from {SD_SPEC.hf_repo} "
                          f"({type(exc).__name__})") from None
    problem = check_sd_folder(folder)
    if problem:
        raise S2ClipError(f"download of {SD_SPEC.name} from {SD_SPEC.hf_repo} is incomplete ({problem})")
    return folder


def resolve_sd(explicit: str | Path | None = None, *, offline: bool = False) -> Path:
    """A complete SD folder, downloading it only when allowed."""
    found = locate_sd(explicit)
    if found.path is not None:
        return found.path
    if weights.is_offline(offline):
        raise S2ClipError(missing_default_sd_message("; offline"))
    try:
        return download_sd()
    except S2ClipError as exc:
        raise S2ClipError(f"{missing_default_sd_message()} — {exc}") from None


# ------------------------------------------------------------------------------------------ building


@dataclass
class SDComponents:
    """The unassembled models: what a diffusers SD folder holds (the tokenizer aside)."""

    vae: Any
    unet: Any
    text_encoder: Any
    scheduler: Any


def make_scheduler(config: dict[str, Any] | None = None) -> Any:
    """The scheduler named by `config["_class_name"]` (default: SD-2.1-base's PNDM) from `config`."""
    import diffusers
    from diffusers import SchedulerMixin

    config = dict(SCHEDULER_CONFIG if config is None else config)
    cls = getattr(diffusers, str(config.get("_class_name", "PNDMScheduler")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise S2ClipError(f"unknown scheduler class {config.get('_class_name')!r} in the SD scheduler config")
    return cls.from_config(config)


def random_components(*, tiny: bool, seed: int = SEED, device: str | torch.device = "cpu") -> SDComponents:
    """Randomly initialised (seeded) SD models: small ones (`tiny`) or the full-size architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else VAE_CONFIG))
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else UNET_CONFIG))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT_CONFIG if tiny else TEXT_CONFIG)))
    return SDComponents(vae=vae, unet=unet, text_encoder=text_encoder, scheduler=make_scheduler())


def fixed_empty_prompt_ids(config: Any) -> Tensor:
    """``[1, L]`` ids ``[BOS, EOS, PAD, …]`` from a `CLIPTextConfig` (used where no tokenizer exists)."""
    length = int(config.max_position_embeddings)
    ids = [int(config.bos_token_id), int(config.eos_token_id)] + [int(config.pad_token_id)] * (length - 2)
    return torch.tensor([ids], dtype=torch.long)


def tokenize_empty_prompt(tokenizer: Any) -> Tensor:
    """``[1, L]`` the tokenizer's ids for ``""`` padded to its maximum length, as diffusers'
    `encode_prompt` does."""
    return tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def empty_prompt_embedding(text_encoder: Any, input_ids: Tensor) -> Tensor:
    """``[1, L, D]`` last hidden state for `input_ids` (no attention mask, no clip skip: SD-2 usage)."""
    device = next(text_encoder.parameters()).device
    with torch.autocast(device.type, enabled=False):
        return text_encoder(input_ids.to(device))[0]


def assemble(components: SDComponents, input_ids: Tensor, *, mode: str, source: str, image_size: int,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SDModels:
    """Compute the empty-prompt embedding, drop the text encoder, move everything to device/dtype."""
    device = torch.device(device)
    text_encoder = components.text_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    prompt_embeds = empty_prompt_embedding(text_encoder, input_ids)
    for module in (components.vae, components.unet):
        _move(module, device, dtype)
    return SDModels(vae=components.vae, unet=components.unet, scheduler=components.scheduler,
                    prompt_embeds=prompt_embeds.to(dtype), mode=mode, source=source, image_size=image_size)


def _move(module: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Eval mode, no gradients, on `device` in `dtype`, without diffusers' warning about casting
    with `.to()` (these models have no modules that must stay float32)."""
    import logging

    module.eval().requires_grad_(False).to(device)
    if next(module.parameters()).dtype != dtype:
        modeling_log = logging.getLogger("diffusers.models.modeling_utils")
        level = modeling_log.level
        modeling_log.setLevel(logging.ERROR)
        try:
            module.to(dtype)
        finally:
            modeling_log.setLevel(level)


def _variant(subfolder: Path, stem: str, dtype: torch.dtype) -> str | None:
    """"fp16" when the fp16 file is there and either no full-precision file is, or we load in fp16."""
    full = (subfolder / f"{stem}.safetensors").is_file()
    half = (subfolder / f"{stem}.fp16.safetensors").is_file()
    return "fp16" if half and (not full or dtype == torch.float16) else None


def _damaged_weight_file(folder: Path, dtype: torch.dtype) -> tuple[Path, str] | None:
    """The first weight file that loading `folder` reads and that is truncated or not a checkpoint
    (`weights.checkpoint_damage`), with what is wrong with it; None when they all look intact."""
    for sub, stem in _WEIGHT_STEMS.items():
        variant = _variant(folder / sub, stem, dtype)
        path = folder / sub / f"{stem}{'.' + variant if variant else ''}.safetensors"
        damage = weights.checkpoint_damage(path)
        if damage is not None:
            return path, damage
    return None


def _read_scheduler_config(path: Path) -> dict[str, Any]:
    """The scheduler's JSON config (a small regular file holding an object), or `S2ClipError` naming it."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            raise S2ClipError(f"Stable Diffusion scheduler config {path} is not a small regular file")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise S2ClipError(one_line(f"Stable Diffusion scheduler config {path} is not valid JSON "
                                   f"({type(exc).__name__}: {str(exc)[:200]})")) from None
    if not isinstance(config, dict):
        raise S2ClipError(f"Stable Diffusion scheduler config {path} holds no JSON object")
    steps = config.get("num_train_timesteps", 1000)  # sizes the scheduler's tables: checked before allocating
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise S2ClipError(f"Stable Diffusion scheduler config {path}: num_train_timesteps {steps!r} is not an "
                          f"integer in 1..{MAX_TRAIN_TIMESTEPS}")
    return config


def load_components(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[SDComponents, Any]:
    """Load a diffusers SD folder (safetensors, local files only): components and tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    problem = check_sd_folder(folder)
    if problem:
        raise S2ClipError(missing_sd_message(folder, problem))
    common = {"use_safetensors": True, "local_files_only": True, "torch_dtype": dtype}
    diffusers_only = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **common, **diffusers_only,
                                            variant=_variant(folder / "vae", _WEIGHT_STEMS["vae"], dtype))
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **common, **diffusers_only,
                                                    variant=_variant(folder / "unet", _WEIGHT_STEMS["unet"], dtype))
        text_encoder = CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", **common,
            variant=_variant(folder / "text_encoder", _WEIGHT_STEMS["text_encoder"], dtype))
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        scheduler_config = _read_scheduler_config(folder / "scheduler" / "scheduler_config.json")
    except S2ClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or mismatched files of every kind
        damaged = _damaged_weight_file(folder, dtype)
        if damaged is not None:
            raise S2ClipError(f"Stable Diffusion checkpoint {damaged[0]} {damaged[1]}") from None
        raise S2ClipError(one_line(f"could not load Stable Diffusion from {folder}: {type(exc).__name__}: "
                                   f"{str(exc)[:300]}")) from None
    return SDComponents(vae=vae, unet=unet, text_encoder=text_encoder,
                        scheduler=make_scheduler(scheduler_config)), tokenizer


def build_sd(*, tiny: bool = False, random: bool = False, path: str | Path | None = None, offline: bool = False,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             seed: int = SEED) -> SDModels:
    """SD models for the attention pass, in eval mode, on `device` in `dtype`.

    Real weights unless `tiny` (small random models) or `random` (full-size random models); the
    caller warns users that random models give meaningless output."""
    if tiny and random:
        raise S2ClipError("build_sd: choose tiny or random, not both")
    if tiny or random:
        mode = "tiny" if tiny else "random"
        components = random_components(tiny=tiny, seed=seed, device="cpu" if tiny else device)
        ids = fixed_empty_prompt_ids(components.text_encoder.config) if tiny else torch.tensor([SD2_EMPTY_PROMPT_IDS])
        return assemble(components, ids, mode=mode, source=f"random-{mode}-seed{seed}",
                        image_size=TINY_IMAGE_SIZE if tiny else REAL_IMAGE_SIZE, device=device, dtype=dtype)
    folder = resolve_sd(path, offline=offline)
    components, tokenizer = load_components(folder, dtype)
    return assemble(components, tokenize_empty_prompt(tokenizer), mode="real", source=str(folder),
                    image_size=REAL_IMAGE_SIZE, device=device, dtype=dtype)


def save_components(components: SDComponents, folder: Path, tokenizer: Any | None = None) -> None:
    """Write `components` (and `tokenizer`) as a diffusers-format folder (safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    components.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    components.scheduler.save_pretrained(folder / "scheduler")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "tokenizer")
