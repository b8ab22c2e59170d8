"""Tiny CLIP fixtures, reusable by any test: Hugging Face configs and checkpoints written with
``save_pretrained`` into temporary directories, a tiny ``CLIPTokenizer`` built from a local vocabulary, and tiny
image datasets (``datasets.Dataset.save_to_disk`` and image folders). Nothing is downloaded.

Usage::

    from tests import clip_fixtures as F
    path, torch_model = F.save_tiny_clip(tmp_path / "clip", F.CONFIGS[0])
    tok = F.tiny_tokenizer(tmp_path / "clip")          # also saved next to the model
    data = F.image_dataset(tmp_path / "data", num_classes=12, n_test=21)

torch and transformers are needed for checkpoints (``pytest.importorskip`` them in the caller).
"""

from __future__ import annotations

import io
import pathlib
import string

import numpy as np

__all__ = ["CONFIGS", "TOKENIZER_VOCAB", "hf_config", "image_dataset", "image_folder", "make_torch_clip",
           "random_pil", "save_tiny_clip", "save_tiny_vision", "tiny_tokenizer"]

# Parity configurations: activations, patch sizes, widths, heads, projection sizes, text lengths, EOS rules.
CONFIGS = [
    dict(name="quickgelu-p8", act="quick_gelu", width=32, heads=4, layers=2, mlp=64, patch=8, image=32, proj=16,
         text_width=32, text_heads=4, text_layers=2, text_len=12, vocab=None, eos=2),
    dict(name="gelu-p4", act="gelu", width=24, heads=3, layers=2, mlp=40, patch=4, image=16, proj=8,
         text_width=16, text_heads=2, text_layers=1, text_len=9, vocab=None, eos=5),
    dict(name="quickgelu-p16-wide", act="quick_gelu", width=48, heads=6, layers=1, mlp=96, patch=16, image=48,
         proj=40, text_width=40, text_heads=5, text_layers=2, text_len=20, vocab=None, eos=None),
]

_CHARS = sorted(set(string.ascii_lowercase + string.digits + ".,:;!?'\"-()&/"))
_MERGES = [("a", "t</w>"), ("t", "h"), ("th", "e</w>"), ("p", "h"), ("o", "t"), ("ph", "ot"), ("phot", "o</w>"),
           ("o", "f</w>"), ("c", "l"), ("cl", "a"), ("cla", "s"), ("clas", "s</w>")]


def _vocab() -> dict[str, int]:
  v: dict[str, int] = {}
  for c in _CHARS:
    v[c] = len(v)
  for c in _CHARS:
    v[c + "</w>"] = len(v)
  for a, b in _MERGES:
    v[a + b] = len(v)
  v["<|startoftext|>"] = len(v)
  v["<|endoftext|>"] = len(v)  # the largest id, as in OpenAI's vocabulary (legacy argmax pooling works)
  return v


TOKENIZER_VOCAB = _vocab()
VOCAB_SIZE = len(TOKENIZER_VOCAB)
EOS_ID = TOKENIZER_VOCAB["<|endoftext|>"]
BOS_ID = TOKENIZER_VOCAB["<|startoftext|>"]


def tiny_tokenizer(save_dir: str | pathlib.Path | None = None, context_length: int = 16):
  """A ``transformers.CLIPTokenizer`` over letters, digits and punctuation plus a few merges (``VOCAB_SIZE``
  tokens; ``<|endoftext|>`` is the last id and also the padding token). Saved to ``save_dir`` if given."""
  import transformers

  tok = transformers.CLIPTokenizer(vocab=dict(TOKENIZER_VOCAB), merges=list(_MERGES), model_max_length=context_length)
  if save_dir is not None:
    tok.save_pretrained(str(save_dir))
  return tok


def hf_config(c: dict):
  """A ``transformers.CLIPConfig`` for a :data:`CONFIGS` entry (``vocab=None``: the tokenizer's vocabulary;
  ``eos=None``: the tokenizer's end-of-text id)."""
  import transformers

  vocab = c.get("vocab") or VOCAB_SIZE
  eos = c.get("eos") if c.get("eos") is not None else EOS_ID
  vcfg = dict(hidden_size=c["width"], intermediate_size=c["mlp"], num_hidden_layers=c["layers"],
              num_attention_heads=c["heads"], image_size=c["image"], patch_size=c["patch"], hidden_act=c["act"])
  tcfg = dict(hidden_size=c["text_width"], intermediate_size=2 * c["text_width"], num_hidden_layers=c["text_layers"],
              num_attention_heads=c["text_heads"], vocab_size=vocab, max_position_embeddings=c["text_len"],
              hidden_act=c["act"], eos_token_id=eos, bos_token_id=BOS_ID if eos != 2 else 0,
              pad_token_id=EOS_ID if eos != 2 else 1)
  return transformers.CLIPConfig(text_config=tcfg, vision_config=vcfg, projection_dim=c["proj"])


