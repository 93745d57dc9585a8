"""The registered metrics, one module each (imported by :func:`jaxunlearn.evaluation.registry.registered`).

A module registers its compute function with :func:`~jaxunlearn.evaluation.registry.register_metric`, naming its
options (``config.evaluation.<name>.*``), its report section and, if any, its plot and cross-model finalizer.
"""
