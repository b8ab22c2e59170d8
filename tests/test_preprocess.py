"""CLIP preprocessing against transformers' CLIPImageProcessor, image sources and batches, splits, and the task
table (against FusionBench's)."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxmerge.data import datasets as D
from jaxmerge.data import preprocess as P
from jaxmerge.data import tasks as T
from tests import clip_fixtures as F

transformers = pytest.importorskip("transformers")

# (width, height): landscape, portrait, square, tiny (smaller than the crop: padded), odd sizes
SIZES = [(50, 31), (23, 67), (40, 40), (9, 14), (101, 77), (32, 33)]


def _processor(size, crop, cls="CLIPImageProcessorPil"):
  return getattr(transformers, cls)(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                                    do_convert_rgb=True)


def _hf(proc, images):
  return proc(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


@pytest.mark.parity
@pytest.mark.parametrize("size,crop", [(24, 24), (32, 20), (16, 16)])
def test_matches_clip_image_processor(size, crop):
  rng = np.random.default_rng(size + crop)
  cfg = P.Preprocess(size=size, crop_size=crop)
  pil = [F.random_pil(rng, m, s) for m, s in zip(("RGB", "L", "RGBA", "P", "LA", "RGB"), SIZES)]
  arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in SIZES]
  arrays += [rng.integers(0, 256, (17, 29), dtype=np.uint8), rng.integers(0, 256, (30, 21, 4), dtype=np.uint8)]
  for cls in ("CLIPImageProcessorPil", "CLIPImageProcessor"):  # the latter is the PIL backend without torchvision
    proc = _processor(size, crop, cls)
    for images in (pil, arrays):
      # (transformers takes a grayscale array as [H, W, 1]; we also take [H, W])
      want = np.concatenate([_hf(proc, [im[..., None] if getattr(im, "ndim", 3) == 2 else im]) for im in images])
      got = P.preprocess(images, cfg)
      assert got.shape == (len(images), crop, crop, 3) and got.dtype == np.float32
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
      # the device path: uint8 host batch, normalization inside jit
      u8 = np.stack([P.resize_and_crop(im, cfg) for im in images])
      dev = jax.jit(lambda x: P.normalize(x, cfg))(jnp.asarray(u8))
      np.testing.assert_allclose(np.asarray(dev), want, rtol=0, atol=2e-6)


def test_rgb_conversion_rules():
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (5, 6), dtype=np.uint8)
  np.testing.assert_array_equal(P.to_rgb(gray), np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(P.to_rgb(Image.fromarray(gray, "L")), np.repeat(gray[..., None], 3, -1))
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (200, 100, 0, 0)      # fully transparent -> white
  rgba[0, 1] = (200, 100, 0, 255)    # opaque -> itself
  rgba[1, 0] = (0, 0, 0, 128)        # half black -> round(127 * 255 / 255) grey
  want = np.array([[[255, 255, 255], [200, 100, 0]], [[127, 127, 127], [255, 255, 255]]], np.uint8)
  np.testing.assert_array_equal(P.to_rgb(rgba), want)
  with pytest.raises(ValueError, match=r"image x must be uint8, got float32"):
    P.to_rgb(np.zeros((4, 4, 3), np.float32), name="x")
  with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, 1\|3\|4\], got shape \(4, 4, 2\)"):
    P.to_rgb(np.zeros((4, 4, 2), np.uint8))


def test_sources_and_batches(tmp_path):
  cfg = P.Preprocess(size=16)
  # numpy arrays (grayscale batch)
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (7, 20, 12), dtype=np.uint8)
  got = list(D.batches(D.ArraySource(imgs, np.arange(7) % 3), 3, preprocess=cfg))
  assert [b["image"].shape for b in got] == [(3, 16, 16, 3)] * 2 + [(1, 16, 16, 3)]
  assert all(b["image"].dtype == np.uint8 and b["label"].dtype == np.int32 for b in got)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), np.arange(7) % 3)
  np.testing.assert_array_equal(got[0]["image"][1], P.resize_and_crop(imgs[1], cfg))
  # an image folder: sorted class directories, grayscale and RGBA converted
  root = F.image_folder(tmp_path / "folder", classes=("dog", "cat", "eel"), per_class=2)
  src = D.FolderSource(root)
  assert src.classnames == ("cat", "dog", "eel") and len(src) == 6
  (b,) = list(D.batches(src, 8, preprocess=cfg, num_workers=2))
  assert b["image"].shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(b["label"], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(b["image"][0], P.resize_and_crop(Image.open(root / "cat" / "0.png"), cfg))
  (root / "dog" / "9.png").write_bytes(b"\x89PNG truncated")
  with pytest.raises(ValueError, match=r"cannot decode image .*dog/9\.png"):
    list(D.batches(D.FolderSource(root), 8, preprocess=cfg))
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(ValueError, match="has no class subdirectories"):
    D.FolderSource(tmp_path / "empty")
  # a Hugging Face dataset saved with save_to_disk; splits carved from train
  path, dd = F.image_dataset(tmp_path / "ds", num_classes=5, n_test=7, n_train=30, bad_index=5)
  test = D.load_hf(str(path), "test")
  assert len(test) == 7 and test.classnames == tuple(f"class{i}" for i in range(5))
  first = list(D.batches(test, 4, preprocess=cfg, limit=4))
  assert len(first) == 1 and first[0]["image"].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(first[0]["label"], dd["test"]["label"][:4])
  with pytest.raises(ValueError, match=r"cannot decode image .*:test\[5\] \(test_5\.png\)"):
    list(D.batches(test, 4, preprocess=cfg))
  train, val = D.load_hf(str(path), "train"), D.load_hf(str(path), "val")
  assert (len(train), len(val)) == (27, 3)
  assert not set(train.indices) & set(val.indices)
  np.testing.assert_array_equal(val.indices, D.train_val_indices(30)[1])
  with pytest.raises(ValueError, match=r"no column\(s\) \['jpg'\]"):
    D.load_hf(str(path), "test", image_column="jpg")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    D.load_hf(str(path), "dev")


def test_train_val_indices():
  tr, va = D.train_val_indices(1000, val_fraction=0.1, seed=0)
  assert len(va) == 100 and len(tr) == 900 and set(tr) | set(va) == set(range(1000))
  np.testing.assert_array_equal(D.train_val_indices(1000, seed=0)[1], va)  # deterministic
  assert not np.array_equal(D.train_val_indices(1000, seed=1)[1], va)


@pytest.mark.parity
def test_torch_split_rule_is_fusionbench():
  torch = pytest.importorskip("torch")
  data = pytest.importorskip("fusion_bench.utils.data")
  ds = list(range(257))
  tr, va = data.train_validation_split(ds, validation_fraction=0.1, random_seed=0, return_split="all")
  ours_tr, ours_va = D.train_val_indices(257, val_fraction=0.1, seed=0, rule="torch")
  np.testing.assert_array_equal(ours_tr, list(tr.indices))
  np.testing.assert_array_equal(ours_va, list(va.indices))
  del torch


def test_task_table():
  assert len(T.TASKS) == 20
  assert [len(T.get_suite(n)) for n in (8, "14", "TALL20")] == [8, 14, 20]
  assert T.get_suite(8) == ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
  assert T.get_task("cifar100").num_classes == 100 and T.get_task("sun397").num_classes == 397
  assert T.get_task("mnist").prompts("3") == ['a photo of the number: "3".']
  assert all(t.templates and all(s.count("{}") == 1 for s in t.templates) for t in T.TASKS.values())
  # every TALL20 task: its dataset's class count (hand-checked against the datasets), distinct non-empty names,
  # a dataset id and a test split
  classes = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
             "mnist": 10, "dtd": 47, "oxford_flowers102": 102, "pcam": 2, "fer2013": 7, "oxford-iiit-pet": 37,
             "stl10": 10, "cifar100": 100, "cifar10": 10, "food101": 101, "fashion_mnist": 10, "emnist_letters": 26,
             "kmnist": 10, "rendered-sst2": 2}
  assert T.get_suite(20) == tuple(classes)
  for name, n in classes.items():
    t = T.get_task(name)
    assert t.num_classes == n == len(set(t.classnames)) and all(c.strip() for c in t.classnames), name
    assert t.hf_path and t.test_split, name
  with pytest.raises(ValueError, match="unknown task 'imagenet'; known tasks: sun397, stanford-cars"):
    T.get_task("imagenet")
  with pytest.raises(ValueError, match="unknown suite"):
    T.get_suite(9)


@pytest.mark.parity
def test_task_table_matches_fusionbench():
  mod = sys.modules.get("fusion_bench")
  locations = getattr(mod, "__path__", None) if mod is not None else None
  if not locations:
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None:
      pytest.skip("fusion_bench not installed")
    locations = spec.submodule_search_locations
  root = pathlib.Path(list(locations)[0]) / "tasks" / "clip_classification"
  files = {"stanford-cars": "stanford_cars", "oxford_flowers102": "flower102", "oxford-iiit-pet": "oxford_iiit_pet",
           "rendered-sst2": "rendered_sst2"}
  for name, task in T.TASKS.items():
    ns: dict = {}
    exec((root / f"{files.get(name, name)}.py").read_text(), ns)  # plain data modules (no imports)
    classnames = ns["fine_label"] if name == "cifar100" else ns["classnames"]
    assert task.classnames == tuple(classnames), name
    assert [t.format("xyz") for t in task.templates] == [f("xyz") for f in ns["templates"]], name
