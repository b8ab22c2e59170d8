"""Image-classification sources and numpy batches ``{"image": uint8[B, S, S, 3], "label": int32[B]}``.

A *source* is a random-access list of ``(image, label)`` with a name for every item (used in error
messages): :class:`ArraySource` (numpy arrays), :class:`FolderSource` (``root/<class>/<file>``) and
:class:`HFSource` (a Hugging Face ``datasets.Dataset``; images are decoded here, not by ``datasets``, so that an
undecodable image raises ``ValueError`` naming it). An image folder of a task maps its class directories to the
task's class list by name or by number, never by their alphabetical order (:class:`FolderSource`). Every source
has a ``fingerprint()`` of its content (files and their sizes and times, or array bytes), which caches key on.
:func:`load_hf` opens a dataset from a ``save_to_disk`` directory, a local dataset directory or the hub (its
cache; ``HF_DATASETS_OFFLINE=1`` is honoured), with the validation split carved from the train split (10% with a
fixed seed, :func:`train_val_indices`).

:func:`batches` decodes, converts to RGB, resizes and crops on the host (:mod:`jaxmerge.data.preprocess`), and
yields uint8 batches; the last batch may be smaller (evaluation pads it, :mod:`jaxmerge.eval.zeroshot`).
Nothing here imports model code.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from jaxmerge.data.preprocess import Preprocess, decode_image, resize_and_crop

__all__ = ["ArraySource", "FolderSource", "HFSource", "IMAGE_EXTENSIONS", "Source", "batches", "load_hf",
           "load_task", "train_val_indices"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class Source(Protocol):
  """Random access to labelled images."""

  classnames: tuple[str, ...] | None

  def __len__(self) -> int: ...

  def load(self, i: int) -> tuple[Any, int]:
    """``(image, label)``: a PIL image or uint8 array, and an int."""
    ...

  def name(self, i: int) -> str: ...

  def fingerprint(self) -> str:
    """A digest of the content this source yields (cache keys)."""
    ...


class ArraySource:
  """Images and labels held in arrays.

  Args:
    images: uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (C in 1, 3, 4), or a list of such images.
    labels: int ``[N]``.
    classnames: optional class names.

  Raises:
    ValueError: mismatched lengths, or labels that are not integers.
  """

  def __init__(self, images: Any, labels: Any, classnames: Sequence[str] | None = None, name: str = "arrays"):
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f"{name}: {len(images)} images but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
      raise ValueError(f"{name}: labels must be integers, got {labels.dtype}")
    self.images, self.labels, self._name = images, labels.astype(np.int64), name
    self.classnames = tuple(classnames) if classnames is not None else None

  def __len__(self) -> int:
    return len(self.labels)

  def load(self, i: int):
    return self.images[i], int(self.labels[i])

  def name(self, i: int) -> str:
    return f"{self._name}[{i}]"

  def fingerprint(self) -> str:
    """A digest of the images (bytes, shapes, dtypes) and labels."""
    h = hashlib.sha256(f"arrays\0{self.classnames}".encode())
    for img in (self.images if isinstance(self.images, (list, tuple)) else [self.images]):
      a = np.ascontiguousarray(img)
      h.update(f"\0{a.shape}\0{a.dtype}".encode())
      h.update(a.tobytes())
    h.update(self.labels.tobytes())
    return h.hexdigest()


class FolderSource:
  """``root/<class>/<image file>``.

  Without ``classnames``, classes are the sorted subdirectory names and labels their indices (``mapping`` is
  ``"alphabetical"``). With ``classnames`` (a task's class list, in label order) the directories are mapped to
  it, never by their sort order: **by name** when every directory is one of ``classnames`` (exactly, or after
  lower-casing and dropping everything but letters and digits), else **by number** when every directory is an
  integer ``0 <= i < len(classnames)`` (``gtsrb/0`` .. ``gtsrb/42``). ``mapping`` says which one was used
  (``"by name"`` or ``"by number"``).

  Raises:
    ValueError: ``root`` missing or holding no images; with ``classnames``: a directory that matches no class
      (neither a class name nor a class number), a class without a directory (an empty directory is fine: the
      class simply has no images), or two directories for one class.
  """

  def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, *,
               classnames: Sequence[str] | None = None):
    self.root = pathlib.Path(root)
    if not self.root.is_dir():
      raise ValueError(f"image folder {self.root} does not exist")
    dirs = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classnames is None:
      index, self.mapping, self.classnames = {d: i for i, d in enumerate(dirs)}, "alphabetical", tuple(dirs)
    else:
      self.classnames = tuple(classnames)
      index, self.mapping = _map_class_dirs(self.root, dirs, self.classnames)
    self.files: list[pathlib.Path] = []
    labels = []
    for d in sorted(dirs, key=lambda d: (index[d], d)):
      files = sorted(f for f in (self.root / d).rglob("*") if f.is_file() and f.suffix.lower() in extensions)
      self.files += files
      labels += [index[d]] * len(files)
    if not self.files:
      raise ValueError(f"image folder {self.root} has no class subdirectories with images ({', '.join(extensions)})")
    self.labels = np.asarray(labels, np.int64)
    self.class_dirs = {d: index[d] for d in dirs}

  def __len__(self) -> int:
    return len(self.files)

  def load(self, i: int):
    return decode_image(self.files[i]), int(self.labels[i])

  def name(self, i: int) -> str:
    return str(self.files[i])

  def fingerprint(self) -> str:
    """A digest of what this source yields: the resolved root, every file's relative path, size and
    modification time, its label, and the class mapping (a changed, added or relabelled file changes it)."""
    h = hashlib.sha256(f"folder\0{self.root.resolve()}\0{self.mapping}\0{self.classnames}".encode())
    for f, y in zip(self.files, self.labels):
      st = f.stat()
      h.update(f"\0{f.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\0{int(y)}".encode())
    return h.hexdigest()


def _norm_class(name: str) -> str:
  return "".join(ch for ch in name.lower() if ch.isalnum())


def _map_class_dirs(root: pathlib.Path, dirs: Sequence[str], classnames: Sequence[str]) -> tuple[dict, str]:
  """``({directory: label}, "by name" | "by number")`` for an image folder of a task with ``classnames``."""
  exact = {c: i for i, c in enumerate(classnames)}
  loose: dict[str, int] = {}
  for i, c in enumerate(classnames):
    loose.setdefault(_norm_class(c), i)
  by_name = {d: exact[d] if d in exact else loose.get(_norm_class(d)) for d in dirs}
  by_number = {d: int(d) if d.isdigit() and int(d) < len(classnames) else None for d in dirs}
  candidates = [(m, "by name") for m in (by_name,) if all(v is not None for v in m.values())]
  candidates += [(m, "by number") for m in (by_number,) if all(v is not None for v in m.values())]
  if not candidates:
    unknown = [d for d in dirs if by_name[d] is None and by_number[d] is None]
    bad = unknown or [d for d in dirs if by_name[d] is None]
    raise ValueError(
        f"image folder {root}: class directories {bad[:10]}{' ...' if len(bad) > 10 else ''} match none of the "
        f"task's {len(classnames)} classes by name or by number (directories must all be class names, e.g. "
        f"{list(classnames[:3])}, or all class numbers 0..{len(classnames) - 1})")
  index, how = candidates[0]
  seen: dict[int, str] = {}
  for d in dirs:
    if index[d] in seen:
      raise ValueError(f"image folder {root}: directories {seen[index[d]]!r} and {d!r} both map {how} to class "
                       f"{index[d]} ({classnames[index[d]]!r})")
    seen[index[d]] = d
  missing = [i for i in range(len(classnames)) if i not in seen]
  if missing:
    names = [f"{i} ({classnames[i]!r})" for i in missing[:10]]
    raise ValueError(f"image folder {root}: no directory for class(es) {', '.join(names)}"
                     f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of {len(classnames)} missing; mapped "
                     f"{how}); create an empty directory for a class without images")
  return index, how


class HFSource:
  """A Hugging Face ``datasets.Dataset`` (optionally restricted to ``indices``).

  Images are read undecoded (``datasets.Image(decode=False)``) and decoded with PIL here; labels may be
  ``ClassLabel`` (class names taken from it), integers or booleans.

  Raises:
    ValueError: missing image or label columns (listing the columns).
  """

  def __init__(self, dataset: Any, *, image_column: str = "image", label_column: str = "label",
               indices: Sequence[int] | None = None, name: str = "dataset"):
    import datasets  # noqa: PLC0415

    cols = list(dataset.column_names)
    missing = [c for c in (image_column, label_column) if c not in cols]
    if missing:
      raise ValueError(f"{name} has no column(s) {missing}; columns: {cols}")
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
      dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    label_feature = dataset.features[label_column]
    self.classnames = tuple(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None
    self.dataset, self.image_column, self.label_column, self._name = dataset, image_column, label_column, name
    self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def _row(self, i: int) -> dict:
    return self.dataset[int(self.indices[i])]

  def load(self, i: int):
    row = self._row(i)
    img = row[self.image_column]
    name = self.name(i, row)
    if isinstance(img, dict):  # datasets.Image(decode=False): {"bytes", "path"}
      data = img.get("bytes") or img.get("path")
      if data is None:
        raise ValueError(f"cannot decode image {name}: no bytes and no path")
      img = decode_image(data, name)
    elif isinstance(img, (bytes, bytearray)):
      img = decode_image(img, name)
    return img, int(row[self.label_column])

  def fingerprint(self) -> str:
    """A digest of what this source yields: the dataset's files (path, size and modification time of each Arrow
    file, for a ``save_to_disk`` or cached dataset) or, in memory, the ``datasets`` fingerprint; the columns read
    and the selected rows."""
    h = hashlib.sha256(f"hf\0{self.image_column}\0{self.label_column}\0{self.classnames}".encode())
    files = [f.get("filename") for f in getattr(self.dataset, "cache_files", None) or [] if f.get("filename")]
    for f in files:
      st = os.stat(f)
      h.update(f"\0{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    if not files:
      h.update(f"\0fingerprint {getattr(self.dataset, '_fingerprint', None)}".encode())
    h.update(np.ascontiguousarray(self.indices, np.int64).tobytes())
    return h.hexdigest()

  def name(self, i: int, row: dict | None = None) -> str:
    j = int(self.indices[i])
    img = (row if row is not None else {}).get(self.image_column)
    path = img.get("path") if isinstance(img, dict) else None
    return f"{self._name}[{j}]" + (f" ({path})" if path else "")


def train_val_indices(n: int, *, val_fraction: float = 0.1, seed: int = 0,
                      rule: str = "numpy") -> tuple[np.ndarray, np.ndarray]:
  """Splits ``range(n)`` into train and validation indices: ``int(n * val_fraction)`` validation items.

  Args:
    rule: ``"numpy"`` (``np.random.default_rng(seed).permutation``) or ``"torch"`` (``torch.randperm`` with a
      generator seeded ``seed``: exactly FusionBench's ``train_validation_split``; needs torch).

  Returns:
    ``(train, val)``: the first ``n - n_val`` permuted indices, then the rest.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  n_val = int(n * val_fraction)
  if rule == "numpy":
    perm = np.random.default_rng(seed).permutation(n)
  elif rule == "torch":
    import torch  # noqa: PLC0415

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
  else:
    raise ValueError(f"unknown split rule {rule!r}; use 'numpy' or 'torch'")
  return perm[: n - n_val], perm[n - n_val:]


def _open_hf(path: str, name: str | None, split: str, cache_dir: str | None):
  import datasets  # noqa: PLC0415

  p = pathlib.Path(path).expanduser()
  if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists()
                     or (p / "state.json").exists()):
    try:
      ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{p} is not a dataset saved with save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
      if split not in ds:
        raise ValueError(f"{p} has no split {split!r}; splits: {list(ds)}")
      return ds[split]
    return ds
  try:
    return datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)
  except (FileNotFoundError, ConnectionError, OSError) as e:
    raise ValueError(f"dataset {path}{f' ({name})' if name else ''} split {split!r} is not reachable "
                     f"(local path, Hugging Face cache or network): {type(e).__name__}: {e}") from e


