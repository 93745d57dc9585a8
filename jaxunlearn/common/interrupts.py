"""SIGINT and SIGTERM (Ctrl-C, preemption, ``scancel``, ``kill``) from start-up to exit: never lost, never a traceback.

The commands call :func:`install` before anything else (before importing JAX). From then on, a signal:

- is logged at once, in one line, by a watcher thread (Python's C-level handler writes the signal to a wake-up pipe),
  even while the main thread is inside a long XLA call that Python-level handlers must wait for;
- is recorded (:func:`received`): a command that would have ended with status 0 ends with 130;
- outside :func:`deferred` (start-up, loading, evaluation, export), raises :class:`Interrupted` (a
  ``KeyboardInterrupt``) in the main thread at once. Where Python would swallow the raise (in a garbage collector
  callback such as JAX's ``_xla_gc_callback``, or a ``__del__``: "Exception ignored ... KeyboardInterrupt"), the
  watcher raises it again a moment later, once the main thread is out of there (``sys.unraisablehook`` catches the
  other such places), and :func:`check` at the phases of a run catches one that a library's bare ``except`` ate;
- inside :func:`deferred` (the step loop: a step and its checkpoint), is only recorded: the training hooks look at
  :func:`received` after each step, checkpoint it and stop; a signal still pending when the block ends is raised.

Used as a library (a notebook calling ``unlearn``) nothing is installed: :func:`deferred` then catches the two
signals only for its duration, as training always did. A leaf: the standard library only.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Fault injection for the tests: "SIGTERM@load" sends this process SIGTERM when the run reaches the phase "load"
# (see :func:`fault_point`); "SIGINT@gc:load" sends it from inside a garbage collector callback there;
# "SIGINT@import:jax" when the module jax starts being imported.
FAULT_ENV = "JAXUNLEARN_FAULT_SIGNAL"


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (resumable: rerun the same command)."""

    def __init__(self, signum: int, message: str | None = None):
        global _raised
        super().__init__(message or f"interrupted by {name(signum)}: rerun to resume")
        self.signum = signum
        _raised = True  # the run is stopping: a later signal is only recorded and logged


_lock = threading.RLock()
_installed = False
_first: int | None = None  # the first signal received
_deferring: list[str] = []  # deferred() blocks, innermost last: what a signal waits for
_raised = False  # an Interrupted was raised in the main thread (only once: the run is stopping)
_events = 0  # real signals seen by the watcher
_announced = 0  # of them, logged
_redelivered = 0  # wake-up bytes of our own re-deliveries, not new signals
_wakeup = -1  # the wake-up pipe's write end: a 0 byte asks the watcher to deliver the signal again
_REDELIVER = 0


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def received() -> int | None:
    """The first SIGINT or SIGTERM received (None: none)."""
    return _first


def install() -> None:
    """Handle SIGINT and SIGTERM as the module docstring says, for the rest of the process (idempotent; in the main
    thread only, as Python requires)."""
    global _installed, _wakeup
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    read, _wakeup = os.pipe()
    os.set_blocking(_wakeup, False)
    for s in SIGNALS:
        signal.signal(s, _handler)
    signal.set_wakeup_fd(_wakeup, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read,), name="jaxunlearn-signals", daemon=True).start()
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _unraisable(unraisable, previous)
    os.register_at_fork(after_in_child=_forked)
    _installed = True
    _fault_on_import()


def rearm() -> None:
    """Take the two signals back after a library installed its own handler for them in C (jax.distributed's
    preemption notifier takes SIGTERM); Python's ``signal.getsignal`` does not see that."""
    if _installed and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


def _record(signum: int) -> None:
    global _first
    if _first is None:
        _first = signum


def _handler(signum: int, frame: Any) -> None:
    """The Python-level handler (main thread, between bytecodes)."""
    _record(signum)
    if _deferring or _raised:
        return
    if _swallowing(frame):  # Python would print "Exception ignored" and go on: raise it a moment later
        _ask_redelivery()
        return
    raise Interrupted(signum)


def _swallowing(frame: Any) -> bool:
    """Whether an exception raised in ``frame`` is lost: in a garbage collector callback (JAX's
    ``_xla_gc_callback``), a ``__del__``, or the unraisable hook. Others are caught by :func:`_unraisable`."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if code in callbacks or code.co_name == "__del__" or code is _unraisable.__code__:
            return True
        frame = frame.f_back
    return False


def _ask_redelivery() -> None:
    with contextlib.suppress(OSError):
        os.write(_wakeup, bytes([_REDELIVER]))


def _unraisable(unraisable: Any, previous: Any) -> None:
    """An :class:`Interrupted` raised where Python cannot propagate it (a weakref callback, ...): raise it again
    a moment later, without a word."""
    global _raised
    if isinstance(unraisable.exc_value, Interrupted):
        _raised = False
        _ask_redelivery()
        return
    previous(unraisable)


def _redeliver() -> None:
    """The watcher: run the main thread's handler again (it raises there unless it is still in a callback)."""
    global _redelivered
    import _thread

    time.sleep(0.005)  # let the main thread leave the callback
    with _lock:
        _redelivered += 1  # interrupt_main writes a wake-up byte too: not a new signal
    _thread.interrupt_main(_first or signal.SIGINT)


