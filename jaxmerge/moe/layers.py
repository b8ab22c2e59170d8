"""NNX layers of the upcycled models and the ``upcycle`` surgery (SMILE linears, WEMoE MLPs).

Expert tensors are :class:`Expert` variables (not ``nnx.Param``) and routers :class:`RouterParam` (an
``nnx.Param`` subclass, as ``nnx.LoRAParam``), so ``nnx.split(model, RouterParam, ...)`` separates exactly what
trains. An upcycled model is the plain module with some submodules swapped, so it is called exactly like the
plain one (``vision_tower(images)``).

Typical use on a CLIP vision tower (params as in :mod:`jaxmerge.models.clip`)::

    model = wemoe(config, pretrained_vision, expert_visions, key=key)   # every MLP a WEMoE MLP, rest TA
    pooled = model(images)
    graphdef, routers, rest = nnx.split(model, RouterParam, ...)        # train only the routers
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

import jaxmerge as jm
from jaxmerge import tree as jtree
from jaxmerge.models import clip
from jaxmerge.moe import math as mm

__all__ = ["Expert", "RouterParam", "SmileLinear", "WEMoEMLP", "count_params", "load_state", "router_adapter",
           "save_state", "smile", "upcycle", "vision_module", "wemoe"]


class RouterParam(nnx.Param):
  """A router's trainable parameter (the only thing WEMoE training updates)."""


class Expert(nnx.Variable):
  """A frozen expert tensor (task vectors, SVD factors, training-free gates)."""


def _get(tree: Any, path: str) -> Any:
  node = tree
  for k in path.split("/"):
    try:
      node = node[k]
    except (KeyError, TypeError, IndexError):
      raise ValueError(f"parameter tree has no {path!r} (missing {k!r})") from None
  return node


def _path(keys: Sequence[Any]) -> str:
  return "/".join(str(k) for k in keys)