def load_hf(path: str, split: str = "test", *, name: str | None = None, image_column: str = "image",
            label_column: str = "label", test_split: str = "test", train_split: str = "train",
            val_fraction: float = 0.1, seed: int = 0, split_rule: str = "numpy",
            cache_dir: str | None = None) -> HFSource:
  """A Hugging Face dataset split as a :class:`HFSource`.

  Args:
    path: a ``save_to_disk`` directory, or a dataset id / local dataset directory for ``load_dataset``.
    split: ``"test"`` (the dataset's ``test_split``), ``"train"`` (its ``train_split`` minus the validation
      items) or ``"val"`` (``val_fraction`` of ``train_split``, chosen with ``seed`` and ``split_rule``; see
      :func:`train_val_indices`), or ``"full_train"`` (the whole train split).
    name: dataset configuration (``load_dataset(path, name)``).
    image_column: the column holding the images.
    label_column: the column holding the labels.
    test_split: the dataset split that ``"test"`` reads.
    train_split: the dataset split that ``"train"``, ``"val"`` and ``"full_train"`` read.
    val_fraction: share of ``train_split`` held out as ``"val"``.
    seed: seed of the train/validation permutation.
    split_rule: ``"numpy"`` or ``"torch"`` (see :func:`train_val_indices`).
    cache_dir: ``datasets`` cache directory (``None``: its default).

  Returns:
    The :class:`HFSource` of the split, named ``"<path>[/<name>]:<split>"`` in errors.

  Raises:
    ValueError: an unknown split, an unreachable dataset, or missing columns.
  """
  if split not in ("test", "train", "val", "full_train"):
    raise ValueError(f"unknown split {split!r}; use 'test', 'train', 'val' or 'full_train'")
  label = f"{path}{f'/{name}' if name else ''}:{split}"
  if split == "test":
    return HFSource(_open_hf(path, name, test_split, cache_dir), image_column=image_column,
                    label_column=label_column, name=label)
  ds = _open_hf(path, name, train_split, cache_dir)
  indices = None
  if split != "full_train":
    train, val = train_val_indices(len(ds), val_fraction=val_fraction, seed=seed, rule=split_rule)
    indices = train if split == "train" else val
  return HFSource(ds, image_column=image_column, label_column=label_column, indices=indices, name=label)


