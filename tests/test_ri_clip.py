"""``experiments/ri_clip.py`` (RI on the real CLIP suites, issue 8 acceptance 3) end to end on tiny local
fixtures, including the unseen-domain evaluation (shifted test sets) it shares with ``clip_suites.py``."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from tests import clip_fixtures as F

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name):
  if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_shifted_batches_protocol():
  """Image k gets shift k mod len(shifts) with seed 1000003 * seed + k, whatever the batching; each image once."""
  from jaxmerge.data import synthetic

  cs = _load("clip_suites")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
  labels = np.arange(11, dtype=np.int32)
  shifts = list(synthetic.SHIFTS)

  def batched(b):
    return [{"image": images[s:s + b], "label": labels[s:s + b]} for s in range(0, 11, b)]

  for index, kind in enumerate(shifts):
    ks = [k for k in range(11) if k % 4 == index]
    want = np.stack([synthetic.shift_images(images[k:k + 1], kind, seed=3 * 1000003 + k)[0] for k in ks])
    for b_in, b_out in ((3, 2), (5, 4), (11, 1)):
      got = list(cs._shifted_batches(batched(b_in), shifts, index, 3, b_out))
      assert all(len(g["label"]) <= b_out for g in got)
      np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), ks)
      np.testing.assert_array_equal(np.concatenate([g["image"] for g in got]), want)
    assert not np.array_equal(want, images[ks])  # the shift changed the images
  all_labels = sorted(int(x) for i in range(4) for g in cs._shifted_batches(batched(4), shifts, i, 0, 4)
                      for x in g["label"])
  assert all_labels == list(range(11))


@pytest.fixture(scope="module")
def ri_files(tmp_path_factory):
  """A tiny pretrained CLIP, experts ``expert_<task>`` for mnist and svhn, their test sets and an aux folder."""
  pytest.importorskip("torch")
  root = tmp_path_factory.mktemp("ri_clip")
  c = F.CONFIGS[2]
  pre, model = F.save_tiny_clip(root / "pretrained", c)
  for i, t in enumerate(("mnist", "svhn")):
    F.save_tiny_vision(root / f"expert_{t}", c, seed=i + 1, from_clip=model, noise=0.02)
    F.image_dataset(root / "data" / t, num_classes=10, n_test=11, n_train=4, seed=i,
                    classnames=[str(k) for k in range(10)], sizes=((40, 52), (48, 48), (61, 50)))
  F.image_folder(root / "aux", classes=("a", "b"), per_class=4, seed=5)
  return root, pre


def test_ri_clip_script_unseen_domains_on_tiny_fixtures(ri_files, tmp_path):
  import transformers

  from jaxmerge.data import synthetic
  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.data.tasks import TASKS
  from jaxmerge.eval.zeroshot import ClipZeroShot
  from jaxmerge.io import hf

  root, pre = ri_files
  ri = _load("ri_clip")
  out, cache = tmp_path / "out", tmp_path / "cache"
  argv = ["--pretrained", str(pre), "--experts", str(root / "expert_{task}"), "--suite", "mnist,svhn",
          "--data", str(root / "data"), "--aux", str(root / "aux"), "--n-aux", "8", "--aux-batch-size", "4",
          "--steps", "2", "--learning-rate", "1e-3", "--methods", "task_arithmetic", "--batch-size", "4",
          "--workers", "0", "--cache", str(cache), "--out", str(out)]
  assert ri.main(argv) == 0
  res = json.loads((out / "ri.json").read_text())
  tasks, shifts = ["mnist", "svhn"], list(synthetic.SHIFTS)
  assert res["tasks"] == tasks and res["shifts"] == shifts
  assert set(res["rows"]) == {"pretrained", "experts", "task_arithmetic"}
  for row in res["rows"].values():
    for side in ("without_ri", "with_ri"):
      sh = row[side]["shifted"]
      assert set(sh["accuracy"]) == set(tasks) and all(set(sh["per_shift"][t]) == set(shifts) for t in tasks)
      vals = [sh["average"], *sh["accuracy"].values(), *(v for t in tasks for v in sh["per_shift"][t].values())]
      assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in vals)
      # 11 test images: shifts get 3, 3, 3, 2 of them; the task accuracy is their count-weighted mean
      for t in tasks:
        ps = sh["per_shift"][t]
        want = (3 * (ps["noise"] + ps["blur"] + ps["contrast"]) + 2 * ps["tint"]) / 11
        assert sh["accuracy"][t] == pytest.approx(want)
  # the JSON repeats the per-side results, and the markdown has both tables with the numbers
  with_ri = json.loads((out / "with-ri" / "results.json").read_text())
  ta = next(r for r in with_ri["rows"] if r["method"] == "task_arithmetic")
  assert res["rows"]["task_arithmetic"]["with_ri"]["shifted"]["average"] == pytest.approx(ta["shifted"]["average"])
  md = (out / "ri.md").read_text()
  assert "Unseen domains" in md and "| gain on noise | gain on blur | gain on contrast | gain on tint |" in md
  b = res["rows"]["task_arithmetic"]["without_ri"]["shifted"]["average"]
  w = res["rows"]["task_arithmetic"]["with_ri"]["shifted"]["average"]
  assert f"| task_arithmetic | {100 * b:.2f} | {100 * w:.2f} | {100 * (w - b):+.2f} |" in md
  assert "shifted_average" in (out / "without-ri" / "results.csv").read_text()

  # reference: the shifted test set built by hand (image k: shift k mod 4, seed k) and evaluated by the library
  pcfg, pp = hf.load_clip(pre)
  p = Preprocess.from_pretrained(pre)
  zs = ClipZeroShot(pcfg, pp, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(pre)), preprocess=p,
                    batch_size=4, tasks={t: (TASKS[t].classnames, TASKS[t].templates) for t in tasks})
  for t in tasks:
    images = np.load(next((cache / "images").glob(f"{t}-[0-9a-f]*.images.npy")))
    labels = np.load(next((cache / "images").glob(f"{t}-[0-9a-f]*.labels.npy")))
    assert len(labels) == 11
    for i, kind in enumerate(shifts):
      ks = np.arange(i, 11, 4)
      shifted = np.stack([synthetic.shift_images(images[k:k + 1], kind, seed=k)[0] for k in ks])
      cached = np.load(next((cache / "images").glob(f"{t}-shift-{kind}{i}of4-seed0-*.images.npy")))
      np.testing.assert_array_equal(cached, shifted)
      batches = [{"image": shifted[s:s + 4], "label": labels[ks][s:s + 4]} for s in range(0, len(ks), 4)]
      want = zs.evaluate(pp["vision_model"], t, batches)["accuracy"]
      assert res["rows"]["pretrained"]["without_ri"]["shifted"]["per_shift"][t][kind] == pytest.approx(want)


def test_clip_suites_rejects_unknown_shift(tmp_path):
  cs = _load("clip_suites")
  with pytest.raises(ValueError, match=r"shifts \['noise', 'fog'\] must be distinct names from: noise, blur"):
    cs.run({"pretrained": "unused", "experts": "unused", "suite": ["mnist"], "shifts": ["noise", "fog"]},
           tmp_path, progress=False)