def _watch(read: int) -> None:
    """The watcher thread: log each signal as it arrives."""
    global _events, _announced, _redelivered
    while True:
        try:
            data = os.read(read, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum == _REDELIVER:
                _redeliver()
                continue
            if signum not in SIGNALS:
                continue
            with _lock:
                if _redelivered:
                    _redelivered -= 1
                    continue
                _record(signum)
                _events += 1
                announce = _events > _announced
                _announced = max(_announced, _events)
                count = _events
            if announce:
                _log(_announcement(signum, count))


def _announcement(signum: int, count: int) -> str:
    if count > 1:
        return f"{name(signum)} received again: already stopping"
    waiting = [until for until in _deferring if until]
    return f"{name(signum)} received: stopping{f' {waiting[-1]}' if waiting else ''}"


def announce_pending() -> None:
    """Log a received signal that the watcher has not logged yet (the process is about to exit)."""
    global _announced
    with _lock:
        pending = _first is not None and _announced == 0
        if pending:
            _announced = 1
    if pending:
        _log(_announcement(_first, 1))


def _log(text: str) -> None:
    log = logging.getLogger("jaxunlearn")
    if log.handlers:  # the run's logging: stderr and log.txt
        log.warning(text)
    else:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"jaxunlearn: {text}\n")
            sys.stderr.flush()


def _forked() -> None:
    """A forked child (a data loader's worker) keeps Python's default behaviour and never writes to our pipe."""
    global _installed, _wakeup
    _wakeup = -1
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _installed = False


def exit_message(error: BaseException | None = None) -> str:
    """A command's last line for an interruption (after ``jaxunlearn: error: ``)."""
    if isinstance(error, Interrupted):
        return str(error)
    if _first is not None:
        return f"interrupted by {name(_first)}: rerun to resume"
    return f"interrupted{f' ({error})' if error is not None and str(error) else ''}: rerun to resume"


def hold() -> None:
    """From now on a signal is only recorded (a command's exit: its status is being decided)."""
    global _raised
    _raised = True


def check() -> None:
    """Raise :class:`Interrupted` for a signal received and not delivered (at the phases of a run; after
    :func:`install` only: a library's caller owns its signals)."""
    if _installed and _first is not None and not _deferring:
        raise Interrupted(_first)


@contextlib.contextmanager
def deferred(until: str = "", *, deliver: bool = True) -> Iterator[None]:
    """Inside, a signal is only recorded (:func:`received`) and logged as "stopping ``until``"; with ``deliver``,
    one received by the end of the block is raised when it ends without another exception (without ``deliver``,
    the command's exit delivers it: cleanup that must finish). Without :func:`install` (library use), the signals
    are caught for the block's duration only, and a block without ``deliver`` changes nothing."""
    global _first
    if not _installed and not deliver:
        yield
        return
    rearm()
    temporary: dict[int, Any] = {}
    if not _installed and not _deferring and threading.current_thread() is threading.main_thread():
        _first = None  # a fresh record: nothing else catches the signals outside this block
        temporary = {s: signal.signal(s, lambda signum, _frame: _record(signum)) for s in SIGNALS}
    _deferring.append(until)
    try:
        yield
    finally:
        _deferring.pop()
        for s, handler in temporary.items():
            signal.signal(s, handler)
    if deliver and not _deferring and _first is not None:
        raise Interrupted(_first)


def fault_point(phase: str) -> None:
    """Tests only (:data:`FAULT_ENV`): send this process the named signal at ``phase``."""
    spec = os.environ.get(FAULT_ENV, "")
    signame, _, at = spec.partition("@")
    if not spec or at not in (phase, f"gc:{phase}"):
        return
    signum = signal.Signals[signame]
    if at == phase:
        _send(signum)
        return

    def inside_gc(_phase: str, _info: dict) -> None:  # as in JAX's _xla_gc_callback
        if inside_gc in gc.callbacks:
            _send(signum)  # the handler runs in there, inside the callback
            gc.callbacks.remove(inside_gc)

    gc.callbacks.append(inside_gc)
    gc.collect()


def _send(signum: int) -> None:
    """Send this process ``signum`` and run Python code until its handler has run (here, in this frame)."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5.0
    while _first is None and time.monotonic() < deadline:
        pass
    for _ in range(1000):
        pass


def _fault_on_import() -> None:
    """``SIGx@import:MODULE`` (:data:`FAULT_ENV`): send the signal when MODULE starts being imported."""
    spec = os.environ.get(FAULT_ENV, "")
    signame, _, at = spec.partition("@")
    if not at.startswith("import:"):
        return
    module = at.removeprefix("import:")

    class Finder:
        @staticmethod
        def find_spec(fullname: str, *_args: Any) -> None:
            if fullname == module and Finder in sys.meta_path:
                sys.meta_path.remove(Finder)
                _send(signal.Signals[signame])  # the handler raises here, in the middle of the import

    sys.meta_path.insert(0, Finder)
