"""Zero-shot heads, jitted batched evaluation and metrics; end to end on a tiny CLIP against a PyTorch reference;
the ``jaxmerge eval`` command and the real-suite script on tiny local fixtures."""

import argparse
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.eval import metrics
from jaxmerge.eval import zeroshot as Z
from tests import clip_fixtures as F

TEMPLATES = ("a photo of a {}.", "the {}")


def test_metrics_hand_checked():
  logits = jnp.asarray([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [9.0, 0.0, 0.0]])
  labels = jnp.asarray([0, 1, 2, 1])
  mask = jnp.asarray([True, True, True, False])  # the last row is padding
  s = metrics.batch_sums(logits, labels, mask)
  lse = lambda r: math.log(sum(math.exp(v) for v in r))  # noqa: E731
  want_loss = (lse([2, 1, 0]) - 2) + (lse([0, 0, 3]) - 0) + (lse([1, 1, 1]) - 1)
  assert float(s["correct"]) == 1.0  # row 0 right; row 1 wrong; row 2 ties -> class 0, wrong
  assert float(s["count"]) == 3.0
  assert float(s["loss"]) == pytest.approx(want_loss, rel=1e-6)
  m = metrics.finalize(s)
  assert m == {"accuracy": pytest.approx(1 / 3), "loss": pytest.approx(want_loss / 3, rel=1e-6), "count": 3}
  summary = metrics.summarize({"a": {"accuracy": 1.0, "loss": 0.5, "count": 10}, "b": {"accuracy": 0.5, "loss": 1.5, "count": 1000}})
  assert summary["average"] == {"accuracy": 0.75, "loss": 1.0}  # unweighted over tasks
  with pytest.raises(ValueError, match="no examples"):
    metrics.finalize({"correct": 0, "loss": 0, "count": 0})


def _color_embed(params, images):
  """A toy 'model': mean colour (3 features) of uint8 images times a parameter."""
  _color_embed.traces += 1
  return jnp.mean(images.astype(jnp.float32), axis=(1, 2)) * params["w"]


_color_embed.traces = 0


def test_evaluate_pads_masks_and_compiles_once():
  rng = np.random.default_rng(0)
  c, n, bs = 5, 10, 4  # 5 classes > ... a partial last batch (4, 4, 2)
  images = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
  labels = rng.integers(0, c, n).astype(np.int32)
  head = Z.l2_normalize(rng.standard_normal((c, 3)).astype(np.float32))
  batches = [{"image": images[s:s + bs], "label": labels[s:s + bs]} for s in range(0, n, bs)]
  _color_embed.traces = 0
  for w in (1.0, -2.0):  # two "models": one compilation
    got = Z.evaluate(_color_embed, {"w": jnp.float32(w)}, head, batches, logit_scale=math.log(10.0), pad_classes=8)
    feats = images.astype(np.float64).mean((1, 2)) * w
    logits = 10.0 * (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ head.T
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert got["count"] == n
    assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert got["loss"] == pytest.approx(-np.mean(logp[np.arange(n), labels]), rel=1e-5)
  # a head with another class count, padded to the same size: still one compilation
  Z.evaluate(_color_embed, {"w": jnp.float32(1.0)}, head[:3], [{"image": images[:4], "label": labels[:4] % 3}],
             batch_size=4, pad_classes=8)
  assert _color_embed.traces == 1
  with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
    Z.evaluate(_color_embed, {"w": 1.0}, head[:3], [{"image": images[:4], "label": np.full(4, 3)}])
  with pytest.raises(ValueError, match="batch_size is 2"):
    Z.evaluate(_color_embed, {"w": 1.0}, head, batches, batch_size=2)
  with pytest.raises(ValueError, match="no batches"):
    Z.evaluate(_color_embed, {"w": 1.0}, head, [])


def _fake_text(texts):
  """Deterministic pseudo-embeddings of strings (D = 6)."""
  _fake_text.calls += 1
  return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(6) for t in texts]).astype(np.float32)


_fake_text.calls = 0


def test_build_head_and_cache(tmp_path):
  classes = ["cat", "dog", "eel"]
  head = Z.build_head(_fake_text, classes, TEMPLATES)
  assert head.shape == (3, 6) and head.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(head, axis=1), 1.0, rtol=1e-6)
  for i, c in enumerate(classes):
    e = _fake_text([t.format(c) for t in TEMPLATES])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    m = e.mean(0)
    np.testing.assert_allclose(head[i], m / np.linalg.norm(m), rtol=1e-6)
  np.testing.assert_array_equal(Z.build_head(_fake_text, classes, [lambda c: f"a photo of a {c}.", "the {}"]), head)
  with pytest.raises(ValueError, match="needs classes and templates"):
    Z.build_head(_fake_text, classes, [])
  # orbax cache: round trip, and only missing heads are built
  tasks = {"pets": (classes, TEMPLATES), "two": (["x", "y"], TEMPLATES)}
  _fake_text.calls = 0
  heads = Z.cached_heads(tmp_path / "heads", _fake_text, tasks)
  assert _fake_text.calls == 2
  loaded = Z.load_heads(tmp_path / "heads")
  assert set(loaded) == {"pets", "two"}
  np.testing.assert_array_equal(loaded["pets"], heads["pets"])
  again = Z.cached_heads(tmp_path / "heads", None, tasks)  # no encoder needed: all cached
  np.testing.assert_array_equal(again["two"], heads["two"])
  Z.cached_heads(tmp_path / "heads", _fake_text, {**tasks, "more": (["a"], TEMPLATES)})
  assert _fake_text.calls == 3 and set(Z.load_heads(tmp_path / "heads")) == {"pets", "two", "more"}
  with pytest.raises(ValueError, match="not cached and no text encoder"):
    Z.cached_heads(tmp_path / "heads", None, {"new": (["a"], TEMPLATES)})
  with pytest.raises(ValueError, match="no heads checkpoint"):
    Z.load_heads(tmp_path / "nothing")


