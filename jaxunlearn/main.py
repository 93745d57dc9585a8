"""``python -m jaxunlearn.main``: the unlearning command (:mod:`jaxunlearn.commands.unlearn`), by its documented name."""

from jaxunlearn.commands.unlearn import run

if __name__ == "__main__":
    run()
