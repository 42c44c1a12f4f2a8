"""Terminal progress for generation: steps over all batches, with ETA (tqdm)."""

from __future__ import annotations

import sys


class ProgressBar:
    """A `GenerationState` callback drawing one tqdm bar per `Engine.generate` call."""

    def __init__(self, file=None, desc: str = "generating"):
        self.file = file or sys.stderr
        self.desc = desc
        self._bar = None
        self._state_id = None
        self._calls = 0

    def update(self, state) -> None:
        from tqdm.auto import tqdm

        if id(state) != self._state_id:  # a new generate() call
            self.close()
            self._state_id, self._calls = id(state), self._calls + 1
            desc = self.desc if self._calls == 1 else f"{self.desc} #{self._calls}"
            total = max(1, state.job_count * state.sampling_steps)
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="step",
                file=self.file,
                dynamic_ncols=True,
                # tqdm's own "remaining" assumes every step costs the same; hires fix's do not (state.eta)
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
            )
        done = state.job_no * state.sampling_steps + state.sampling_step
        self._bar.total = max(self._bar.total, state.job_count * state.sampling_steps)
        self._bar.update(max(0, done - self._bar.n))
        eta = state.eta()
        left = f", ETA {format_seconds(eta)}" if eta is not None else ""
        self._bar.set_postfix_str(f"batch {min(state.job_no + 1, state.job_count)}/{state.job_count}{left}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_seconds(seconds: float) -> str:
    """12s, 3:05, 1:02:03."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}" if minutes else f"{secs}s"
