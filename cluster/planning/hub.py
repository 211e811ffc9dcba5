"""Where a model comes from: a local directory or a Hugging Face hub repository.

Planning needs a checkpoint's shapes, never its weights. ``resolve(source, revision)``
returns the ``config.json`` dictionary, the commit it came from, and, when they can be
read, the dtype and shape of every tensor from the safetensors headers:

* a local directory: the headers are read from its ``*.safetensors`` files (8 bytes of
  header length, then the JSON header; the data is never touched);
* a hub id: ``huggingface_hub`` fetches ``config.json``, the safetensors index and the
  tokenizer / chat-template files into its own cache (so ``HF_HOME``, ``HF_HUB_CACHE``,
  ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` act as the library defines them),
  and reads each shard's header with a ranged GET. Headers are kept beside the cache
  (``<HF_HUB_CACHE>/.kvpilot-headers/``) so an offline plan of a repository seen before is
  still exact.

Errors name the repository and say what to do (``HubError``, a ``ValueError``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HubError", "ResolvedSource", "TensorInfo", "is_hub_id", "read_local_headers", "resolve", "resolve_adapter",
           "resolve_source"]

# Files planning and tokenization need; weights are never downloaded.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is not one

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(ValueError):
    """A source could not be resolved; the message names it and says what to do."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype: F32, F16, BF16, I32, I8, U8, F8_E4M3, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ResolvedSource:
    """A source as planning sees it. ``tensors`` is None when no header could be read."""

    source: str
    config: dict[str, Any]
    revision: str | None = None  # the commit, for hub ids
    local_dir: str | None = None  # the local directory, or the hub snapshot holding config + tokenizer files
    tensors: dict[str, TensorInfo] | None = None
    headers_note: str = ""  # where the tensors came from, or why there are none
    files: tuple[str, ...] = field(default_factory=tuple)


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()


def _local_path(source: str) -> Path:
    try:
        return Path(source).expanduser()
    except RuntimeError:  # "~user/..." for a user this machine does not have
        raise HubError(f"{source}: no such directory (no home directory for that user)") from None


def resolve(source: str, revision: str | None = None) -> ResolvedSource:
    """Resolve a local directory or a hub id (at ``revision``, default ``main``)."""
    path = _local_path(source)
    if path.is_dir():
        if revision is not None:
            raise HubError(f"{source}: revision {revision!r} applies to hub ids, not to a local directory")
        return _resolve_local(source, path)
    if source.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(source):
        raise HubError(f"{source}: no such model directory, and not a hub id of the form ORG/NAME")
    return _resolve_hub(source, revision)


def resolve_source(source: str, revision: str | None = None) -> str:
    """A local directory with the model's config and tokenizer files (a hub snapshot for hub ids).

    What a tokenizer or chat template loader needs, without the weights.
    """
    resolved = resolve(source, revision)
    assert resolved.local_dir is not None
    return resolved.local_dir


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")


def resolve_adapter(source: str, revision: str | None = None) -> tuple[str, dict[str, Any]]:
    """A LoRA adapter (a local directory or a hub id): its local directory and ``adapter_config.json``.

    Unlike a model, an adapter is small: from the hub its config and weights are downloaded
    (``huggingface_hub``'s cache, same environment variables), since vLLM loads it from a path.
    """
    path = _local_path(source)
    if path.is_dir():
        if revision is not None:
            raise HubError(f"{source}: revision {revision!r} applies to hub ids, not to a local directory")
        directory = path.resolve()
    elif source.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(source):
        raise HubError(f"{source}: no such adapter directory, and not a hub id of the form ORG/NAME")
    else:
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(source, revision=revision, allow_patterns=list(ADAPTER_FILES)))
        except Exception as e:  # the same causes as a model's: offline, gated, not found, unreachable
            raise _hub_error(source, revision, e) from e
    cfg_file = directory / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise HubError(f"{source}: no {ADAPTER_CONFIG} (a PEFT LoRA adapter has one)")
    return str(directory), _read_json(cfg_file, ADAPTER_CONFIG)


# --- local ----------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HubError(f"{path}: {what} is not valid JSON ({e})") from e


def read_header(data: bytes, where: str) -> dict[str, TensorInfo]:
    """Tensors of one safetensors header (the JSON after the 8-byte length)."""
    try:
        header = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HubError(f"{where}: safetensors header is not valid JSON ({e})") from e
    return {
        name: TensorInfo(str(t["dtype"]), tuple(int(d) for d in t["shape"]))
        for name, t in header.items()
        if name != "__metadata__"
    }


