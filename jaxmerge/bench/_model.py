"""The tiny CLIP of the offline suite: jaxmerge's own CLIP module at a small config.

This file is the only place where the benchmark touches the model's API; everything else sees
``init``/``encode_image``/``encode_text`` and the ``vision_model`` subtree (what gets fine-tuned and merged).
"""

from __future__ import annotations

from typing import Any

from jaxmerge.models import clip

__all__ = ["TinyClip", "VISION_KEY"]

VISION_KEY = "vision_model"


class TinyClip:
  """Functional handle on a small CLIP: config, init and the two encoders.

  Args:
    image_size, patch_size, width, layers, heads: vision tower.
    vocab_size, context_length, text_width, text_layers, text_heads, eos_token_id: text tower.
    projection_dim: joint embedding size.
  """

  def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int,
               vocab_size: int, context_length: int, text_width: int, text_layers: int, text_heads: int,
               projection_dim: int, eos_token_id: int):
    self.clip = clip
    self.config = clip.ClipConfig(
      image_size=image_size, patch_size=patch_size, vision_width=width, vision_layers=layers,
      vision_heads=heads, vocab_size=vocab_size, context_length=context_length, text_width=text_width,
      text_layers=text_layers, text_heads=text_heads, projection_dim=projection_dim, eos_token_id=eos_token_id)

  def init(self, key) -> dict:
    return self.clip.init(self.config, key)

  def encode_image(self, params: dict, images) -> Any:
    """Projected, unnormalized image embeddings [B, D] of preprocessed float images [B, H, W, 3]."""
    return self.clip.encode_image(self.config, params, images)

  def encode_text(self, params: dict, input_ids, attention_mask) -> Any:
    return self.clip.encode_text(self.config, params, input_ids, attention_mask)

  @staticmethod
  def vision(params: dict) -> dict:
    return params[VISION_KEY]

  @staticmethod
  def with_vision(params: dict, vision: dict) -> dict:
    return {**params, VISION_KEY: vision}
