"""Finding (and, when allowed, downloading) checkpoints, and naming them by their content.

Resolution order, first hit wins:

1. an explicit path the user gave (`--clip-weights`, `--vfm-weights`, `--sam-weights`, `--sd-weights`);
2. ``$S2CLIP_WEIGHTS_DIR/<spec.filename>`` (default ``~/.cache/s2clip``);
3. the libraries' own caches: the Hugging Face hub cache (open_clip and timm weights, the SD folder)
   and torch hub's ``checkpoints/`` folder (SAM);
4. a download — unless offline (``--offline``, ``S2CLIP_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``).

Every function here handles every family, the Stable Diffusion folder (family ``sd``, through
`models.sd`) included. A run that lacks several checkpoints gets one `S2ClipError` line naming all
of them, where to put them and one ``s2clip models download A B C`` command (`resolve_all`).
Nothing falls back to random weights.

Identity: a checkpoint is named by the sha256 of its content (`content_identity`, for the SD folder
of the files it loads), hashed once per file version and remembered in
``$S2CLIP_WEIGHTS_DIR/content-hashes.json`` (keyed by resolved path, size and mtime_ns), so the
same weights at different paths or with different mtimes give the same resume signature.

SAM files carry a digest prefix in their names (``sam_vit_b_01ec64.pth``): it is the file's **MD5**
(``01ec64d29a2fca3f0661936605ae66f8``), so a download is checked against it while it streams, not by
``torch.load``-ing gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import stat
import struct
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import S2ClipError, one_line
from ..io.files import atomic_path, atomic_write_text, hash_file
from .registry import ModelSpec

log = logging.getLogger(__name__)

# Alternative file names the Hugging Face repositories hold for the same weights.
_HF_ALTERNATIVES = {
    "open_clip_model.safetensors": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "model.safetensors": ("model.safetensors", "pytorch_model.bin"),
}
HASH_CACHE_NAME = "content-hashes.json"
HASH_CACHE_MAX_BYTES = 16 << 20  # ~200 bytes an entry
IDENTITY_HEX = 16  # hex digits of sha256 in an identity string
_CHUNK = 4 << 20
# `sam_vit_b_01ec64.pth`: the hex group before `.pth` is the start of the file's MD5.
_NAME_DIGEST = re.compile(r"^sam_.*_([0-9a-f]{6,32})\.pth$")

Request = tuple[ModelSpec, str | Path | None]  # a spec and the explicit path the user gave (or None)


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


def hf_cache_dir() -> str | None:
    """The hub cache as the environment names it now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


_hf_cache_dir = hf_cache_dir  # the old private name


def _hf_candidates(spec: ModelSpec) -> tuple[str, ...]:
    if spec.hf_filename is None:
        return ()
    return _HF_ALTERNATIVES.get(spec.hf_filename, (spec.hf_filename,))


def _hf_cached(spec: ModelSpec) -> Path | None:
    if not spec.hf_repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    for filename in _hf_candidates(spec):
        hit = try_to_load_from_cache(repo_id=spec.hf_repo, filename=filename, cache_dir=hf_cache_dir())
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def _torch_hub_cached(spec: ModelSpec) -> Path | None:
    if not spec.url:
        return None
    import torch.hub

    candidate = Path(torch.hub.get_dir()) / "checkpoints" / spec.filename
    return candidate if candidate.is_file() else None


# ---------------------------------------------------------------------------------------- locating


def locate(spec: ModelSpec, explicit: str | Path | None = None) -> Located:
    """Find a checkpoint (a file, or the SD folder) without downloading anything. An explicit path
    that does not exist (or an incomplete explicit SD folder) is an `S2ClipError`."""
    if spec.family == "sd":
        from .sd import locate_sd

        return locate_sd(explicit)
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


locate_any = locate  # every family, the SD folder included