def read_local_headers(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of every ``*.safetensors`` file in ``directory`` (headers only)."""
    tensors: dict[str, TensorInfo] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with f.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise HubError(f"{f}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise HubError(f"{f}: header length {n} is not a safetensors header")
            tensors.update(read_header(fh.read(n), str(f)))
    return tensors


def _resolve_local(source: str, path: Path) -> ResolvedSource:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HubError(f"{source}: directory has no config.json")
    cfg = _read_json(cfg_file, "config.json")
    tensors = read_local_headers(path) or None
    note = "safetensors headers of the local files" if tensors else "no safetensors files in the directory"
    return ResolvedSource(source, cfg, None, str(path.resolve()), tensors, note)


# --- hub --------------------------------------------------------------------


def _hub_error(repo: str, revision: str | None, e: Exception) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(e, GatedRepoError):
        return HubError(
            f"{repo}: the repository is gated or private and the hub refused access{rev}: accept its licence on "
            "the hub, then set HF_TOKEN (or the chart's secrets.hfToken) to a token that may read it"
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo}: revision {revision!r} not found in the repository")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"{repo}: no such repository on the hub (or it is private: set HF_TOKEN or secrets.hfToken)"
        )
    network = isinstance(e, ConnectionError) or type(e).__module__.split(".")[0] in ("httpx", "httpcore", "httpx2")
    if network or isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE and not network:
            return HubError(
                f"{repo}: HF_HUB_OFFLINE is set and the repository{rev} is not in the cache "
                f"({constants.HF_HUB_CACHE}); plan it once online, or give a local model directory"
            )
        return HubError(
            f"{repo}: the hub ({constants.ENDPOINT}) cannot be reached and the repository{rev} is not cached: "
            "check the network, or set HF_ENDPOINT to a reachable mirror"
        )
    return HubError(f"{repo}: cannot read from the hub: {e}")


def _resolve_hub(repo: str, revision: str | None) -> ResolvedSource:
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    api = HfApi()
    files: list[str] | None = None
    try:
        if constants.HF_HUB_OFFLINE:
            cfg_path = hf_hub_download(repo, "config.json", revision=revision)
            commit = Path(cfg_path).parent.name
        else:
            info = api.model_info(repo, revision=revision)
            commit = info.sha or revision or "main"
            files = [s.rfilename for s in (info.siblings or [])]
            # By the ref asked for, so the cache records ref -> commit for a later offline plan.
            cfg_path = hf_hub_download(repo, "config.json", revision=revision or "main")
            commit = Path(cfg_path).parent.name
    except LocalEntryNotFoundError as e:
        raise _hub_error(repo, revision, e) from e
    except EntryNotFoundError as e:
        raise HubError(f"{repo}: the repository has no config.json; kvpilot plans transformers checkpoints") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise _hub_error(repo, revision, e) from e
    except Exception as e:  # httpx connection errors: no network, refused, DNS
        if type(e).__module__.startswith(("httpx", "httpcore", "httpx2")):
            raise _hub_error(repo, revision, e) from e
        raise
    snapshot = Path(cfg_path).parent
    cfg = _read_json(Path(cfg_path), "config.json")
    fetched = ["config.json"]
    for name in SIDE_FILES:
        if files is None:
            if isinstance(try_to_load_from_cache(repo, name, revision=commit), str):
                fetched.append(name)
            continue
        if name in files:
            try:
                hf_hub_download(repo, name, revision=commit)
                fetched.append(name)
            except (HfHubHTTPError, OSError) as e:
                raise _hub_error(repo, revision, e) from e
    tensors, note = _hub_headers(api, repo, commit, files)
    return ResolvedSource(repo, cfg, commit, str(snapshot), tensors, note, tuple(fetched))


def _header_cache(repo: str, commit: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ".kvpilot-headers" / f"{repo.replace('/', '--')}--{commit}.json"


def _hub_headers(api: Any, repo: str, commit: str, files: list[str] | None) -> tuple[dict[str, TensorInfo] | None, str]:
    """Tensors from the shards' headers (ranged reads), cached per commit; None when unavailable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    cache = _header_cache(repo, commit)
    if cache.is_file():
        raw = json.loads(cache.read_text())
        return {k: TensorInfo(v[0], tuple(v[1])) for k, v in raw.items()}, "safetensors headers (cached)"
    if files is None:
        return None, "offline and no cached safetensors headers"
    if SINGLE_FILE in files:
        shards = [SINGLE_FILE]
    elif INDEX_FILE in files:
        index = _read_json(Path(hf_hub_download(repo, INDEX_FILE, revision=commit)), INDEX_FILE)
        shards = sorted(set(index.get("weight_map", {}).values()))
    else:
        return None, "the repository has no safetensors files"
    tensors: dict[str, TensorInfo] = {}
    try:
        for shard in shards:
            meta = api.parse_safetensors_file_metadata(repo, shard, revision=commit)
            for name, t in meta.tensors.items():
                tensors[name] = TensorInfo(str(t.dtype), tuple(int(d) for d in t.shape))
    except (HfHubHTTPError, OSError) as e:
        return None, f"safetensors headers unreadable ({type(e).__name__})"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: [v.dtype, list(v.shape)] for k, v in tensors.items()}))
    return tensors, f"safetensors headers of {len(shards)} file(s), ranged reads"
