"""Unlearning methods: one short pure loss function each, registered by name (:mod:`~jaxunlearn.methods.registry`).


Every objective has the signature ``(params, ref_params, batch, rng, ctx) -> (loss, metrics)``:

* ``params``: the trainable parameters; ``ref_params``: the frozen original model (``None`` unless the method's
  :class:`Needs` say ``reference``);
* ``batch``: ``{"forget": split, "retain": split}`` where a split is ``{"tokens", "mask", "chunk_id"}`` with
  ``[batch, length]`` right-padded arrays (``retain`` only when the :class:`Needs` say ``retain``);
* ``rng``: a per-step PRNG key; ``ctx``: the model functions, the method's hyper-parameters and run constants.

A method declares what it reads as a function of its hyper-parameters (``register(..., needs=...)``): e.g. NPO
reads retain chunks only with ``retain_weight > 0``. Data preparation, the train step and the compute
accounting all follow that one answer, so a term is never silently dropped for lack of data.

Normalisation follows the official code: a *per-sequence token mean* of the per-token quantity over the
sequence's valid positions, then the *mean over sequences that have a target* (a chunk with nothing to score
does not count as a zero); padding never counts. The loss is minimised, so ascent terms enter with a minus
sign. Adding a method means adding one function to a family module (or a new module imported below) and one config
file.
"""

# Importing a family module registers its methods, in this order.
from jaxunlearn.methods import paper  # noqa: F401  # isort: skip
from jaxunlearn.methods import beyond  # noqa: F401  # isort: skip
from jaxunlearn.methods import rmu  # noqa: F401  # isort: skip
from jaxunlearn.methods import task_vector  # noqa: F401  # isort: skip
