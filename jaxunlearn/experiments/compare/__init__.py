"""The paper's experiment: all seven methods, each with a small learning-rate sweep, on one world.

The config supplies everything but the method and learning rate (world, data, evaluation, training); each
variant starts from its own config file's defaults for the same preset, with the command line's overrides
applied on top. Every run is an ordinary resumable run in ``<workdir>/<variant>/lr-<lr>`` (finished runs are
reused). Writes ``compare.md``, ``compare.json`` and ``compare.png`` to the workdir.

``--world_seeds`` (or ``--world-seeds``) repeats the whole comparison on built-in worlds of those seeds
(``config.world.seed``: other forget/retain documents, another tokenizer, other initialisations; each world built
once and cached), in ``<workdir>/seed-<s>/``, and reports every number as mean +- sd across the worlds. Each method
keeps one learning rate for all of them (the one with the lowest mean score), and the comparison counts on how
many worlds each method is the best.

Selection: the best learning rate of a method, and the best method, minimise the *distance to the oracle*
``|ln(forget ppl / oracle forget ppl)| + |Min-K% AUC - oracle AUC| + max(0, ln(retain ppl / original))
+ max(0, ln(general ppl / original))`` (Min-K% with k = 0.4); without an oracle, the forget perplexity is
compared with the approximate split's instead.
"""

from jaxunlearn.experiments.compare.rendering import COLUMNS, columns
from jaxunlearn.experiments.compare.scoring import (
    AUC_ATTACK,
    RELEARN_PREFIXES,
    attack_columns,
    attack_measurements,
    benchmark_columns,
    summarise,
    targets,
)
from jaxunlearn.experiments.compare.variants import VARIANTS, command_line_overrides, variant_config
from jaxunlearn.experiments.compare.worlds import (
    across_worlds,
    compare_world,
    run_comparison,
    world_result,
    write_outputs,
)

__all__ = [
    "AUC_ATTACK",
    "COLUMNS",
    "RELEARN_PREFIXES",
    "VARIANTS",
    "across_worlds",
    "attack_columns",
    "attack_measurements",
    "benchmark_columns",
    "columns",
    "command_line_overrides",
    "compare_world",
    "run_comparison",
    "summarise",
    "targets",
    "variant_config",
    "world_result",
    "write_outputs",
]