def vision_module(config: clip.ClipConfig, params: Any) -> clip.VisionTransformer:
  """The NNX vision tower of ``config`` holding ``params`` (the ``vision_model`` subtree of a CLIP params dict).

  Args:
    config: the CLIP configuration.
    params: the ``vision_model`` parameter tree (cast to float32).

  Returns:
    A :class:`jaxmerge.models.clip.VisionTransformer` holding ``params``.

  Raises:
    ValueError: missing, unexpected or misshapen parameters (named).

  References:
    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.
    https://arxiv.org/abs/2103.00020
    Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
    ICLR 2021. https://arxiv.org/abs/2010.11929
  """
  model = nnx.eval_shape(lambda: clip.VisionTransformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  want = {p: tuple(x.shape) for p, x in jtree.flatten_paths(nnx.to_pure_dict(state)).items()}
  got = jtree.flatten_paths(params)
  bad = sorted(set(want) ^ set(got)) + [f"{p}: {tuple(np.shape(got[p]))} (expected {s})" for p, s in want.items()
                                        if p in got and tuple(np.shape(got[p])) != s]
  if bad:
    raise ValueError(f"vision params do not match the config: {bad[:6]}")
  pure = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def upcycle(model: nnx.Module, where: type | Callable[[str, nnx.Module], bool],
            build: Callable[[str, nnx.Module], nnx.Module]) -> nnx.Module:
  """Swaps the submodules selected by ``where`` for ``build(path, module)``, on a copy of ``model``.

  Args:
    model: any NNX module (left untouched: the surgery works on ``nnx.clone(model)``).
    where: a module type, or a predicate ``(path, module) -> bool`` with ``path`` like
      ``"encoder/layers/3/mlp"``. A selected module's own submodules are not visited.
    build: ``(path, module) -> new module`` (the module passed is the copy's).

  Returns:
    The new model.

  Raises:
    ValueError: nothing matched, or ``where`` selects the root.

  References:
    penzai's ``loraify_linears_in_selection``, adapted to NNX; Komatsuzaki et al., "Sparse Upcycling", ICLR
    2023. https://arxiv.org/abs/2212.05055
  """
  pred = (lambda p, m: isinstance(m, where)) if isinstance(where, type) else where
  new = nnx.clone(model)
  chosen = []
  for keys, node in nnx.iter_graph(new):
    if isinstance(node, nnx.Module) and pred(_path(keys), node):
      if not keys:
        raise ValueError("upcycle: `where` selects the whole model; select submodules")
      chosen.append(tuple(keys))
  chosen.sort(key=len)
  top: list[tuple] = []
  for c in chosen:
    if not any(c[:len(t)] == t for t in top):
      top.append(c)
  if not top:
    raise ValueError(f"upcycle: `where` matched no submodule of {type(model).__name__}")
  for keys in top:
    parent = new
    for k in keys[:-1]:
      parent = parent[k] if isinstance(parent, nnx.Dict) else getattr(parent, k)
    old = parent[keys[-1]] if isinstance(parent, nnx.Dict) else getattr(parent, keys[-1])
    mod = build(_path(keys), old)
    if isinstance(parent, nnx.Dict):
      parent[keys[-1]] = mod
    else:
      setattr(parent, keys[-1], mod)
  return new


# ----------------------------------------------------------------------------------------------------- SMILE


class SmileLinear(nnx.Module):
  """A linear layer upcycled to SMILE's sparse mixture of low-rank experts (training-free routing).

  Args:
    base: the pretrained ``nnx.Linear``.
    factors: :func:`jaxmerge.moe.math.smile_factors` of this layer.
    top_k: experts per token.
    path: for error messages.

  References:
    Tang et al., "SMILE", 2024. https://arxiv.org/abs/2408.10174
  """

  def __init__(self, base: nnx.Linear, factors: mm.SmileFactors, top_k: int = 1, *, path: str = "linear"):
    kernel = base.kernel[...]
    i, o = kernel.shape
    t = factors.gate.shape[0]
    want = {"gate": (t, i, None), "down": (t, i, None), "up": (t, None, o), "bias": (t, o)}
    for name, shape in want.items():
      got = getattr(factors, name).shape
      if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        raise ValueError(f"SMILE {path}: expert {name} has shape {tuple(got)}, expected {shape} for kernel {(i, o)}")
    if factors.down.shape[2] != factors.up.shape[1]:
      raise ValueError(f"SMILE {path}: down {factors.down.shape} and up {factors.up.shape} ranks differ")
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(base.bias[...]) if base.bias is not None else None
    self.gate = Expert(factors.gate)
    self.down = Expert(factors.down)
    self.up = Expert(factors.up)
    self.expert_bias = Expert(factors.bias)
    self.top_k = int(top_k)

  def __call__(self, x: Float[Array, "*b i"]) -> Float[Array, "*b o"]:
    f = mm.SmileFactors(self.gate[...], self.down[...], self.up[...], self.expert_bias[...])
    return mm.smile_linear(x, self.kernel[...], None if self.bias is None else self.bias[...], f, self.top_k)


def smile(config: clip.ClipConfig, pretrained: Any, finetuned: Sequence[Any], *, k: int | None = 32,
          gate_k: int = 16, top_k: int = 1, average_experts: bool = False,
          where: type | Callable[[str, nnx.Module], bool] = nnx.Linear) -> clip.VisionTransformer:
  """SMILE upcycling of a CLIP vision tower: every selected linear layer becomes a :class:`SmileLinear`.

  Args:
    config: the tower's config.
    pretrained: pretrained vision params; ``finetuned``: the experts' (same structure).
    k, gate_k, top_k: expert rank (``None``: full), routing rank, experts per token (FusionBench's ViT-B/32
      example: 32, 16, 1).
    average_experts: the other leaves are the experts' average instead of the pretrained values.
    where: which linear layers (a type or ``(path, module) -> bool``).

  Returns:
    The upcycled ``VisionTransformer`` (same call as the plain one).

  References:
    Tang et al., "SMILE", 2024. https://arxiv.org/abs/2408.10174
  """
  if not finetuned:
    raise ValueError("SMILE needs at least one fine-tuned model")
  base_params = jm.merge(jm.get_method("simple_average")(), pretrained, list(finetuned)) if average_experts else pretrained
  base = vision_module(config, base_params)
  pre_mod = vision_module(config, pretrained)  # linear layers always start from the pretrained weights

  def build(path, module):
    lin = _get_module(pre_mod, path)
    kt = jnp.stack([jnp.asarray(_get(f, path + "/kernel"), jnp.float32) for f in finetuned])
    bt = None if lin.bias is None else jnp.stack([jnp.asarray(_get(f, path + "/bias"), jnp.float32) for f in finetuned])
    fac = mm.smile_factors(lin.kernel[...], kt, None if lin.bias is None else lin.bias[...], bt, k=k, gate_k=gate_k)
    return SmileLinear(lin, fac, top_k, path=path)

  return upcycle(base, where, build)


def _get_module(model: nnx.Module, path: str) -> nnx.Module:
  node = model
  for k in path.split("/"):
    node = node[k] if isinstance(node, nnx.Dict) else getattr(node, k)
  return node


# ----------------------------------------------------------------------------------------------------- WEMoE


class Router(nnx.Module):
  """WEMoE's router (:func:`jaxmerge.moe.math.init_router` parameters held as :class:`RouterParam`)."""

  def __init__(self, layers: list[dict]):
    self.depth = len(layers) if "kernel" in layers[0] else 0
    # String keys (not an nnx.List): they survive an orbax round trip unchanged.
    self.layers = nnx.Dict({str(i): nnx.Dict({k: RouterParam(jnp.asarray(v, jnp.float32)) for k, v in layer.items()})
                            for i, layer in enumerate(layers)})

  def params(self) -> list[dict]:
    return [{k: v[...] for k, v in self.layers[str(i)].items()} for i in range(len(self.layers))]

  def __call__(self, h):
    return mm.router_logits(self.params(), h)


class WEMoEMLP(nnx.Module):
  """A CLIP MLP upcycled to WEMoE's weight-ensembling mixture: per sample, the MLP runs with
  ``theta_0 + sum_t w_t(x) tau_t`` where ``w(x)`` is the router's output averaged over tokens (and over the
  batch with ``batch_reduce``).

  Args:
    base: the pretrained MLP module (``fc1``, ``fc2``).
    deltas: ``{"fc1": {"kernel": (T, in, hidden), "bias": (T, hidden)}, "fc2": {...}}`` task vectors.
    router: router parameters (:func:`jaxmerge.moe.math.init_router`), input width = MLP width, ``T`` outputs.
    batch_reduce: share one weight vector across the batch (single-task batches; the reference's CLIP default).
    path: for error messages.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024.
    https://arxiv.org/abs/2402.00433
  """

  def __init__(self, base: nnx.Module, deltas: dict, router: list[dict], *, batch_reduce: bool = True,
               path: str = "mlp"):
    self.act = base.act
    self.fc1 = base.fc1
    self.fc2 = base.fc2
    t = None
    for name in ("fc1", "fc2"):
      for leaf in ("kernel", "bias"):
        want = tuple(getattr(getattr(base, name), leaf)[...].shape)
        got = tuple(np.shape(_get(deltas, f"{name}/{leaf}")))
        if got[1:] != want:
          raise ValueError(f"WEMoE {path}: task vectors {name}/{leaf} have shape {got}, expected (T, *{want})")
        if t is not None and got[0] != t:
          raise ValueError(f"WEMoE {path}: task vectors disagree on the number of tasks ({got[0]} vs {t})")
        t = got[0]
    width = base.fc1.kernel[...].shape[0]
    if "kernel" in router[0] and router[0]["kernel"].shape[0] != width:
      raise ValueError(f"WEMoE {path}: router input size {router[0]['kernel'].shape[0]} != MLP width {width}")
    if router[-1]["bias"].shape[-1] != t:
      raise ValueError(f"WEMoE {path}: router has {router[-1]['bias'].shape[-1]} outputs for {t} experts")
    self.tau = nnx.Dict({n: nnx.Dict({lf: Expert(jnp.asarray(_get(deltas, f"{n}/{lf}"), jnp.float32))
                                      for lf in ("kernel", "bias")}) for n in ("fc1", "fc2")})
    self.router = Router(router)
    self.batch_reduce = bool(batch_reduce)

  def gate(self, h: Float[Array, "B N w"]) -> Float[Array, "B T"]:
    return mm.wemoe_gate(self.router.params(), h, self.batch_reduce)

  def __call__(self, h: Float[Array, "B N w"]) -> Float[Array, "B N w"]:
    base = {n: {"kernel": getattr(self, n).kernel[...], "bias": getattr(self, n).bias[...]} for n in ("fc1", "fc2")}
    deltas = {n: {lf: self.tau[n][lf][...] for lf in ("kernel", "bias")} for n in ("fc1", "fc2")}
    return mm.wemoe_mlp(h, base, deltas, self.gate(h), clip.activation(self.act))


def wemoe(config: clip.ClipConfig, pretrained: Any, finetuned: Sequence[Any], *, key: jax.Array,
          init_lambda: float = 0.3, hidden_layers: int = 2, batch_reduce: bool = True,
          where: type | Callable[[str, nnx.Module], bool] = clip.MLP, routers: dict | None = None
          ) -> clip.VisionTransformer:
  """WEMoE upcycling of a CLIP vision tower: the selected MLPs become :class:`WEMoEMLP` over the pretrained MLP
  and the experts' MLP task vectors; every other leaf is task arithmetic with ``init_lambda``.

  Args:
    config: the tower's config; ``pretrained``, ``finetuned``: vision params.
    key: initializes the routers (``fold_in`` by block).
    init_lambda: task-arithmetic scale and the routers' initial output (FusionBench 0.3).
    hidden_layers: router depth (0, 1 or 2; FusionBench 2).
    batch_reduce: one weight vector per batch (FusionBench's CLIP setting).
    where: which MLPs (default: all).
    routers: ``{path: router params}`` to use instead of fresh ones (e.g. another implementation's).

  Returns:
    The upcycled ``VisionTransformer``.

  References:
    Tang et al., "WEMoE", ICML 2024. https://arxiv.org/abs/2402.00433
  """
  if not finetuned:
    raise ValueError("WEMoE needs at least one fine-tuned model")
  merged = jm.merge(jm.get_method("task_arithmetic")(scale=init_lambda), pretrained, list(finetuned))
  base = vision_module(config, merged)
  pre_mod = vision_module(config, pretrained)
  t = len(finetuned)
  counter = [0]

  def build(path, module):
    del module
    mlp = _get_module(pre_mod, path)
    pre_mlp = _get(pretrained, path)
    deltas = {n: {lf: jnp.stack([jnp.asarray(_get(f, f"{path}/{n}/{lf}"), jnp.float32) for f in finetuned])
                  - jnp.asarray(pre_mlp[n][lf], jnp.float32)[None] for lf in ("kernel", "bias")} for n in ("fc1", "fc2")}
    if routers is not None and path in routers:
      router = routers[path]
    else:
      router = mm.init_router(jax.random.fold_in(key, counter[0]), mlp.fc1.kernel[...].shape[0], t,
                              hidden_layers=hidden_layers, init_lambda=init_lambda)
    counter[0] += 1
    return WEMoEMLP(mlp, deltas, router, batch_reduce=batch_reduce, path=path)

  return upcycle(base, where, build)


# ------------------------------------------------------------------------------------------- state and training


def count_params(model: nnx.Module, *filters) -> int:
  """Number of scalars in ``model``'s state (optionally of the given variable types).

  Args:
    model: any NNX module.
    *filters: NNX variable filters (e.g. :class:`RouterParam`); none counts every variable.

  Returns:
    The total number of array elements.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024.
    https://arxiv.org/abs/2402.00433
    (the extra parameters an upcycled model stores are counted as there).
  """
  state = nnx.state(model, *filters) if filters else nnx.state(model)
  return int(sum(np.size(x) for x in jax.tree.leaves(state)))


def save_state(path, model: nnx.Module, *, overwrite: bool = False):
  """Saves every variable of ``model`` (weights, experts, routers) as an orbax checkpoint.

  Args:
    path: the checkpoint directory.
    model: the NNX module to save.
    overwrite: replace an existing checkpoint (else an existing ``path`` is an error).

  Returns:
    The checkpoint path (a :class:`pathlib.Path`), as returned by :func:`jaxmerge.io.orbax_io.save`.
  """
  from jaxmerge.io import orbax_io  # noqa: PLC0415

  return orbax_io.save(path, nnx.to_pure_dict(nnx.state(model)), overwrite=overwrite)


def load_state(path, like: nnx.Module) -> nnx.Module:
  """A copy of ``like`` (a model built the same way) with the variables saved at ``path``.

  Args:
    path: a checkpoint written by :func:`save_state`.
    like: a model of the same structure (left untouched).

  Returns:
    A new model with the saved variables.

  Raises:
    ValueError: the checkpoint's tree or shapes differ from ``like``'s (e.g. another number of experts).
  """
  from jaxmerge.io import orbax_io  # noqa: PLC0415

  saved = orbax_io.restore(path)
  graphdef, state = nnx.split(nnx.clone(like))
  want = {p: tuple(np.shape(x)) for p, x in jtree.flatten_paths(nnx.to_pure_dict(state)).items()}
  got = {p: tuple(np.shape(x)) for p, x in jtree.flatten_paths(saved).items()}
  if want != got:
    diff = sorted(p for p in set(want) | set(got) if want.get(p) != got.get(p))
    raise ValueError(f"checkpoint {path} does not match the model: {[(p, got.get(p), want.get(p)) for p in diff[:5]]}")
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, saved))
  return nnx.merge(graphdef, state)


def router_adapter(model: nnx.Module, apply_fn: Callable[..., Any]):
  """A :class:`jaxmerge.tta.Adapter` whose ``theta`` is ``model``'s :class:`RouterParam` state.

  Args:
    model: an upcycled model.
    apply_fn: ``apply_fn(model, frozen_extra, batch) -> out`` (e.g. logits of every task's batch).

  Returns:
    ``(adapter, frozen, rebuild)``: pass ``{"model": frozen, "extra": ...}`` as ``fit``'s frozen;
    ``rebuild(theta)`` returns the model with trained routers.

  References:
    Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts", ICML 2024.
    https://arxiv.org/abs/2402.00433
    (WEMoE's routers are trained by test-time adaptation).
  """
  from jaxmerge.tta import Adapter  # noqa: PLC0415

  graphdef, routers, rest = nnx.split(model, RouterParam, ...)

  def init(key, frozen):
    del key, frozen
    return routers

  def apply(theta, frozen, batch, *, key=None):
    del key
    return apply_fn(nnx.merge(graphdef, theta, frozen["model"]), frozen.get("extra"), batch)

  def rebuild(theta):
    return nnx.merge(graphdef, theta, rest)

  return Adapter(init, apply), rest, rebuild
