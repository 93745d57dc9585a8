"""Commands: ``jaxunlearn`` (unlearn), ``jaxunlearn-evaluate``, ``jaxunlearn-plan``, ``jaxunlearn-compare``."""
