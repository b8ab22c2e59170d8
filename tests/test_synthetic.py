"""Tests of the offline suite's data generators (jaxmerge.data.synthetic)."""

import numpy as np
import pytest

from jaxmerge.data import synthetic as S

SMALL = (40, 8, 16)


@pytest.mark.parametrize("name", S.TASKS)
def test_task_shapes_dtypes_and_labels(name):
  d = S.make_task(name, seed=3, sizes=SMALL)
  assert d.spec.name == name
  assert len(d.spec.classnames) == len(set(d.spec.classnames)) >= 2
  assert all(t.count("{}") == 1 for t in d.spec.templates)
  for split, n in zip(("train", "val", "test"), SMALL):
    s = getattr(d, split)
    assert s.images.shape == (n, S.IMAGE_SIZE, S.IMAGE_SIZE, 3) and s.images.dtype == np.uint8
    assert s.labels.shape == (n,) and s.labels.dtype == np.int32
    assert s.labels.min() >= 0 and s.labels.max() < d.spec.num_classes
    assert s.images.std() > 5  # not blank


@pytest.mark.parametrize("name", S.TASKS)
def test_deterministic_and_seed_dependent(name):
  a = S.make_task(name, seed=1, sizes=SMALL)
  b = S.make_task(name, seed=1, sizes=SMALL)
  c = S.make_task(name, seed=2, sizes=SMALL)
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(getattr(a, split).images, getattr(b, split).images)
    np.testing.assert_array_equal(getattr(a, split).labels, getattr(b, split).labels)
  assert not np.array_equal(a.train.images, c.train.images)


def test_procedural_classes_balanced_and_splits_disjoint():
  d = S.make_task("counting", seed=0, sizes=(60, 12, 30))
  np.testing.assert_array_equal(np.bincount(d.train.labels), [10] * 6)
  # No test image also appears in train.
  train = {x.tobytes() for x in d.train.images}
  assert not any(x.tobytes() in train for x in d.test.images)


def test_digits_are_sklearn_images_and_splits_disjoint():
  from sklearn.datasets import load_digits

  d = S.make_task("digits", seed=0, sizes=(2000, 100, 300))
  assert len(d.train) == 1797 - 400 and len(d.val) == 100 and len(d.test) == 300
  # Every image is one of sklearn's digits (upsampled), with sklearn's label.
  raw = load_digits()
  ref = S._to_uint8(S._sklearn_digit_images(raw.images.astype(np.float32) / 16.0))
  index = {x.tobytes(): y for x, y in zip(ref, raw.target)}
  for split in (d.train, d.val, d.test):
    assert [index[x.tobytes()] for x in split.images] == split.labels.tolist()
  # The three splits are disjoint.
  seen = [{x.tobytes() for x in s.images} for s in (d.train, d.val, d.test)]
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_counting_has_the_labelled_number_of_dots():
  # Background is dark grey with faint noise; dots are saturated colours. Count connected saturated blobs.
  from scipy import ndimage

  d = S.make_task("counting", seed=5, sizes=(0, 0, 60))
  for img, lab in zip(d.test.images, d.test.labels):
    f = ndimage.gaussian_filter(img.astype(np.float32) / 255, (0.8, 0.8, 0))
    sat = f.max(-1) - f.min(-1)
    _, n = ndimage.label(sat > 0.25)
    assert n == lab + 1


def test_distinct_input_statistics():
  means = {t: S.make_task(t, seed=0, sizes=(200, 0, 0)).train.images.reshape(-1, 3).mean(0) for t in S.TASKS}
  stds = {t: S.make_task(t, seed=0, sizes=(200, 0, 0)).train.images.std() for t in S.TASKS}
  keys = list(means)
  gaps = [np.abs(means[a] - means[b]).max() + abs(stds[a] - stds[b]) for i, a in enumerate(keys)
          for b in keys[i + 1:]]
  assert min(gaps) > 2.0


def test_pretraining_mixture():
  pre = S.make_pretraining(seed=0, n=140)
  assert pre.images.shape == (140, 32, 32, 3) and pre.images.dtype == np.uint8
  assert len(pre.captions) == 140 and pre.concepts.shape == (140,)
  assert all(isinstance(c, str) and c for c in pre.captions)
  # Captions sharing a concept name the same class word.
  for cid in np.unique(pre.concepts):
    word = pre.concept_names[cid].split(":")[1]
    assert all(word in pre.captions[i] for i in np.flatnonzero(pre.concepts == cid))
  again = S.make_pretraining(seed=0, n=140)
  np.testing.assert_array_equal(pre.images, again.images)
  assert pre.captions == again.captions


@pytest.mark.parametrize("source", S.AUX_SOURCES)
def test_aux_sources(source):
  a = S.make_aux(source, seed=0, n=32)
  assert a.shape == (32, 32, 32, 3) and a.dtype == np.uint8 and a.std() > 5
  np.testing.assert_array_equal(a, S.make_aux(source, seed=0, n=32))
  assert not np.array_equal(a, S.make_aux(source, seed=1, n=32))


def test_aux_sources_differ_from_each_other():
  stats = [S.make_aux(s, seed=0, n=128).astype(np.float32) for s in S.AUX_SOURCES]
  # Mean absolute horizontal gradient: smooth fBm < flat rectangles with edges, etc. All three differ.
  grads = [np.abs(np.diff(x, axis=2)).mean() for x in stats]
  assert len({round(g, 1) for g in grads}) == 3


def test_bad_input():
  with pytest.raises(ValueError, match="valid tasks"):
    S.make_task("cars", seed=0)
  with pytest.raises(ValueError, match="valid sources"):
    S.make_aux("imagenet")
  with pytest.raises(ValueError, match="sizes"):
    S.make_task("shapes", sizes=(1, 2))
  with pytest.raises(ValueError, match="digits has"):
    S.make_task("digits", sizes=(10, 900, 900))
