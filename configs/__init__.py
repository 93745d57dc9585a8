"""The shipped configs, one file per method: installed as the package ``jaxunlearn.configs`` (see pyproject.toml),
so ``--config=ga_kl`` names ``configs/ga_kl.py`` from any directory; ``--config=configs/ga_kl.py`` works too."""
