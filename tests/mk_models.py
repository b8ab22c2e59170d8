"""Tiny Hugging Face checkpoints like the ones mergekit's own tests build (``tests/common.py`` of
arcee-ai/mergekit): Llama and Granite with 2 layers (hidden 32, MLP 48, vocabulary 64), a GPT-2 with 12 layers
(shrunk to width 16: mergekit's is full GPT-2 size), a Llava with 2-layer towers, and word-level BPE tokenizers
(``<unk> <s> </s> _tok_3 ... _tok_63`` plus added tokens). Built with transformers (torch CPU), seeded, so a
test session builds the same models every time."""

from __future__ import annotations

import json
import pathlib
import tempfile


def _save(model, path: pathlib.Path) -> str:
  model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def _seed(seed: int):
  import torch

  torch.manual_seed(seed)


def picollama(path, vocab_size: int = 64, seed: int = 0, layers: int = 2) -> str:
  """A Llama with 2 layers (mergekit's ``make_picollama``)."""
  from transformers import LlamaConfig, LlamaForCausalLM

  _seed(seed)
  cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                    num_hidden_layers=layers)
  return _save(LlamaForCausalLM(cfg), pathlib.Path(path))


def picogranite(path, vocab_size: int = 64, seed: int = 0) -> str:
  """A Granite with 2 layers (mergekit's ``make_picogranite``)."""
  from transformers import GraniteConfig, GraniteForCausalLM

  _seed(seed)
  cfg = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=2, num_hidden_layers=2)
  return _save(GraniteForCausalLM(cfg), pathlib.Path(path))


def gpt2_like(path, seed: int = 0) -> str:
  """A GPT-2 with mergekit's 12 layers, shrunk to width 16 and 64 tokens (mergekit's ``make_gpt2size`` is
  full size, 124M parameters: too slow for the default test run)."""
  from transformers import GPT2Config, GPT2LMHeadModel

  _seed(seed)
  cfg = GPT2Config(n_ctx=64, n_embd=16, n_head=2, n_layer=12, n_positions=64, vocab_size=64)
  return _save(GPT2LMHeadModel(cfg), pathlib.Path(path))


def picollava(path, seed: int = 0) -> str:
  """A Llava with 2-layer vision and text towers (mergekit's ``make_picoLlaVa``)."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

  _seed(seed)
  vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64,
                            intermediate_size=128)
  text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
  cfg = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
  return _save(LlavaForConditionalGeneration(config=cfg), pathlib.Path(path))


def tokenizer(vocab_size: int = 64, added=()):
  """A fast Llama tokenizer over ``<unk> <s> </s> _tok_3 ...`` (a BPE without merges) plus ``added`` tokens."""
  import tokenizers
  from transformers import LlamaTokenizerFast

  words = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
  spec = {"version": "1.0", "added_tokens": [],
          "model": {"type": "BPE", "vocab": {w: i for i, w in enumerate(words)}, "merges": []}}
  with tempfile.TemporaryDirectory() as d:
    f = pathlib.Path(d) / "tokenizer.json"
    tokenizers.Tokenizer.from_str(json.dumps(spec)).save(str(f))
    tok = LlamaTokenizerFast(tokenizer_file=str(f))
  tok.add_tokens(list(added))
  return tok


def llama_with_tokenizer(path, vocab_size: int, added=(), seed: int = 0) -> str:
  """:func:`picollama` with :func:`tokenizer` (64 base tokens plus ``added``) saved beside it."""
  p = picollama(path, vocab_size=vocab_size, seed=seed)
  tokenizer(64, added).save_pretrained(p)
  return p
