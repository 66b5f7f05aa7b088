"""The error kinds every command turns into one line on stderr and exit status 1
(``noah_ray.cli.error_line``; :class:`Interrupted`: 128 + the signal); no other module needs to be
imported to raise or catch them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


class RunError(RuntimeError):
    """A stage stopped for a cause outside the config (data endpoint, corrupt file, ...); the message
    names the first error, and running the same command again after fixing it resumes."""


class Interrupted(RunError):
    """The command got SIGINT or SIGTERM (``signum``): the stage stopped; what finished is saved
    (under ``saved``), and the same command resumes.  The command exits ``128 + signum`` (130, 143)."""

    def __init__(self, signum: int, stage: str = "", saved: str = "") -> None:
        import signal

        self.signum, self.stage, self.saved = signum, stage, saved
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"interrupted by {name}" + (f" during the {stage} stage" if stage else "")
                         + "; what finished" + (f" (checkpoints, scored candidates, tables) is saved under {saved}"
                                                if saved else " is saved") + "; resume with")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
