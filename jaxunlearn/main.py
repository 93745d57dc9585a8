"""``python -m jaxunlearn.main`` and the ``jaxunlearn`` script: the unlearning command
(:mod:`jaxunlearn.commands.unlearn`), by its documented name.

Signals are handled before anything else is imported (:mod:`jaxunlearn.common.interrupts`): a Ctrl-C or SIGTERM
while JAX loads ends the command with one line and exit status 130, as one at any later moment does.
"""

import sys

from jaxunlearn.common import interrupts

interrupts.install()
try:
    from jaxunlearn.commands.unlearn import run
except KeyboardInterrupt as e:
    interrupts.announce_pending()
    print(f"jaxunlearn: error: {interrupts.exit_message(e)}", file=sys.stderr)
    raise SystemExit(130) from None

__all__ = ["run"]

if __name__ == "__main__":
    run()
