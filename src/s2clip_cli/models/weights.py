"""Finding (and, when allowed, downloading) checkpoint files.

Resolution order, first hit wins:

1. an explicit path the user gave (`--clip-weights`, `--vfm-weights`, `--sam-weights`);
2. ``$S2CLIP_WEIGHTS_DIR/<spec.filename>`` (default ``~/.cache/s2clip``);
3. the libraries' own caches: the Hugging Face hub cache (open_clip and timm weights) and torch
   hub's ``checkpoints/`` folder (SAM);
4. a download — unless offline (``--offline``, ``S2CLIP_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``).

A file that cannot be found is a `S2ClipError` naming the file, where to put it and the
command that fetches it. Nothing falls back to random weights.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import S2ClipError
from .registry import ModelSpec

# Alternative file names the Hugging Face repositories hold for the same weights.
_HF_ALTERNATIVES = {
    "open_clip_model.safetensors": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "model.safetensors": ("model.safetensors", "pytorch_model.bin"),
}


def weights_dir() -> Path:
    """The directory s2clip reads and downloads its checkpoints to."""
    return Path(os.environ.get("S2CLIP_WEIGHTS_DIR", Path.home() / ".cache" / "s2clip")).expanduser()


def is_offline(flag: bool = False) -> bool:
    """True if downloads are forbidden by the flag or the environment."""
    truthy = {"1", "true", "yes", "on"}
    return (
        flag
        or os.environ.get("S2CLIP_OFFLINE", "").lower() in truthy
        or os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy
    )


@dataclass(frozen=True)
class Located:
    path: Path | None
    where: str  # "explicit", "weights dir", "hf cache", "torch hub cache", "missing"


def _hf_candidates(spec: ModelSpec) -> tuple[str, ...]:
    if spec.hf_filename is None:
        return ()
    return _HF_ALTERNATIVES.get(spec.hf_filename, (spec.hf_filename,))


def _hf_cache_dir() -> str | None:
    """The hub cache as the environment names it now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _hf_cached(spec: ModelSpec) -> Path | None:
    if not spec.hf_repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    for filename in _hf_candidates(spec):
        hit = try_to_load_from_cache(repo_id=spec.hf_repo, filename=filename, cache_dir=_hf_cache_dir())
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def _torch_hub_cached(spec: ModelSpec) -> Path | None:
    if not spec.url:
        return None
    import torch.hub

    candidate = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    return candidate if candidate.is_file() else None


def locate(spec: ModelSpec, explicit: str | Path | None = None) -> Located:
    """Find a checkpoint without downloading anything."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise S2ClipError(f"weights file {path} for {spec.name} does not exist")
        return Located(path, "explicit")
    local = weights_dir() / spec.filename
    if local.is_file():
        return Located(local, "weights dir")
    hf = _hf_cached(spec)
    if hf is not None:
        return Located(hf, "hf cache")
    hub = _torch_hub_cached(spec)
    if hub is not None:
        return Located(hub, "torch hub cache")
    return Located(None, "missing")


def missing_message(spec: ModelSpec) -> str:
    """One line: which file, where to put it, how to fetch it."""
    origin = f"hf://{spec.hf_repo}/{spec.hf_filename}" if spec.hf_repo else spec.url
    return (
        f"missing weights for {spec.name}: put {spec.filename} in {weights_dir()} "
        f"(from {origin}) or run `s2clip models download {spec.name}` on a machine with internet"
    )


def _check_loadable(path: Path) -> None:
    """Raise if `path` is not a readable state dict (safetensors or a torch pickle of tensors)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if not list(f.keys()):
                    raise ValueError("no tensors")
        else:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict) or not obj:
                raise ValueError("not a state dict")
    except Exception as exc:  # noqa: BLE001 - any failure means a bad file
        raise S2ClipError(f"checkpoint {path} is corrupt or not a state dict ({exc})") from None


def download(spec: ModelSpec) -> Path:
    """Fetch `spec`'s weights. Hub files go through huggingface_hub (its cache); direct URLs
    go to a temporary file in the weights directory, are checked, then renamed into place."""
    if spec.hf_repo:
        import logging

        from huggingface_hub import hf_hub_download

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # errors reach the user as ours

        last_error: Exception | None = None
        for filename in _hf_candidates(spec):
            try:
                path = Path(hf_hub_download(repo_id=spec.hf_repo, filename=filename, cache_dir=_hf_cache_dir()))
                _check_loadable(path)
                return path
            except S2ClipError:
                raise
            except Exception as exc:  # noqa: BLE001 - try the next alternative
                last_error = exc
        raise S2ClipError(f"could not download {spec.name} from {spec.hf_repo} ({type(last_error).__name__})") from None
    if not spec.url:  # pragma: no cover - every spec has a source
        raise S2ClipError(f"no download source known for {spec.name}")
    target = weights_dir() / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        _check_loadable(tmp)
        os.replace(tmp, target)
    except S2ClipError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - network errors of every kind
        tmp.unlink(missing_ok=True)
        raise S2ClipError(f"could not download {spec.name} from {spec.url} ({type(exc).__name__}: {exc})") from None
    return target


def resolve(spec: ModelSpec, explicit: str | Path | None = None, *, offline: bool = False) -> Path:
    """Return a checkpoint path for `spec`, downloading it only when allowed."""
    found = locate(spec, explicit)
    if found.path is not None:
        return found.path
    if is_offline(offline):
        raise S2ClipError(missing_message(spec) + " (offline)")
    try:
        return download(spec)
    except S2ClipError as exc:
        raise S2ClipError(f"{missing_message(spec)} — {exc}") from None
