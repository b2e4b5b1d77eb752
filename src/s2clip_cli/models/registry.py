"""The named models s2clip knows: where their weights come from and how they are built.

Each family through its own library: CLIP through open_clip, DINO/DINOv2 through timm,
SAM through segment-anything, SAM 2 (class-agnostic masks) through sam2, Stable Diffusion through diffusers. A `ModelSpec` records the user-facing name, the library's own
name for the architecture, the file s2clip expects in its weights directory, and the places the
libraries themselves cache or host that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import S2ClipError

Family = Literal["clip", "vfm", "sam", "sd", "sam2"]


@dataclass(frozen=True)
class ModelSpec:
    name: str  # user-facing name (`--clip ViT-B/16`, `--vfm dino_vitb8`, `--sam vit_b`)
    family: Family
    arch: str  # open_clip model name, timm model name or segment-anything variant
    filename: str  # expected file in S2CLIP_WEIGHTS_DIR
    source: str  # human-readable provenance
    hf_repo: str | None = None  # Hugging Face hub repository the library downloads from
    hf_filename: str | None = None
    url: str | None = None  # direct download (SAM)
    patch_size: int = 16
    tiny_arch: str | None = None  # name of the small random configuration for `--models tiny`


CLIP_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("ViT-B/16", "clip", "ViT-B-16-quickgelu", "clip_vit_b16_openai.safetensors",
                  "OpenAI CLIP ViT-B/16 (open_clip 'ViT-B-16', pretrained='openai')",
                  hf_repo="timm/vit_base_patch16_clip_224.openai", hf_filename="open_clip_model.safetensors",
                  patch_size=16),
        ModelSpec("ViT-L/14", "clip", "ViT-L-14-quickgelu", "clip_vit_l14_openai.safetensors",
                  "OpenAI CLIP ViT-L/14 (open_clip 'ViT-L-14', pretrained='openai')",
                  hf_repo="timm/vit_large_patch14_clip_224.openai", hf_filename="open_clip_model.safetensors",
                  patch_size=14),
        ModelSpec("ViT-H/14", "clip", "ViT-H-14", "clip_vit_h14_laion2b_s32b_b79k.safetensors",
                  "OpenCLIP ViT-H/14 laion2b_s32b_b79k",
                  hf_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", hf_filename="open_clip_model.safetensors",
                  patch_size=14),
        # MetaCLIP (CorrCLIP's CLIP): OpenAI's architecture with QuickGELU, MetaCLIP 2.5B weights
        # (open_clip pretrained='metaclip_fullcc').
        ModelSpec("MetaCLIP-B/16", "clip", "ViT-B-16-quickgelu", "clip_vit_b16_metaclip_fullcc.safetensors",
                  "MetaCLIP ViT-B/16 fullcc 2.5B (open_clip 'ViT-B-16-quickgelu', pretrained='metaclip_fullcc')",
                  hf_repo="timm/vit_base_patch16_clip_224.metaclip_2pt5b", hf_filename="open_clip_model.safetensors",
                  patch_size=16),
        ModelSpec("MetaCLIP-L/14", "clip", "ViT-L-14-quickgelu", "clip_vit_l14_metaclip_fullcc.safetensors",
                  "MetaCLIP ViT-L/14 fullcc 2.5B (open_clip 'ViT-L-14-quickgelu', pretrained='metaclip_fullcc')",
                  hf_repo="timm/vit_large_patch14_clip_224.metaclip_2pt5b", hf_filename="open_clip_model.safetensors",
                  patch_size=14),
    ]
}

VFM_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("dino_vitb8", "vfm", "vit_base_patch8_224.dino", "dino_vitb8.safetensors",
                  "DINO ViT-B/8 (timm vit_base_patch8_224.dino)",
                  hf_repo="timm/vit_base_patch8_224.dino", hf_filename="model.safetensors", patch_size=8),
        ModelSpec("dino_vitb16", "vfm", "vit_base_patch16_224.dino", "dino_vitb16.safetensors",
                  "DINO ViT-B/16 (timm vit_base_patch16_224.dino)",
                  hf_repo="timm/vit_base_patch16_224.dino", hf_filename="model.safetensors", patch_size=16),
        ModelSpec("dino_vits8", "vfm", "vit_small_patch8_224.dino", "dino_vits8.safetensors",
                  "DINO ViT-S/8 (timm vit_small_patch8_224.dino)",
                  hf_repo="timm/vit_small_patch8_224.dino", hf_filename="model.safetensors", patch_size=8),
        ModelSpec("dino_vits16", "vfm", "vit_small_patch16_224.dino", "dino_vits16.safetensors",
                  "DINO ViT-S/16 (timm vit_small_patch16_224.dino)",
                  hf_repo="timm/vit_small_patch16_224.dino", hf_filename="model.safetensors", patch_size=16),
        ModelSpec("dinov2_vits14", "vfm", "vit_small_patch14_dinov2.lvd142m", "dinov2_vits14.safetensors",
                  "DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2.lvd142m)",
                  hf_repo="timm/vit_small_patch14_dinov2.lvd142m", hf_filename="model.safetensors",
                  patch_size=14),
        ModelSpec("dinov2_vitb14", "vfm", "vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14.safetensors",
                  "DINOv2 ViT-B/14 (timm vit_base_patch14_dinov2.lvd142m)",
                  hf_repo="timm/vit_base_patch14_dinov2.lvd142m", hf_filename="model.safetensors",
                  patch_size=14),
        # DINOv2 with registers: ProxyCLIP's `dinov2_vitb14_reg` (torch hub); timm keeps the class
        # token's position in the token itself, which is the same computation.
        ModelSpec("dinov2_vits14_reg", "vfm", "vit_small_patch14_reg4_dinov2.lvd142m", "dinov2_vits14_reg.safetensors",
                  "DINOv2 ViT-S/14 with 4 registers (timm vit_small_patch14_reg4_dinov2.lvd142m)",
                  hf_repo="timm/vit_small_patch14_reg4_dinov2.lvd142m", hf_filename="model.safetensors",
                  patch_size=14),
        ModelSpec("dinov2_vitb14_reg", "vfm", "vit_base_patch14_reg4_dinov2.lvd142m", "dinov2_vitb14_reg.safetensors",
                  "DINOv2 ViT-B/14 with 4 registers (timm vit_base_patch14_reg4_dinov2.lvd142m)",
                  hf_repo="timm/vit_base_patch14_reg4_dinov2.lvd142m", hf_filename="model.safetensors",
                  patch_size=14),
        # The SAM image encoder as a VFM reads the SAM ViT-B checkpoint.
        ModelSpec("sam_vitb16", "vfm", "vit_b", "sam_vit_b_01ec64.pth",
                  "SAM ViT-B image encoder (segment-anything sam_vit_b_01ec64.pth)",
                  url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth", patch_size=16),
    ]
}

SAM_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("vit_b", "sam", "vit_b", "sam_vit_b_01ec64.pth", "SAM ViT-B (segment-anything)",
                  url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
        ModelSpec("vit_l", "sam", "vit_l", "sam_vit_l_0b3195.pth", "SAM ViT-L (segment-anything)",
                  url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
        ModelSpec("vit_h", "sam", "vit_h", "sam_vit_h_4b8939.pth", "SAM ViT-H (segment-anything)",
                  url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
    ]
}

# Stable Diffusion (CLIPer's refinement) is a diffusers-format folder, not one file: `filename` names
# the folder under S2CLIP_WEIGHTS_DIR; `models/sd.py` locates, checks and downloads it.
SD_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("sd21_base", "sd", "stable-diffusion-2-1-base", "sd21_base",
                  "Stable Diffusion 2.1 base (diffusers folder: vae, unet, text_encoder, tokenizer, scheduler)",
                  hf_repo="stabilityai/stable-diffusion-2-1-base", patch_size=8),
    ]
}

# SAM 2 (the `sam2` package), for class-agnostic masks (CorrCLIP's mask generator): `arch` is the
# package's Hydra config; the checkpoint holds {"model": state dict}.
SAM2_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("sam2_hiera_large", "sam2", "configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt",
                  "SAM 2 Hiera-L (facebookresearch/sam2, 2024-07-28 release; sam2 package)",
                  hf_repo="facebook/sam2-hiera-large", hf_filename="sam2_hiera_large.pt",
                  url="https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt"),
    ]
}

ALL_SPECS: dict[str, ModelSpec] = {**CLIP_SPECS, **VFM_SPECS, **SAM_SPECS, **SD_SPECS, **SAM2_SPECS}


def _lookup(table: dict[str, ModelSpec], name: str, what: str) -> ModelSpec:
    if name in table:
        return table[name]
    # Accept open_clip-style spellings too: ViT-B-16 for ViT-B/16.
    for spec in table.values():
        if name.lower().replace("-", "/") == spec.name.lower() or name.lower() == spec.name.lower():
            return spec
    raise S2ClipError(f"unknown {what} {name!r}; choose one of: {', '.join(table)}")


def clip_spec(name: str) -> ModelSpec:
    return _lookup(CLIP_SPECS, name, "CLIP model")


def vfm_spec(name: str) -> ModelSpec:
    return _lookup(VFM_SPECS, name, "VFM")


def sam_spec(name: str) -> ModelSpec:
    return _lookup(SAM_SPECS, name, "SAM model")


def sam2_spec(name: str) -> ModelSpec:
    return _lookup(SAM2_SPECS, name, "SAM 2 model")


def any_spec(name: str) -> ModelSpec:
    return _lookup(ALL_SPECS, name, "model")
