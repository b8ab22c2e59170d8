"""The engine: how a merge runs. Merge steps (:class:`~jaxmerge.base.MergeTransform`) say what they compute; the
engine decides where and how.

- :mod:`~jaxmerge.engine.merge`: the entry points behind ``jm.merge``, ``jm.merge_per_task``, ``jm.make_merger``
  and ``jm.route`` (input validation, running the planned backend).
- :mod:`~jaxmerge.engine.planner`: the one planner: a chain normalized, then the fastest backend that can prove it
  runs the merge exactly (native, leaf, leaf_then_flat, flat, the whole-model program; mesh as a placement).
- :mod:`~jaxmerge.engine.xla`: the XLA programs of those backends.
- :mod:`~jaxmerge.engine.native`: the C kernels (CPU): global TIES, task arithmetic, averaging, DARE on them.
- :mod:`~jaxmerge.engine.mesh`: the sharded placement (inputs on a device mesh).
- :mod:`~jaxmerge.engine.stream`: the streamed placement (readers in, writers out, tensor by tensor).
- :mod:`~jaxmerge.engine.host`: host buffers and thread pools shared by the backends.

The engine imports the core (``tree``, ``stats``, ``base``, ``combine``, the method steps' math) and never the I/O,
model, evaluation or benchmark layers; nothing here is imported by a method. This package imports nothing itself,
so that importing one engine module does not import the others.
"""
