"""Progress of long commands when the output is not a terminal: plain lines, no duplicates."""

from __future__ import annotations

import io

from worker.cli.progress import RunProgress


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_plain_progress_writes_periodic_lines_and_one_final_line() -> None:
    stream = io.StringIO()
    with RunProgress(description="verify", total=4, stream=stream, interval=3600) as progress:
        progress.update(1)  # the first update is shown at once
        progress.update(3)  # within the interval: not shown
    lines = _lines(stream)
    assert [line.split(",")[0] for line in lines] == ["verify: 1/4 (25.0%)", "verify: 3/4 (75.0%)"]


def test_the_final_line_is_not_repeated_when_the_last_update_showed_it() -> None:
    stream = io.StringIO()
    with RunProgress(description="reverify", total=2, stream=stream, interval=0) as progress:
        progress.update(1)
        progress.update(2)
    assert [line.split(",")[0] for line in _lines(stream)] == [
        "reverify: 1/2 (50.0%)",
        "reverify: 2/2 (100.0%)",
    ]


def test_a_resumed_run_counts_only_its_own_work_in_the_rate() -> None:
    stream = io.StringIO()
    progress = RunProgress(description="run", total=10, completed=8, stream=stream, interval=0)
    assert progress.rate == 0.0
    progress.update(9)
    progress.close()
    assert "9/10" in _lines(stream)[-1]
    assert progress.completed - progress.start_completed == 1