def load_task(task: str, split: str = "test", *, path: str | None = None, **kwargs) -> HFSource:
  """The dataset of one of the 20 TALL tasks (:mod:`jaxmerge.data.tasks`), from ``path`` if given (a local copy
  or another id) or from its Hugging Face id. Extra arguments go to :func:`load_hf`.

  Args:
    task: a task name (a key of :data:`jaxmerge.data.tasks.TASKS`).
    split: ``"test"``, ``"train"``, ``"val"`` or ``"full_train"`` (see :func:`load_hf`).
    path: a local copy (``save_to_disk`` or dataset directory) or another dataset id; the task's
      configuration name is then not passed. ``None`` loads the task's Hugging Face id.
    **kwargs: further keywords of :func:`load_hf`; they override the task's columns and splits.

  Returns:
    The :class:`HFSource` of the split.

  Raises:
    ValueError: an unknown task, or the errors of :func:`load_hf`.
  """
  from jaxmerge.data.tasks import get_task  # noqa: PLC0415

  spec = get_task(task)
  kw = dict(name=spec.hf_name, image_column=spec.image_column, label_column=spec.label_column,
            test_split=spec.test_split, train_split=spec.train_split)
  if path is not None:
    kw["name"] = None
  return load_hf(path or spec.hf_path, split, **{**kw, **kwargs})


