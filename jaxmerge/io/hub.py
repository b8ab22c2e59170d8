"""Model references by Hugging Face hub id: ``org/name`` and ``org/name@revision``.

``jaxmerge merge`` accepts, wherever a config names a model, a local path or a hub id (mergekit's spelling).
:func:`locate` returns a local directory: the path itself when it exists, else the snapshot of the repository
at the revision (default ``main``) downloaded through ``huggingface_hub`` into the hub cache (``HF_HUB_CACHE``,
else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``). With ``HF_HUB_OFFLINE=1`` (read when called) only the
cache is used. Only the files a merge reads are fetched: safetensors weights and their index, JSON configs,
tokenizer files and chat templates (never pickles).
"""

from __future__ import annotations

import os
import pathlib
import re

__all__ = ["DOWNLOAD_PATTERNS", "is_hub_id", "locate", "split_revision"]

DOWNLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.txt", "*.jinja")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE = ("1", "true", "yes", "on")


def split_revision(ref: str) -> tuple[str, str | None]:
  """``"org/name@rev"`` -> ``("org/name", "rev")``; without ``@``, the revision is ``None``.

  Args:
    ref: a model reference.

  Returns:
    The repository id and the revision.
  """
  if "@" in ref:
    repo, rev = ref.rsplit("@", 1)
    return repo, rev or None
  return ref, None


def is_hub_id(ref: str) -> bool:
  """Whether ``ref`` is spelled like a hub id (``org/name`` with an optional ``@revision``).

  Args:
    ref: a model reference that is not an existing local path.

  Returns:
    Whether it looks like a hub repository id.
  """
  repo, _ = split_revision(str(ref))
  return _REPO.fullmatch(repo) is not None and not str(ref).startswith((".", "/", "~"))


def _cache_dir() -> str:
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  if os.environ.get("HF_HOME"):
    return os.path.join(os.environ["HF_HOME"], "hub")
  return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def _offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def locate(ref: str | os.PathLike, *, what: str = "model") -> pathlib.Path:
  """A local path for a model reference: the path itself, or the hub snapshot of ``org/name[@revision]``.

  Args:
    ref: a local path or a hub id.
    what: how to name the reference in errors (e.g. ``"base_model"``).

  Returns:
    The local file or directory.

  Raises:
    ValueError: a missing local path, or a hub id that cannot be downloaded (offline and not cached, unknown
      repository or revision, no network), naming ``ref``.
  """
  p = pathlib.Path(ref).expanduser()
  if p.exists():
    return p
  text = str(ref)
  if not is_hub_id(text):
    raise ValueError(f"{what} {text!r} does not exist (neither a local path nor a hub id org/name[@revision])")
  repo, rev = split_revision(text)
  try:
    from huggingface_hub import snapshot_download  # noqa: PLC0415
  except ImportError as e:
    raise ValueError(f"{what} {text!r} is not a local path; reading it from the hub needs huggingface_hub "
                     "(pip install huggingface_hub)") from e
  offline = _offline()
  try:
    path = snapshot_download(repo, revision=rev, cache_dir=_cache_dir(), local_files_only=offline,
                             allow_patterns=list(DOWNLOAD_PATTERNS))
  except Exception as e:  # noqa: BLE001 (the hub raises many types: offline, not found, gated, no network)
    how = ("HF_HUB_OFFLINE is set and it is not in the hub cache " + _cache_dir()) if offline else \
        "it could not be downloaded"
    raise ValueError(f"{what} {text!r}: {how} ({type(e).__name__}: {e})") from e
  return pathlib.Path(path)
