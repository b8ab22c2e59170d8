"""The real-CLIP pipeline does not give silent wrong results (issue 24), on tiny local fixtures: an unusable
tokenizer is an error naming the directory, caches are keyed by content, image folders are mapped by class name or
number, merge timings block and peak memory is reported, `jaxmerge merge` takes the standard layout (CLIPModel base
+ CLIPVisionModel experts, both key spellings), and a small run is not padded to the batch size."""

import argparse
import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.eval import zeroshot as Z
from tests import clip_fixtures as F

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
C = F.CONFIGS[2]  # text length 20: the digit prompts fit
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _suites():
  spec = importlib.util.spec_from_file_location("clip_suites", ROOT / "experiments" / "clip_suites.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Two pretrained CLIPs (A, B: other weights, same config), B without tokenizer files (B_notok), one expert,
  and two different local copies (d1, d2) of mnist's test set."""
  root = tmp_path_factory.mktemp("pipeline")
  a, model_a = F.save_tiny_clip(root / "A", C, seed=0)
  b, _ = F.save_tiny_clip(root / "B", C, seed=1)
  notok = root / "B_notok"
  shutil.copytree(b, notok)
  for f in TOKENIZER_FILES:
    (notok / f).unlink(missing_ok=True)
  expert = F.save_tiny_vision(root / "expert_mnist", C, seed=3, from_clip=model_a, noise=0.02)[0]
  for i, d in enumerate(("d1", "d2")):
    F.image_dataset(root / d / "mnist", num_classes=10, n_test=7, n_train=2, seed=10 + i,
                    classnames=[str(k) for k in range(10)], sizes=((40, 52), (48, 48)))
  return root, a, b, notok, expert


def _cfg(root, pretrained, expert, data, cache, **kw):
  return {"name": "clip-vit-base-patch32", "pretrained": str(pretrained), "experts": {"mnist": str(expert)},
          "suite": ["mnist"], "data": str(root / data), "batch_size": 4, "workers": 0,
          "cache": str(cache) if cache else None, "methods": {}, **kw}


def _losses(res):
  """Per row: loss then accuracy on mnist (a flat list, rows in order)."""
  return [v for r in res["rows"] for v in (r["loss"]["mnist"], r["accuracy"]["mnist"])]


# ----------------------------------------------------------------------------------------------------------------
# 1. Tokenizers.


def test_pretrained_without_tokenizer_is_an_error_naming_it(files, tmp_path):
  root, a, b, notok, expert = files
  with pytest.raises(ValueError, match=rf"{notok} has no CLIP tokenizer files"):
    Z.load_tokenizer(notok)
  # transformers' 2-token fallback, had the files check been skipped, is refused by its behaviour too
  tok2 = transformers.CLIPTokenizer.from_pretrained(str(notok))
  tok2.save_pretrained(str(tmp_path / "two"))
  with pytest.raises(ValueError, match="not a usable CLIP tokenizer"):
    Z.load_tokenizer(tmp_path / "two")
  suites = _suites()
  with pytest.raises(ValueError, match=rf"{notok} has no CLIP tokenizer files"):
    suites.run(_cfg(root, notok, expert, "d1", None), tmp_path / "out", progress=False)
  from jaxmerge.eval import command

  parser = argparse.ArgumentParser()
  command.register(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["eval", "--model", str(notok), "--tasks", "mnist", "--data", str(root / "d1"),
                            "--workers", "0"])
  with pytest.raises(ValueError, match=rf"{notok} has no CLIP tokenizer files"):
    args.func(args)
  # the way around: a heads cache built from the same text tower with its tokenizer
  cache = tmp_path / "cache"
  want = suites.run(_cfg(root, b, expert, "d1", cache), tmp_path / "with_tok", progress=False)
  got = suites.run(_cfg(root, notok, expert, "d1", cache), tmp_path / "no_tok", progress=False)
  assert _losses(got) == _losses(want)
  # ... but not one of another text tower
  with pytest.raises(ValueError, match=r"not in the heads cache .* no tokenizer"):
    suites.run(_cfg(root, notok, expert, "d1", tmp_path / "other"), tmp_path / "no_tok2", progress=False)


def test_identical_heads_are_refused():
  with pytest.raises(ValueError, match="same zero-shot head"):
    Z.build_head(lambda texts: np.ones((len(texts), 4), np.float32), ["a", "b", "c"], ["{}"])


# ----------------------------------------------------------------------------------------------------------------
# 2. Caches keyed by content.


def test_caches_are_keyed_by_checkpoint_and_data_content(files, tmp_path):
  root, a, b, notok, expert = files
  suites = _suites()
  cache = tmp_path / "cache"
  first = suites.run(_cfg(root, a, expert, "d1", cache), tmp_path / "r1", progress=False)
  cached = suites.run(_cfg(root, b, expert, "d2", cache), tmp_path / "r2", progress=False)  # same names, new content
  fresh = suites.run(_cfg(root, b, expert, "d2", None), tmp_path / "r3", progress=False)
  assert _losses(cached) == pytest.approx(_losses(fresh), rel=1e-6)
  assert _losses(cached) != pytest.approx(_losses(first), rel=1e-3)
  assert len(list((cache / "images").glob("mnist-*.images.npy"))) == 2
  assert len(Z.load_heads(cache / "heads")) == 2
  again = suites.run(_cfg(root, a, expert, "d1", cache), tmp_path / "r4", progress=False)  # hits, same result
  assert _losses(again) == _losses(first)
  assert len(list((cache / "images").glob("mnist-*.images.npy"))) == 2


def test_source_fingerprints_follow_content(tmp_path):
  from jaxmerge.data import datasets as D

  root = F.image_folder(tmp_path / "f", classes=("0", "1"), per_class=2)
  fp = D.FolderSource(root).fingerprint()
  assert D.FolderSource(root).fingerprint() == fp
  img = root / "1" / "0.png"
  F.random_pil(np.random.default_rng(5), "RGB", (30, 30)).save(img)  # same path, other content
  assert D.FolderSource(root).fingerprint() != fp
  p1, _ = F.image_dataset(tmp_path / "h1", num_classes=3, n_test=4, n_train=2, seed=0)
  p2, _ = F.image_dataset(tmp_path / "h2", num_classes=3, n_test=4, n_train=2, seed=1)
  assert D.load_hf(str(p1), "test").fingerprint() != D.load_hf(str(p2), "test").fingerprint()
  assert D.load_hf(str(p1), "test").fingerprint() == D.load_hf(str(p1), "test").fingerprint()
  assert D.load_hf(str(p1), "train").fingerprint() != D.load_hf(str(p1), "val").fingerprint()


# ----------------------------------------------------------------------------------------------------------------
# 3. Image folders.


def _labels(data, task):
  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.eval.command import task_batches

  return [int(y) for b in task_batches(task, data=str(data), split="test", batch_size=64,
                                        preprocess=Preprocess(size=8)) for y in b["label"]]


def test_image_folders_map_classes_by_name_or_number(tmp_path):
  from jaxmerge.data.tasks import TASKS

  euro = list(TASKS["eurosat"].classnames)
  for i, c in enumerate(euro):  # class i has 1 + i % 4 images: the label counts say which class got which label
    F.image_folder(tmp_path / "d" / "eurosat" / "test", classes=[c], per_class=1 + i % 4, seed=i)
  assert np.bincount(_labels(tmp_path / "d", "eurosat"), minlength=10).tolist() == [1 + i % 4 for i in range(10)]
  from jaxmerge.eval.command import task_source

  src, info = task_source("eurosat", data=str(tmp_path / "d"), split="test")
  assert info["mapping"] == "by name"
  assert [src.load(i)[1] for i in range(len(src))] == [euro.index(f.parent.name) for f in src.files]
  for i in range(43):
    F.image_folder(tmp_path / "d" / "gtsrb" / "test", classes=[str(i)], per_class=1 + i % 3, seed=i)
  assert np.bincount(_labels(tmp_path / "d", "gtsrb"), minlength=43).tolist() == [1 + i % 3 for i in range(43)]
  src, info = task_source("gtsrb", data=str(tmp_path / "d"), split="test")
  assert info["mapping"] == "by number"
  assert [int(f.parent.name) for f in src.files] == [src.load(i)[1] for i in range(len(src))]
  shutil.rmtree(tmp_path / "d" / "gtsrb" / "test" / "7")
  with pytest.raises(ValueError, match=r"no directory for class\(es\) 7 \('red and white circle 100 kph"):
    task_source("gtsrb", data=str(tmp_path / "d"), split="test")
  (tmp_path / "d" / "gtsrb" / "test" / "7").mkdir()  # an empty class directory is fine
  n = sum(1 + i % 3 for i in range(43)) - (1 + 7 % 3)
  assert task_source("gtsrb", data=str(tmp_path / "d"), split="test")[1]["images"] == n
  F.image_folder(tmp_path / "d" / "eurosat" / "test", classes=["volcano"], per_class=1)
  with pytest.raises(ValueError, match=r"class directories \['volcano'\] match none of the task's 10 classes"):
    task_source("eurosat", data=str(tmp_path / "d"), split="test")


# ----------------------------------------------------------------------------------------------------------------
# 4 and 6. Timings, memory, batch size.


def test_peak_rss_sees_an_allocation():
  from jaxmerge.eval.memory import PeakRSS

  with PeakRSS() as m:
    x = np.ones(300_000_000 // 8)
    x[::512] = 2.0
    del x
  assert m.peak_bytes - m.start_bytes > 0.25e9


def test_streamed_suite_merge_equals_in_memory_and_is_done(files):
  from jaxmerge.io import hf

  root, a, b, notok, expert = files
  suites = _suites()
  pcfg, pp = hf.load_clip(a)
  rng = np.random.default_rng(0)
  experts = [jax.tree.map(lambda x, i=i: x + 0.01 * rng.standard_normal(x.shape).astype(x.dtype), pp["vision_model"])
             for i in range(3)]
  for method, hp in (("task_arithmetic", {"scale": 0.3}), ("ties", {}), ("tsv_m", {}), ("iso_c", {})):
    streamed = suites._merge(method, hp, pp["vision_model"], experts, 0, stream=True)
    in_memory = suites._merge(method, hp, pp["vision_model"], experts, 0, stream=False)
    want = jm.merge(jm.get_method(method)(**hp), pp["vision_model"], experts, layout=jm.filters.flax_layout)
    for x, y, w in zip(jax.tree.leaves(streamed), jax.tree.leaves(in_memory), jax.tree.leaves(want)):
      assert isinstance(x, np.ndarray) and (isinstance(y, np.ndarray) or y.is_ready())  # computed, not dispatched
      np.testing.assert_allclose(x, w, rtol=1e-5, atol=1e-6, err_msg=method)
      np.testing.assert_array_equal(np.asarray(y), np.asarray(w), err_msg=method)


def test_suite_reports_memory_and_does_not_pad_small_runs(files, tmp_path, monkeypatch):
  root, a, b, notok, expert = files
  suites = _suites()
  seen = []
  real = Z.evaluate
  monkeypatch.setattr(Z, "evaluate", lambda *args, **kw: seen.append(kw["batch_size"]) or real(*args, **kw))
  cfg = _cfg(root, a, expert, "d1", None, batch_size=128, limit=5, methods={"task_arithmetic": {"scale": 0.3}})
  res = suites.run(cfg, tmp_path / "out", progress=False)
  assert res["batch_size"] == 5 and set(seen) == {5}
  ta = res["rows"][-1]
  assert ta["method"] == "task_arithmetic"
  assert 0 < ta["merge_start_rss_gb"] <= ta["merge_peak_rss_gb"] <= res["memory"]["process_peak_rss_gb"]
  assert ta["eval_peak_rss_gb"] > 0
  expert_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(
      __import__("jaxmerge.io.hf", fromlist=["hf"]).load_clip(expert)[1]))
  assert res["memory"]["experts_gb"] == pytest.approx(expert_bytes / 1e9)
  assert res["data"]["mnist"]["kind"] == "dataset" and len(res["data"]["mnist"]["fingerprint"]) == 64
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved["rows"][-1]["merge_peak_rss_gb"] == ta["merge_peak_rss_gb"]
  assert "merge peak RSS (GB)" in (tmp_path / "out" / "results.md").read_text()
  from jaxmerge.eval.command import eval_batch_size

  assert eval_batch_size(128, 64) == 64 and eval_batch_size(128, None) == 128 and eval_batch_size(64, 200) == 64


# ----------------------------------------------------------------------------------------------------------------
# 5. `jaxmerge merge` of the standard layout.


@pytest.mark.parametrize("stream", [False, True])
def test_merge_cli_clip_model_base_and_vision_experts(files, tmp_path, stream, capsys):
  from jaxmerge import cli
  from jaxmerge.io import hf

  root, a, b, notok, expert = files
  cfg, pp = hf.load_clip(a)
  bare = expert  # transformers 5 save_pretrained: keys without "vision_model."
  _, ex = hf.load_clip(expert, like=cfg)
  prefixed = tmp_path / "prefixed"
  ex2 = jax.tree.map(lambda x: x + 0.01, ex["vision_model"])
  hf.save_clip_vision(prefixed, cfg.vision_only(), {"vision_model": ex2})
  from jaxmerge.io import safetensors_io as S

  assert any(k.startswith("encoder.") for k in S.load(bare / "model.safetensors"))
  assert all(k.startswith("vision_model.") for k in S.load(prefixed / "model.safetensors"))
  out = tmp_path / "merged"
  argv = ["merge", "--method", "task_arithmetic", "--base", str(a), "--model", str(bare), "--model", str(prefixed),
          "--hparam", "scale=0.3", "--out", str(out), "--stream" if stream else "--no-stream"]
  assert cli.main(argv) == 0
  assert json.loads((out / "config.json").read_text())["model_type"] == "clip_vision_model"
  _, merged = hf.load_clip(out, like=cfg)
  want = jax.tree.map(lambda p, x, y: p + 0.3 * ((x - p) + (y - p)), pp["vision_model"], ex["vision_model"], ex2)
  for x, w in zip(jax.tree.leaves(merged["vision_model"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, w, rtol=1e-6, atol=1e-6)
  # a vision expert of another size is refused, naming it
  other = F.save_tiny_vision(tmp_path / "other", F.CONFIGS[0])[0]
  capsys.readouterr()
  assert cli.main(["merge", "--method", "task_arithmetic", "--base", str(a), "--model", str(other), "--out",
                   str(tmp_path / "bad")]) == 2
  assert f"{other}'s vision tower is not compatible" in capsys.readouterr().err


def test_vision_tower_reader_spellings(tmp_path):
  from jaxmerge.io import hf
  from jaxmerge.io import safetensors_io as S

  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  S.save(tmp_path / "full.safetensors", {"vision_model.encoder.w": x, "text_model.encoder.w": x + 1,
                                         "logit_scale": np.float32(2.0), "vision_model.embeddings.position_ids": x})
  S.save(tmp_path / "bare.safetensors", {"encoder.w": x + 2, "post_layernorm.bias": x[0]})
  S.save(tmp_path / "both.safetensors", {"encoder.w": x, "vision_model.encoder.w": x})
  full = hf.VisionTowerReader(S.open_checkpoint(tmp_path / "full.safetensors"), "full")
  assert list(full.keys()) == ["vision_model.encoder.w"]
  bare = hf.VisionTowerReader(S.open_checkpoint(tmp_path / "bare.safetensors"), "bare")
  assert sorted(bare.keys()) == ["vision_model.encoder.w", "vision_model.post_layernorm.bias"]
  np.testing.assert_array_equal(bare.get("vision_model.encoder.w"), x + 2)
  assert bare.shape("vision_model.post_layernorm.bias") == (3,)
  with pytest.raises(ValueError, match=r"both holds 'vision_model.encoder.w' twice"):
    hf.VisionTowerReader(S.open_checkpoint(tmp_path / "both.safetensors"), "both")
