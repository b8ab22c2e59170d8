"""Parity with FusionBench 0.2.33 for the data-driven merges (Fisher merging, RegMean) on a tiny random CLIP.

Both libraries get the same weights (a tiny Hugging Face ``CLIPModel`` and two "fine-tuned" vision towers,
the pretrained one plus noise), the same zero-shot heads (random unit text embeddings times CLIP's
``exp(logit_scale)``) and the same images. FusionBench runs through its CLIP algorithm classes
(``FisherMergingForCLIPVisionModel.get_fisher_weights`` and ``RegMeanAlgorithmForCLIP.get_regmean_weights``,
whose forward hooks record the inputs of every ``nn.Linear``), then its own merge functions; jaxmerge runs
:func:`jaxmerge.tta.validation.fisher` / :func:`~jaxmerge.tta.validation.regmean` on its pure-JAX CLIP with
the weights read by :func:`jaxmerge.io.hf.from_hf_state_dict`. Metric: relative error of the merged update per
leaf (``tests/parity/_common.py``) < 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fusion_bench")
transformers = pytest.importorskip("transformers")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from jaxmerge import tree as jtree  # noqa: E402
from jaxmerge.io import hf  # noqa: E402
from jaxmerge.models import clip  # noqa: E402
from jaxmerge.tta import validation as V  # noqa: E402
from tests import clip_fixtures as F  # noqa: E402
from tests.parity._common import assert_close  # noqa: E402

pytestmark = pytest.mark.parity

CLASSES = (3, 5)
N, BS = 32, 16  # 32 examples per task in two batches of 16


@pytest.fixture(scope="module")
def setup():
  c = F.CONFIGS[0]
  torch.manual_seed(0)
  model = F.make_torch_clip(c, seed=0)
  vcfg = clip.ClipConfig.from_hf(F.hf_config(c)).vision_only()
  pre_t = transformers.CLIPVisionModel(F.hf_config(c).vision_config).eval()
  pre_t.load_state_dict(model.vision_model.state_dict())
  experts_t = []
  for _ in CLASSES:
    e = transformers.CLIPVisionModel(F.hf_config(c).vision_config).eval()
    e.load_state_dict(pre_t.state_dict())
    with torch.no_grad():
      for p in e.parameters():
        p.add_(0.05 * p.detach().abs().mean() * torch.randn_like(p) + 0.01 * torch.randn_like(p))
    experts_t.append(e)
  text = []
  for k in CLASSES:
    t = torch.randn(k, c["proj"])
    text.append(t / t.norm(dim=-1, keepdim=True))
  images = [torch.randn(N, 3, c["image"], c["image"]) for _ in CLASSES]

  def ours(m):
    return hf.from_hf_state_dict(vcfg, {k: v.detach().numpy() for k, v in m.state_dict().items()})

  proj = jnp.asarray(model.visual_projection.weight.detach().numpy().T)
  scale = float(model.logit_scale.detach().exp())

  def forward(params, x):
    z = clip.vision_features(vcfg, params, x) @ proj
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

  return dict(model=model, vcfg=vcfg, pre_t=pre_t, experts_t=experts_t, text=text, images=images,
              pre=ours(pre_t), experts=[ours(e) for e in experts_t], forward=forward,
              heads=[scale * t.numpy() for t in text],
              inputs=[np.transpose(x.numpy(), (0, 2, 3, 1)) for x in images])


def _fb_common(alg, s):
  alg._clip_processor = lambda x: x  # images are already tensors
  alg.zeroshot_weights = {f"task{i}": t for i, t in enumerate(s["text"])}
  alg.visual_projection = s["model"].visual_projection
  alg.logit_scale_exp = s["model"].logit_scale.detach().exp()


def _flat_hf(s, sd):
  return jtree.flatten_paths(hf.from_hf_state_dict(s["vcfg"], {k: v.detach().numpy() for k, v in sd.items()}))


def _data(s, i):
  return [(x, 0) for x in s["images"][i]]


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_matches_fusionbench(setup, normalize):
  from fusion_bench.method import FisherMergingForCLIPVisionModel
  from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

  s = setup
  alg = FisherMergingForCLIPVisionModel(exclude_param_names_regex=[], normalize_fisher_weight=normalize,
                                        minimal_fisher_weight=1e-6, num_fisher_examples=N,
                                        dataloader_kwargs={"batch_size": BS, "num_workers": 0})
  _fb_common(alg, s)
  alg.fabric = None
  names = list(dict(s["experts_t"][0].named_parameters()))
  params, fishers = {}, []
  for i, e in enumerate(s["experts_t"]):
    sd = e.state_dict()
    for n in names:
      params.setdefault(n, []).append(sd[n])
    fishers.append(alg.get_fisher_weights(f"task{i}", e, _data(s, i), names))
  ref = merging_with_fisher_weights(params, fishers, torch.ones(len(CLASSES)) / len(CLASSES),
                                    normalize_fisher_weight=normalize, minimal_fisher_weight=1e-6)
  ref_sd = {**s["pre_t"].state_dict(), **ref}
  # The Fisher entries must be comparable to the 1e-6 floor for the test to see them: check they are not.
  assert max(float(f.abs().max()) for f in fishers[0].values()) > 1e-3
  out = V.fisher(s["pre"], s["experts"], s["forward"], s["heads"], s["inputs"], num_examples=N, batch_size=BS,
                 normalize=normalize)
  assert_close(jtree.flatten_paths(out), _flat_hf(s, ref_sd), jtree.flatten_paths(s["pre"]), what="fisher")


def test_regmean_matches_fusionbench(setup):
  from fusion_bench.method import RegMeanAlgorithmForCLIP
  from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
  from fusion_bench.method.regmean.utils import get_modules_to_merge

  s = setup
  alg = RegMeanAlgorithmForCLIP(num_regmean_examples=N, exclude_param_names_regex=[], reduce_non_diagonal_ratio=0.95,
                                weight_transpose=True, dataloader_kwargs={"batch_size": BS, "num_workers": 0})
  _fb_common(alg, s)
  params, grams = {}, []
  with torch.no_grad():
    for i, e in enumerate(s["experts_t"]):
      for n, v in e.state_dict().items():
        params.setdefault(n, []).append(v)
      linears = get_modules_to_merge(e, [torch.nn.Linear])
      grams.append(alg.get_regmean_weights(f"task{i}", e, _data(s, i), linears))
    ref = merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=0.95, weight_transpose=True)
  assert len(grams[0]) == 6 * F.CONFIGS[0]["layers"]  # q, k, v, out, fc1, fc2 per layer
  out = V.regmean(s["pre"], s["experts"], s["forward"], s["inputs"], alpha=0.95, num_examples=N, batch_size=BS)
  assert_close(jtree.flatten_paths(out), _flat_hf(s, ref), jtree.flatten_paths(s["pre"]), what="regmean")