def batches(source: Source, batch_size: int, *, preprocess: Preprocess = Preprocess(),
            limit: int | None = None, num_workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields ``{"image": uint8[B, S, S, 3], "label": int32[B]}`` in order; the last batch may be smaller.

  Args:
    source: a :class:`Source`.
    batch_size: images per batch.
    preprocess: sizes (``S = preprocess.crop``).
    limit: use only the first ``limit`` items.
    num_workers: threads decoding and resizing (PIL releases the GIL); 0 decodes in this thread.

  Yields:
    ``{"image": uint8[B, S, S, 3], "label": int32[B]}`` batches, ``B = batch_size`` except possibly the last.

  Raises:
    ValueError: an undecodable image (naming it) or a bad batch size.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  n = len(source) if limit is None else min(limit, len(source))

  def one(i: int) -> tuple[np.ndarray, int]:
    img, label = source.load(i)
    return resize_and_crop(img, preprocess, name=source.name(i)), label

  pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
  try:
    for start in range(0, n, batch_size):
      idx = range(start, min(start + batch_size, n))
      items = list(pool.map(one, idx)) if pool is not None else [one(i) for i in idx]
      yield {"image": np.stack([x for x, _ in items]), "label": np.asarray([y for _, y in items], np.int32)}
  finally:
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)
