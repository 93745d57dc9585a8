"""Ahead-of-time planning: will a run fit a TPU slice, and with which settings (``python -m jaxunlearn.commands.plan``).

>>> from jaxunlearn.planning import parse_topology, plan_step, search
>>> plan = plan_step(config, parse_topology("v5e-16"))        # the run's own train and evaluation steps
>>> plan.fits, plan.train.total / 2**30, plan.flops_per_step
>>> search(config, parse_topology("v5e-16")).best.settings   # the cheapest setting that fits
"""

from jaxunlearn.planning.planner import HEADROOM, Memory, StepPlan, describe, plan_step
from jaxunlearn.planning.search import SearchResult, search
from jaxunlearn.planning.topology import Topology, TopologyError, parse_topology

__all__ = [
    "HEADROOM",
    "Memory",
    "SearchResult",
    "StepPlan",
    "Topology",
    "TopologyError",
    "describe",
    "parse_topology",
    "plan_step",
    "search",
]