@pytest.mark.parity
def test_zero_shot_end_to_end_matches_pytorch(tmp_path):
  """Tiny CLIP, 12 classes (more than a batch of 8), 21 images (last batch of 5), grayscale/RGBA/palette
  inputs: heads, logits, accuracy and loss equal transformers + the reference protocol in PyTorch."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from PIL import Image

  from jaxmerge.data import datasets as D
  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.io import hf
  from jaxmerge.models import clip

  c = F.CONFIGS[0]
  path, model = F.save_tiny_clip(tmp_path / "clip", c)
  classnames = [f"class{i}" for i in range(12)]
  dpath, dd = F.image_dataset(tmp_path / "data", num_classes=12, n_test=21, modes=("RGB", "L", "RGBA", "P"),
                              classnames=classnames)
  cfg, params = hf.load_clip(path)
  tok = transformers.CLIPTokenizer.from_pretrained(str(path))
  pre = Preprocess.from_pretrained(path)
  zs = Z.ClipZeroShot(cfg, params, tokenizer=tok, tasks={"toy": (classnames, TEMPLATES)}, preprocess=pre,
                      batch_size=8, heads_cache=tmp_path / "heads")
  source = D.load_hf(str(dpath), "test")
  got = zs.evaluate(params, "toy", D.batches(source, 8, preprocess=pre))
  # reference: transformers' CLIPModel, tokenizer (padding to the longest prompt) and CLIPImageProcessor
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  with torch.no_grad():
    rows = []
    for name in classnames:
      inputs = tok([t.format(name) for t in TEMPLATES], padding=True, return_tensors="pt")
      e = model.get_text_features(**inputs).pooler_output
      e = e / e.norm(dim=-1, keepdim=True)
      e = e.mean(0)
      rows.append(e / e.norm())
    head = torch.stack(rows)
    images = [Image.open(io.BytesIO(x["bytes"])) for x in dd["test"].cast_column("image", __import__("datasets").Image(decode=False))["image"]]
    assert {im.mode for im in images} == {"RGB", "L", "RGBA", "P"}
    pix = proc(images=images, return_tensors="pt")["pixel_values"]
    emb = model.get_image_features(pixel_values=pix).pooler_output
    logits = model.logit_scale.exp() * (emb / emb.norm(dim=-1, keepdim=True)) @ head.T
    labels = torch.tensor(dd["test"]["label"])
    acc = (logits.argmax(1) == labels).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
  np.testing.assert_allclose(zs.heads["toy"], head.numpy(), rtol=1e-5, atol=1e-5)
  ours = Z.head_logits(clip.encode_image(cfg, params, pix.numpy().transpose(0, 2, 3, 1)), zs.heads["toy"],
                       params["logit_scale"])
  np.testing.assert_allclose(ours, logits.numpy(), rtol=1e-4, atol=1e-4)
  assert got["count"] == 21
  assert round(got["accuracy"] * 21) == round(acc * 21)  # the same images are right
  assert got["loss"] == pytest.approx(loss, rel=1e-4)
  cached = Z.load_heads(tmp_path / "heads")  # cached under the task and a key of its content
  key = f"toy__{zs.cache_key('toy')}"
  assert list(cached) == [key] and cached[key].shape == (12, cfg.projection_dim)
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]; known tasks: toy"):
    zs.evaluate_tasks(params, ["toy", "nope"], lambda t: [])


@pytest.fixture(scope="module")
def suite_files(tmp_path_factory):
  """A tiny pretrained CLIP (text length 20: FusionBench's digit prompts fit), two 'experts' and local copies
  of two tasks' test sets (mnist, svhn: 10 digit classes each)."""
  pytest.importorskip("torch")
  root = tmp_path_factory.mktemp("suite")
  c = F.CONFIGS[2]
  pre, model = F.save_tiny_clip(root / "pretrained", c)
  experts = {t: F.save_tiny_vision(root / f"expert_{t}", c, seed=i + 1, from_clip=model, noise=0.02)[0]
             for i, t in enumerate(("mnist", "svhn"))}
  for i, t in enumerate(("mnist", "svhn")):
    F.image_dataset(root / "data" / t, num_classes=10, n_test=11, n_train=4, seed=i,
                    classnames=[str(k) for k in range(10)], sizes=((40, 52), (48, 48), (61, 50)))
  return root, pre, experts


def test_eval_command(suite_files, tmp_path, capsys):
  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.eval import command
  from jaxmerge.eval.command import task_batches
  from jaxmerge.io import hf

  root, pre, experts = suite_files
  parser = argparse.ArgumentParser()
  command.register(parser.add_subparsers(dest="command"))
  out = tmp_path / "res.json"
  args = parser.parse_args(["eval", "--model", str(experts["mnist"]), "--pretrained", str(pre), "--tasks",
                            "mnist,svhn", "--data", str(root / "data"), "--batch-size", "4", "--workers", "0",
                            "--out", str(out)])
  assert args.func(args) == 0
  printed = capsys.readouterr().out
  assert "| mnist |" in printed and "**average**" in printed
  res = json.loads(out.read_text())
  assert set(res["tasks"]) == {"mnist", "svhn"} and res["tasks"]["mnist"]["count"] == 11
  # the same numbers through the library
  import transformers

  cfg, params = hf.load_clip(pre)
  _, ex = hf.load_clip(experts["mnist"], like=cfg)
  p = Preprocess.from_pretrained(pre)
  zs = Z.ClipZeroShot(cfg, params, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(pre)), preprocess=p,
                      batch_size=4)
  want = zs.evaluate(ex, "svhn", task_batches("svhn", data=str(root / "data"), split="test", batch_size=4, preprocess=p))
  assert res["tasks"]["svhn"]["accuracy"] == pytest.approx(want["accuracy"])
  assert res["tasks"]["svhn"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
  assert res["average"]["accuracy"] == pytest.approx((res["tasks"]["mnist"]["accuracy"] + want["accuracy"]) / 2)
  bad = parser.parse_args(["eval", "--model", str(pre), "--tasks", "mnist,imagenet"])
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['imagenet'\]; known tasks: sun397"):
    bad.func(bad)
  vision_only = parser.parse_args(["eval", "--model", str(experts["mnist"]), "--tasks", "mnist"])
  with pytest.raises(ValueError, match="vision-only model; pass --pretrained"):
    vision_only.func(vision_only)


def test_real_suite_script_on_tiny_fixtures(suite_files, tmp_path):
  import importlib.util
  import pathlib

  import jaxmerge as jm

  root, pre, experts = suite_files
  spec = importlib.util.spec_from_file_location(
      "clip_suites", pathlib.Path(__file__).resolve().parents[1] / "experiments" / "clip_suites.py")
  suites = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(suites)
  cfg = {"name": "tiny", "pretrained": str(pre), "experts": {t: str(p) for t, p in experts.items()},
         "suite": ["mnist", "svhn"], "data": str(root / "data"), "batch_size": 4, "workers": 0,
         "cache": str(tmp_path / "cache"), "methods": {"task_arithmetic": {"scale": 0.5}, "tall_mask": {},
                                                      "not_a_method": {}}}
  res = suites.run(cfg, tmp_path / "out", progress=False)
  names = [r["method"] for r in res["rows"]]
  assert names == ["pretrained", "experts", "task_arithmetic", "tall_mask"]  # a merged and a per-task method
  assert res["skipped"] == {"not_a_method": "not registered in this jaxmerge"}
  assert all((tmp_path / "out" / f"results.{e}").exists() for e in ("json", "md", "csv"))
  assert "| tall_mask † |" in (tmp_path / "out" / "results.md").read_text()
  assert len(list((tmp_path / "cache" / "images").glob("mnist-*.images.npy"))) == 1  # decoded once
  # the task-arithmetic row is the merged tower evaluated by the library
  from jaxmerge.io import hf

  pcfg, pp = hf.load_clip(pre)
  ex = [hf.load_clip(experts[t], like=pcfg)[1]["vision_model"] for t in ("mnist", "svhn")]
  merged = jm.merge(jm.get_method("task_arithmetic")(scale=0.5), pp["vision_model"], ex, layout=jm.filters.flax_layout)
  import transformers

  from jaxmerge.data.preprocess import Preprocess
  from jaxmerge.eval.command import task_batches

  p = Preprocess.from_pretrained(pre)
  zs = Z.ClipZeroShot(pcfg, pp, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(pre)), preprocess=p, batch_size=4)
  want = zs.evaluate(merged, "mnist", task_batches("mnist", data=str(root / "data"), split="test", batch_size=4, preprocess=p))
  ta = res["rows"][2]
  assert ta["accuracy"]["mnist"] == pytest.approx(want["accuracy"])
  assert ta["loss"]["mnist"] == pytest.approx(want["loss"], rel=1e-5)
  # experts row: each expert on its own task
  own = zs.evaluate(ex[1], "svhn", task_batches("svhn", data=str(root / "data"), split="test", batch_size=4, preprocess=p))
  assert res["rows"][1]["accuracy"]["svhn"] == pytest.approx(own["accuracy"])
