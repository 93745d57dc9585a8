"""The built-in world's run: every path pointed at the world, and the hyper-parameters tuned for it (from the sweeps
of ``jaxunlearn-compare``, docs/builtin-world.md)."""

from __future__ import annotations

import ml_collections

from jaxunlearn.config.sources import split_config

# Learning rates for the built-in world, from the sweep of `jaxunlearn-compare`.
BUILTIN_LR = {
    **{"ga": 3e-5, "random_label": 3e-5, "adversarial": 3e-5, "ga_gd": 1e-3, "ga_kl": 3e-4},
    **{"simnpo": 3e-4, "wga": 1e-3, "satimp": 1e-3},  # beyond the paper: docs/builtin-world.md's sweeps
    **{"rmu": 1e-3, "undial": 3e-3, "ce_u": 9e-4, "task_vector": 3e-4},
}
# Hyper-parameters set for the built-in world: SimNPO's margin gamma = beta x 5.5 nats, the best of 5.0-6.5 in the
# sweep in docs/builtin-world.md (the world's text is at 4-5 nats per token, where gamma 0 leaves a gradient weight of
# sigmoid(-beta NLL) ~ 1e-8: nothing would be unlearned).
BUILTIN_HPARAMS = {
    "simnpo": {"gamma": 24.75},
    # RMU on the world's 4-layer model: steer the residual stream after layer 2 (width 128, norm ~15 there) and
    # train every parameter of layers 0-2 (the official recipe's three layers ending at the steered one; their MLP
    # down-projections alone barely move the model here). Its forget term keeps weight 1 and the retain weight
    # (alpha) is 10: at the official 100 nothing moves (the forget and retain text are the same kind of code), at 1
    # the retain perplexity explodes (docs/builtin-world.md).
    "rmu": {
        "layer": 2,
        "trainable_params": r"model\.layers\.[0-2]\..*",
        "forget_weight": 1.0,
        "retain_weight": 10.0,
    },
    # UNDIAL and CE-U with the retain NLL term (weight 1, as GA+GD): without it the retain perplexity rises with
    # the forget perplexity and the membership AUC does not move (docs/builtin-world.md).
    "undial": {"retain_weight": 1.0},
    "ce_u": {"retain_weight": 1.0},
}
# Ascent weight of the GA+GD / GA+KL forget term in the built-in world (the paper's 1.0 overshoots at once).
BUILTIN_FORGET_WEIGHT = 0.15


def use_builtin_world(c: ml_collections.ConfigDict, method: str, retain: str) -> None:
    """Point every path at the built-in world and size the run for a 2-core CPU."""
    c.model.path = "world:target"
    c.model.dtype = "float32"  # small models on CPUs run faster in fp32
    d = c.data
    d.max_length = c.world.max_length
    d.add_special_tokens = False
    d.forget = split_config("world:forget")
    # In-distribution retain data of the built-in world = every pre-training document but the forget set (the
    # oracle's training data); "general" = the general-domain part only.
    d.retain = split_config("world:general_retain" if retain == "general" else "world:retain+general_retain")
    d.approximate = split_config("world:approximate")
    d.general = split_config("world:general_eval")
    d.eval_retain = split_config("world:retain")
    c.optim.lr = BUILTIN_LR.get(method, 1e-4)
    if "forget_weight" in c.method:
        c.method.forget_weight = BUILTIN_FORGET_WEIGHT
    c.method.update(BUILTIN_HPARAMS.get(method, {}))
    c.train.micro_batch_size = 8
    c.train.grad_accum_steps = 1
    c.train.epochs = 4
    c.checkpoint.every_steps = 25
    e = c.evaluation
    e.oracle_model = "world:oracle"
    e.batch_size = 32
    e.max_chunks = 512
    e.every_steps = 10  # perplexity history of every split
    e.stop_every_steps = 2  # the stopping rule, on the forget split
    e.in_run_max_chunks = 32
    e.stop_approx_multiple = 1.0  # stop when forget text looks as unseen as unseen text
    e.verbatim.max_chunks = 64
    # The relearning attack: 50 steps at 3e-4 (1e-3 already damages the original model itself).
    e.relearning.update(lr=3e-4, steps=50, every=5)
    e.pretraining_tokens = float(c.world.steps * c.world.batch_size * c.world.max_length)