def download_command(specs: Sequence[ModelSpec]) -> str:
    """``s2clip models download A B C``: one command for every spec (repeated files once)."""
    return "s2clip models download " + " ".join(s.name for s in _unique_files(specs))


def _unique_files(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """Specs with distinct files (`sam_vitb16` and `vit_b` share the SAM ViT-B file), in order."""
    seen: set[str] = set()
    out = []
    for spec in specs:
        if spec.filename not in seen:
            seen.add(spec.filename)
            out.append(spec)
    return out


def _what_to_put(spec: ModelSpec) -> str:
    if spec.family == "sd":
        return f"{spec.filename}/ (a diffusers folder of hf://{spec.hf_repo})"
    origin = f"hf://{spec.hf_repo}/{spec.hf_filename}" if spec.hf_repo else spec.url
    return f"{spec.filename} (from {origin})"


def missing_weights_message(specs: Sequence[ModelSpec], *, offline: bool = False,
                            failures: Mapping[str, str] | None = None) -> str:
    """One line naming every missing checkpoint, where to put it, and one command fetching them all.
    ``failures`` maps a spec name to why its download failed."""
    unique = _unique_files(specs)
    names = ", ".join(s.name for s in specs)
    files = ", ".join(_what_to_put(s) for s in unique)
    text = (f"missing weights for {names}{' (offline)' if offline else ''}: put {files} in {weights_dir()}, "
            f"or run `{download_command(unique)}` on a machine with internet")
    if failures:
        text += " — download failed: " + "; ".join(f"{name}: {why}" for name, why in failures.items())
    return one_line(text)


def missing_message(spec: ModelSpec) -> str:
    """One line: which file, where to put it, how to fetch it."""
    return missing_weights_message([spec])


# ---------------------------------------------------------------------------------------- hashing


def _digest_file(path: Path) -> dict[str, str]:
    """sha256 and md5 of a file, in one pass."""
    return hash_file(path, "sha256", "md5")[1]


def _cache_path() -> Path:
    return weights_dir() / HASH_CACHE_NAME


def _read_cache() -> dict[str, dict[str, object]]:
    """The remembered digests; empty when the file is missing, not a regular file, too big or damaged
    (it is only an optimisation: a damaged cache costs a re-hash, never an error)."""
    path = _cache_path()
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > HASH_CACHE_MAX_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _stamp(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime_ns): what must match for a remembered digest to be reused."""
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), st.st_size, st.st_mtime_ns


def _remember(path: Path, digests: Mapping[str, str]) -> None:
    """Store ``digests`` for ``path``'s current version (best effort: an unwritable cache only costs
    a re-hash later; concurrent writers may drop each other's entries, with the same cost)."""
    key, size, mtime_ns = _stamp(path)
    try:
        cache = _read_cache()
        cache[key] = {"size": size, "mtime_ns": mtime_ns, **digests}
        _cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_path(), json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
        log.debug("cannot update the weights hash cache %s: %s", _cache_path(), exc)


def file_digests(path: str | Path) -> dict[str, str]:
    """``{"sha256": hex, "md5": hex}`` of a file, read once per version of the file (cached)."""
    path = Path(path)
    key, size, mtime_ns = _stamp(path)
    entry = _read_cache().get(key)
    if (isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns
            and isinstance(entry.get("sha256"), str) and isinstance(entry.get("md5"), str)):
        return {"sha256": str(entry["sha256"]), "md5": str(entry["md5"])}
    digests = _digest_file(path)
    _remember(path, digests)
    return digests


def _sd_content_files(folder: Path) -> list[Path]:
    """The files SD loading reads: everything in the SD subfolders (weights, configs, tokenizer)."""
    from .sd import SUBFOLDERS

    return sorted(p for sub in SUBFOLDERS for p in (folder / sub).rglob("*")
                  if p.is_file() and not p.name.startswith("."))


def content_identity(path: str | Path) -> str:
    """``sha256:<16 hex>`` of a checkpoint's content: the file's sha256, or for a folder (the SD
    checkpoint) the sha256 of its files' relative paths and sha256s. Independent of where the
    checkpoint lies and of its mtime."""
    path = Path(path)
    if path.is_dir():
        listing = "".join(f"{p.relative_to(path).as_posix()}\0{file_digests(p)['sha256']}\n"
                          for p in _sd_content_files(path))
        digest = hashlib.sha256(listing.encode("utf-8")).hexdigest()
    else:
        digest = file_digests(path)["sha256"]
    return f"sha256:{digest[:IDENTITY_HEX]}"


def name_digest(filename: str) -> str | None:
    """The MD5 prefix a SAM release file carries in its name (``sam_vit_b_01ec64.pth`` → ``01ec64``)."""
    match = _NAME_DIGEST.match(filename)
    return match.group(1) if match else None


def check_name_digest(path: str | Path, name: str | None = None) -> bool:
    """Check a file against the MD5 prefix in ``name`` (default: its own name). False when the name
    carries none; `S2ClipError` when the content does not match it."""
    path = Path(path)
    expected = name_digest(name or path.name)
    if expected is None:
        return False
    actual = file_digests(path)["md5"]
    if not actual.startswith(expected):
        raise S2ClipError(f"checkpoint {path} is corrupt or incomplete: its MD5 {actual[:12]}… does not start "
                          f"with {expected}, the digest in its release name")
    return True


# ---------------------------------------------------------------------------------------- damaged files

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6 (a zip of data.pkl + tensor records)
_PICKLE_PROTO = 0x80  # the legacy torch.save format starts with a pickle protocol opcode
_SAFETENSORS_HEADER_MAX = 100 << 20  # the safetensors library refuses bigger headers too


def _safetensors_damage(fh: BinaryIO, size: int) -> str | None:
    """What is wrong with a file read as safetensors (8-byte length, JSON header, data), or None."""
    if size < 8:
        return f"is truncated or not a checkpoint ({size} bytes)"
    (header_len,) = struct.unpack("<Q", fh.read(8))
    if header_len > _SAFETENSORS_HEADER_MAX or header_len < 2:
        return "is not a checkpoint (neither a PyTorch file nor safetensors)"
    if 8 + header_len > size:
        return f"is truncated: {size} bytes, but its safetensors header alone takes {8 + header_len}"
    try:
        header = json.loads(fh.read(header_len).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "is not a checkpoint (neither a PyTorch file nor safetensors)"
    if not isinstance(header, dict):
        return "is not a checkpoint (its safetensors header is not a table)"
    ends = [entry.get("data_offsets", [0, 0])[-1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)]
    if not all(isinstance(end, int) for end in ends):
        return "is corrupt (its safetensors header holds non-integer offsets)"
    expected = 8 + header_len + max(ends, default=0)
    if expected > size:
        return f"is truncated: {size} bytes, but its safetensors header describes {expected}"
    return None


def checkpoint_damage(path: str | Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, found cheaply (headers and the zip directory only, never
    the tensors): not a regular file, empty, a truncated zip or safetensors file, or neither format.
    None when its container looks intact (the problem, if any, is in what it holds)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_size == 0:
            return "is empty (0 bytes)"
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head.startswith(_ZIP_MAGIC):
                try:
                    with zipfile.ZipFile(fh) as archive:
                        names = archive.namelist()
                except (zipfile.BadZipFile, OSError, ValueError):
                    return "is truncated or corrupt (a PyTorch zip checkpoint without its central directory)"
                if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
                    return "is a zip archive, not a PyTorch checkpoint"
                return None
            if head[:1] == bytes([_PICKLE_PROTO]):
                return None  # a legacy pickle: only loading tells whether it is complete
            fh.seek(0)
            return _safetensors_damage(fh, st.st_size)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def checkpoint_error(path: str | Path, exc: BaseException, what: str) -> S2ClipError:
    """One line naming the checkpoint `path` (of `what`, e.g. "CLIP ViT-B/16") and what is wrong with
    it, from the loader's exception `exc` and a look at the file (`checkpoint_damage`)."""
    damage = checkpoint_damage(path)
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if damage is not None:
        reason = damage
    elif "weights_only" in text or "Weights only load failed" in text:
        reason = ("holds pickled Python objects besides tensors; it was not loaded, since loading it could run "
                  "code (a state dict of tensors is expected)")
    elif isinstance(exc, EOFError) or "unexpected EOF" in text or "truncated" in text:
        reason = "is truncated or corrupt"
    elif isinstance(exc, pickle.UnpicklingError):
        reason = f"is corrupt or not a checkpoint ({first})"
    elif isinstance(exc, RuntimeError) and ("size mismatch" in text or "Missing key" in text
                                            or "Unexpected key" in text):
        detail = next((line.strip() for line in text.splitlines()
                       if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line), first)
        reason = f"does not match the {what} architecture ({detail[:300]})"
    elif isinstance(exc, (AttributeError, TypeError, KeyError, IndexError, StopIteration)):
        reason = f"does not hold a state dict of tensors ({type(exc).__name__}: {first})"
    else:
        reason = f"cannot be loaded ({type(exc).__name__}: {first})"
    return S2ClipError(one_line(f"{what} checkpoint {path} {reason}"[:1000]))


def _check_loadable(path: Path) -> None:
    """Raise if `path` is not a readable state dict (safetensors or a torch pickle of tensors)."""
    damage = checkpoint_damage(path)
    if damage is not None:
        raise S2ClipError(f"checkpoint {path} {damage}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if not list(f.keys()):
                    raise S2ClipError(f"checkpoint {path} holds no tensors")
        else:
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict) or not obj:
                raise S2ClipError(f"checkpoint {path} does not hold a state dict (it holds {type(obj).__name__})")
    except S2ClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means a bad file
        raise checkpoint_error(path, exc, "downloaded") from None


# ---------------------------------------------------------------------------------------- downloading


def _download_url(spec: ModelSpec) -> Path:
    """Stream ``spec.url`` to a temporary file in the weights dir, hashing as it arrives; check the
    name's MD5 prefix (or, for names without one, that it loads); rename into place."""
    assert spec.url is not None
    target = weights_dir() / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = name_digest(spec.filename)
    with atomic_path(target) as tmp:
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as response:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    md5.update(chunk)
        except Exception as exc:  # noqa: BLE001 - network and disk errors of every kind
            raise S2ClipError(one_line(f"could not download {spec.name} from {spec.url} "
                                       f"({type(exc).__name__}: {exc})")) from None
        if expected is not None:
            if not md5.hexdigest().startswith(expected):
                raise S2ClipError(f"download of {spec.name} from {spec.url} is corrupt: its MD5 "
                                  f"{md5.hexdigest()[:12]}… does not start with {expected}")
        else:
            _check_loadable(tmp)
    _remember(target, {"sha256": sha.hexdigest(), "md5": md5.hexdigest()})
    return target


def download(spec: ModelSpec) -> Path:
    """Fetch `spec`'s weights, whatever its family. Hub files go through huggingface_hub (its
    cache); the SD folder through `models.sd.download_sd`; direct URLs (SAM) to the weights dir."""
    if spec.family == "sd":
        from .sd import download_sd

        return download_sd()
    if spec.hf_repo:
        from huggingface_hub import hf_hub_download

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # errors reach the user as ours

        last_error: Exception | None = None
        for filename in _hf_candidates(spec):
            try:
                path = Path(hf_hub_download(repo_id=spec.hf_repo, filename=filename, cache_dir=hf_cache_dir()))
                _check_loadable(path)
                return path
            except S2ClipError:
                raise
            except Exception as exc:  # noqa: BLE001 - try the next alternative
                last_error = exc
        raise S2ClipError(f"could not download {spec.name} from {spec.hf_repo} ({type(last_error).__name__})") from None
    if not spec.url:  # pragma: no cover - every spec has a source
        raise S2ClipError(f"no download source known for {spec.name}")
    return _download_url(spec)


download_any = download  # every family, the SD folder included


# ---------------------------------------------------------------------------------------- resolving


def resolve_all(requests: Sequence[Request], *, offline: bool = False) -> list[Path]:
    """Paths for every ``(spec, explicit)`` request, downloading what is missing when allowed.

    Everything is tried before anything is reported: a bad explicit path and every checkpoint that
    is still missing end up in one `S2ClipError` line, with one download command for all of them."""
    problems: list[str] = []
    found: list[Path | None] = []
    for spec, explicit in requests:
        try:
            found.append(locate(spec, explicit).path)
        except S2ClipError as exc:
            problems.append(str(exc))
            found.append(None)
    missing = [i for i, (path, (_, explicit)) in enumerate(zip(found, requests, strict=True))
               if path is None and explicit is None]
    offline = is_offline(offline)
    failures: dict[str, str] = {}
    if not offline and not problems:
        for i in missing:
            spec = requests[i][0]
            same = next((j for j in missing if j < i and requests[j][0].filename == spec.filename), None)
            try:
                found[i] = found[same] if same is not None and found[same] is not None else download(spec)
            except S2ClipError as exc:
                failures[spec.name] = str(exc)
    still = [requests[i][0] for i in missing if found[i] is None]
    if still:
        problems.append(missing_weights_message(still, offline=offline, failures=failures))
    if problems:
        raise S2ClipError(one_line("; ".join(problems)))
    return [p for p in found if p is not None]


def resolve(spec: ModelSpec, explicit: str | Path | None = None, *, offline: bool = False) -> Path:
    """Return a checkpoint path for `spec`, downloading it only when allowed."""
    return resolve_all([(spec, explicit)], offline=offline)[0]


class RankGroup(Protocol):
    """What `resolve_collectively` needs of a process group (`s2clip_cli.distributed.DistContext`)."""

    @property
    def rank(self) -> int: ...

    @property
    def local_rank(self) -> int: ...

    @property
    def is_distributed(self) -> bool: ...

    def failed_ranks(self, ok: bool, *, long_wait: bool = False) -> list[int]: ...


def _resolve_and_hash(requests: Sequence[Request], offline: bool) -> list[Path]:
    paths = resolve_all(requests, offline=offline)
    for path in paths:
        content_identity(path)  # fills the hash cache for the ranks that read it next
    return paths


def resolve_collectively(requests: Sequence[Request], *, offline: bool = False,
                         group: RankGroup | None = None) -> list[Path]:
    """`resolve_all` on every rank, with each download done once while the others wait.

    1. rank 0 resolves (downloading what is missing) and hashes; the others wait (up to 24 h);
    2. the local rank 0 of every other node does the same — it finds rank 0's files when the nodes
       share the weights dir and downloads its node's copy when they do not;
    3. every rank resolves without downloading.
    After each phase the ranks agree: when one failed, every rank raises (the failing one its own
    error). Without a distributed group this is `resolve_all` plus hashing."""
    if group is None or not group.is_distributed:
        return _resolve_and_hash(requests, offline)
    phases = (group.rank == 0, group.rank != 0 and group.local_rank == 0, True)
    paths: list[Path] = []
    for phase, mine in enumerate(phases):
        error: BaseException | None = None
        if mine:
            try:
                paths = _resolve_and_hash(requests, offline if phase < 2 else True)
            except Exception as exc:  # noqa: BLE001 - reported below, on every rank
                error = exc
        failed = group.failed_ranks(error is None, long_wait=True)
        if error is not None:
            raise error
        if failed:
            raise S2ClipError(f"weights could not be resolved on rank {', '.join(map(str, failed))} "
                              "(its error says what is missing and how to fetch it)")
    return paths
