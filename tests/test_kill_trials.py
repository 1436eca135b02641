"""Random kill trials (:mod:`tests.kill_trials`): ``medseg segment`` killed with SIGKILL in each phase
of its run (some runs killed twice in a row), then resumed, gives exactly the outputs of an
uninterrupted run, with no temporary, partial file or stale lock. The README reports a 20-trial run
of ``python -m tests.kill_trials``; this test runs 6 of the same trials (about 2-3 minutes)."""

from __future__ import annotations

import pytest

from tests.kill_trials import PHASES, run_trials


@pytest.mark.slow
def test_random_kills_resume_to_identical_outputs(tmp_path):
    lines: list[str] = []
    trials = run_trials(6, seed=0, workdir=tmp_path, report=lines.append)
    table = "\n".join(lines)
    assert all(trial.ok for trial in trials), table
    assert lines[-1] == "6 of 6 resumed with identical outputs", table
    assert {trial.kills[0].phase for trial in trials} == set(PHASES)
    assert sum(len(trial.kills) == 2 for trial in trials) == 2
    killed = sum(any(kill.hit != "ended before the kill" for kill in trial.kills) for trial in trials)
    assert killed >= len(trials) // 2, table  # most trials really were interrupted
