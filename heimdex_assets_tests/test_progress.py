"""The progress line: what it says (partitions, failures, scenes/s, ETA) and how often it is written,
redrawn on a terminal, plain lines in logs."""

import io
import re

import pytest

from heimdex_assets.progress import ProgressBar, duration, render


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (41.6, "42s"), (59.4, "59s"), (185, "3m05s"), (3720, "1h02m"), (-3, "0s")]
)
def test_duration(seconds, shown):
    assert duration(seconds) == shown


def test_a_line_says_partitions_rate_and_eta_from_the_scenes_done():
    line = render(10, 40, 20.0, failed=2, scenes=300, scenes_total=1200, label="videos")
    assert line == ("[######..................]  25%  10/40 partitions, 2 failed, 15 scenes/s, ETA 1m00s  videos")
    # Scenes all done, partitions left (owner assets after the videos): the partitions set the ETA.
    assert render(8, 10, 16.0, scenes=5, scenes_total=5).endswith("8/10 partitions, 0.3 scenes/s, ETA 4s")
    # Without scene counts the ETA follows the partitions; fast rates lose their decimals.
    assert render(30, 40, 30.0, scenes=9000).endswith("30/40 partitions, 300 scenes/s, ETA 10s")
    assert render(0, 40, 5.0, scenes=0, scenes_total=100).endswith("0/40 partitions, 0.0 scenes/s, ETA ?")
    assert render(1, 40, 1.0, scenes=3).endswith("1/40 partitions, 3.0 scenes/s, ETA 39s")
    assert render(40, 40, 125.0).endswith("40/40 partitions, done in 2m05s")
    # Within the first second, no rate and no ETA from a few milliseconds.
    assert render(1, 8, 0.001, scenes=300).endswith("1/8 partitions, ETA ?")
    assert render(0, 0, 0.0).startswith(f"[{'#' * 24}] 100%  0/0 partitions")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_on_a_terminal_one_line_is_redrawn_at_most_five_times_a_second():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(100, stream=stream, tty=True, clock=clock)
    for done in range(1, 51):  # 50 updates in one second: 5 drawn, plus the first
        clock.now = done * 0.02
        bar.update(done)
    drawn = stream.getvalue().split("\r")[1:]
    assert 5 <= len(drawn) <= 6 and "\n" not in stream.getvalue()
    bar.update(100)  # the end is always drawn
    bar.close()
    out = stream.getvalue()
    assert out.endswith("100/100 partitions, done in 1s\n") and out.count("\n") == 1
    # A shorter line is padded over the longer one it replaces.
    last, before = out.split("\r")[-1], out.split("\r")[-2]
    assert len(last.rstrip("\n")) >= len(before)


def test_in_a_log_a_plain_line_every_ten_seconds_or_ten_percent():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(1000, stream=stream, tty=False, clock=clock, plain_every_s=10)
    bar.update(0)
    for done in range(1, 1001):  # one partition every 50 ms: 50 s in all, a tenth every 5 s
        clock.now = done * 0.05
        bar.update(done, scenes=done * 3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [int(re.search(r"(\d+)%", line).group(1)) for line in lines] == list(range(0, 101, 10))
    assert lines[0].endswith("0/1000 partitions, ETA ?")
    assert lines[5].endswith("500/1000 partitions, 60 scenes/s, ETA 25s")
    assert lines[-1].endswith("1000/1000 partitions, 60 scenes/s, done in 50s")

    slow, clock = io.StringIO(), Clock()
    bar = ProgressBar(1000, stream=slow, tty=False, clock=clock, plain_every_s=10)
    for second in range(0, 35):  # 1 partition a second: a line every 10 s, not every update
        clock.now = float(second)
        bar.update(second)
    bar.close()
    assert [line.split("partitions")[0].split()[-1] for line in slow.getvalue().splitlines()] == [
        "0/1000",
        "10/1000",
        "20/1000",
        "30/1000",
        "34/1000",  # close() writes the last state once
    ]


def test_the_total_grows_when_it_becomes_known_and_close_writes_nothing_twice():
    stream, clock = io.StringIO(), Clock()
    bar = ProgressBar(4, stream=stream, tty=False, clock=clock)
    bar.update(2, total=8, failed=1)
    clock.now = 4.0
    bar.update(8, failed=1, total=6)  # never shrinks
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[######..................]  25%  2/8 partitions, 1 failed, ETA ?",
        "[########################] 100%  8/8 partitions, 1 failed, done in 4s",
    ]
