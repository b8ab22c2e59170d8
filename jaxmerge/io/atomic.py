"""Atomic outputs: temporary names that say who owns them, their cleanup, and the user's umask.

Every output is written under a hidden temporary name beside its final path and renamed when complete. The
temporary name carries the writing process's id and a hash of its host name (``.NAME.jm<pid>h<host>-XXXX.tmp``),
so that a later run can tell a leftover of a killed run (its process is gone) from one still being written, and
removes only the former, and only when it is this user's. Temporary files and directories are created private
(``mkstemp``/``mkdtemp``); just before the rename they get the permissions the user's umask gives new files.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import socket
import stat
import tempfile

from jaxmerge.engine.host import umask as umask

__all__ = ["apply_umask", "make_parents", "mkdtemp", "mkstemp", "remove_empty", "remove_stale", "umask"]

_STALE = re.compile(r"^\..*\.jm(\d+)h([0-9a-f]{8})-[^/]*\.(tmp|old)$")


def _host() -> str:
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(name: str) -> str:
  return f".{name}.jm{os.getpid()}h{_host()}-"


def mkstemp(path: pathlib.Path) -> tuple[int, str]:
  """A private temporary file beside ``path`` (``tempfile.mkstemp``), named for :func:`remove_stale`.

  Args:
    path: the final path the temporary file will be renamed to.

  Returns:
    ``(fd, name)`` as ``tempfile.mkstemp``.
  """
  return tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)


def mkdtemp(path: pathlib.Path, suffix: str = ".tmp") -> pathlib.Path:
  """A private temporary directory beside ``path`` (``tempfile.mkdtemp``), named for :func:`remove_stale`.

  Args:
    path: the final path the temporary directory will be renamed to.
    suffix: ``".tmp"``, or ``".old"`` for a directory being replaced.

  Returns:
    The new directory.
  """
  return pathlib.Path(tempfile.mkdtemp(prefix=_prefix(path.name), suffix=suffix, dir=path.parent))


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale(directory: str | os.PathLike) -> list[pathlib.Path]:
  """Removes the temporaries that killed jaxmerge runs of this user on this host left in ``directory``.

  Args:
    directory: where outputs are being written.

  Returns:
    The removed paths.
  """
  directory = pathlib.Path(directory)
  removed = []
  try:
    entries = list(os.scandir(directory))
  except OSError:
    return removed
  host, uid = _host(), os.getuid() if hasattr(os, "getuid") else None
  for e in entries:
    m = _STALE.match(e.name)
    if not m or m.group(2) != host or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
      continue
    try:
      st = e.stat(follow_symlinks=False)
    except OSError:
      continue
    if uid is not None and st.st_uid != uid:
      continue
    p = pathlib.Path(e.path)
    if stat.S_ISDIR(st.st_mode):
      shutil.rmtree(p, ignore_errors=True)
    else:
      p.unlink(missing_ok=True)
    removed.append(p)
  return removed


def apply_umask(path: str | os.PathLike) -> None:
  """Gives ``path`` (and, for a directory, everything under it) the permissions new files and directories get
  under the user's umask (files ``0666 & ~umask``, directories ``0777 & ~umask``; symbolic links are left).

  Args:
    path: a file or directory this process created.
  """
  path = pathlib.Path(path)
  mask = umask()
  if path.is_dir() and not path.is_symlink():
    for root, dirs, files in os.walk(path):
      for d in dirs:
        if not os.path.islink(os.path.join(root, d)):
          os.chmod(os.path.join(root, d), 0o777 & ~mask)
      for f in files:
        p = os.path.join(root, f)
        if not os.path.islink(p):
          os.chmod(p, 0o666 & ~mask)
    os.chmod(path, 0o777 & ~mask)
  elif path.is_file() and not path.is_symlink():
    os.chmod(path, 0o666 & ~mask)


def make_parents(path: str | os.PathLike) -> list[pathlib.Path]:
  """Creates the missing parent directories of ``path``.

  Args:
    path: the output path.

  Returns:
    The directories created, deepest first (give them to :func:`remove_empty` after a failure).
  """
  parent = pathlib.Path(path).parent
  missing = []
  p = parent
  while not p.exists() and p != p.parent:
    missing.append(p)
    p = p.parent
  parent.mkdir(parents=True, exist_ok=True)
  return missing


def remove_empty(dirs: list[pathlib.Path]) -> None:
  """Removes the directories :func:`make_parents` created, deepest first, as long as they are empty.

  Args:
    dirs: what :func:`make_parents` returned.
  """
  for d in dirs:
    try:
      d.rmdir()
    except OSError:
      return
