"""How a training run stops on SIGINT (Ctrl-C) or SIGTERM: between two steps, with a checkpoint.

`train.run_loop` trains inside `stop_at_step_boundary`; a signal only sets a flag, the step that
is running finishes, the run saves, and `Interrupted` is raised (`train.main` exits with 130 or
143). A checkpoint is thus always a state between two steps, and `--resume` continues exactly.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from ..checks import check_instance


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after finishing its step and saving: resume it with --resume."""

    def __init__(self, signum, step, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: saved {checkpoint}; continue with --resume {checkpoint}")


@contextlib.contextmanager
def stop_at_step_boundary(requested):
    """While inside, SIGINT and SIGTERM only note their number in `requested`: the loop stops between steps.

    A checkpoint is only ever a state between two steps, so the resumed run is exact: the step
    that was running when the signal came is finished, saved, and not drawn again. A second
    signal interrupts at once (the handlers are back to the previous ones); the last checkpoint
    then still resumes exactly, from its own step. Outside the main thread (a worker of a
    process pool's thread, say) signals cannot be caught, and nothing changes.
    """
    check_instance("requested", requested, list, "a list (the signals caught are appended to it)")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def note(signum, frame):
        requested.append(signum)
        for number, handler in previous.items():
            signal.signal(number, handler)

    for signum in previous:
        signal.signal(signum, note)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
