"""Models: a pure-JAX CLIP (`jaxmerge.models.clip`)."""