def make_torch_clip(c: dict, seed: int = 0):
  """A random ``transformers.CLIPModel`` (eval mode) with non-trivial layer norms and logit scale."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.CLIPModel(hf_config(c)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "logit_scale" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_tiny_clip(path: str | pathlib.Path, c: dict = CONFIGS[0], seed: int = 0, *, tokenizer: bool = True,
                   preprocessor: bool = True):
  """Saves a random tiny ``CLIPModel`` (plus a tokenizer and a ``preprocessor_config.json``) with
  ``save_pretrained``. Returns ``(path, torch_model)``."""
  path = pathlib.Path(path)
  model = make_torch_clip(c, seed)
  model.save_pretrained(path)
  if tokenizer:
    tiny_tokenizer(path, context_length=c["text_len"])
  if preprocessor:
    import transformers

    transformers.CLIPImageProcessorPil(size={"shortest_edge": c["image"]},
                                       crop_size={"height": c["image"], "width": c["image"]}).save_pretrained(path)
  return path, model


def save_tiny_vision(path: str | pathlib.Path, c: dict = CONFIGS[0], seed: int = 0, *, from_clip=None,
                     noise: float = 0.0):
  """Saves a ``CLIPVisionModel`` with ``save_pretrained`` (transformers 5 writes keys without the
  ``vision_model.`` prefix). ``from_clip``: copy that torch ``CLIPModel``'s vision tower (plus ``noise``: a
  "fine-tuned expert"). Returns ``(path, torch_vision_model)``."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.CLIPVisionModel(hf_config(c).vision_config).eval()
  if from_clip is not None:
    model.load_state_dict(from_clip.vision_model.state_dict())
  with torch.no_grad():
    for p in model.parameters():
      p.add_(noise * torch.randn_like(p))
  model.save_pretrained(path)
  return pathlib.Path(path), model


def random_pil(rng: np.random.Generator, mode: str, size: tuple[int, int]):
  """A random PIL image of ``mode`` (``RGB``, ``L``, ``RGBA``, ``LA``, ``P`` with a transparent colour)."""
  from PIL import Image

  w, h = size
  if mode == "L":
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
  if mode in ("RGBA", "LA"):
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    return img.convert("LA") if mode == "LA" else img
  if mode == "P":
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert("P")
    img.info["transparency"] = 0
    return img
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _png(img) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def image_dataset(path: str | pathlib.Path, *, num_classes: int = 12, n_test: int = 21, n_train: int = 30,
                  seed: int = 0, modes=("RGB", "L", "RGBA"), sizes=((20, 28), (33, 17), (24, 24)),
                  classnames=None, bad_index: int | None = None):
  """A ``DatasetDict`` (``train``/``test``) of random PNG images with a ``ClassLabel`` column, saved with
  ``save_to_disk`` to ``path``; image modes and sizes cycle through ``modes`` and ``sizes``.
  ``bad_index``: that test image's bytes are garbage (an undecodable image). Returns ``(path, dataset_dict)``."""
  import datasets

  rng = np.random.default_rng(seed)
  names = list(classnames or [f"class{i}" for i in range(num_classes)])
  features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
  splits = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images, labels = [], []
    for i in range(n):
      img = random_pil(rng, modes[i % len(modes)], sizes[i % len(sizes)])
      data = _png(img) if not (split == "test" and i == bad_index) else b"not an image at all"
      images.append({"bytes": data, "path": f"{split}_{i}.png"})
      labels.append(int(rng.integers(0, len(names))))
    splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
  dd = datasets.DatasetDict(splits)
  dd.save_to_disk(str(path))
  return pathlib.Path(path), dd


def image_folder(path: str | pathlib.Path, *, classes=("cat", "dog", "eel"), per_class: int = 3, seed: int = 0,
                 modes=("RGB", "L", "RGBA")) -> pathlib.Path:
  """``path/<class>/<i>.png`` random images. Returns ``path``."""
  rng = np.random.default_rng(seed)
  path = pathlib.Path(path)
  k = 0
  for c in classes:
    (path / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      random_pil(rng, modes[k % len(modes)], (18 + k, 22)).save(path / c / f"{i}.png")
      k += 1
  return path
