"""The throughput governor keeps speculation on exactly where the measured steps say it pays."""

from __future__ import annotations

from engine.spec_decode.governor import GovernorConfig, SpecGovernor


def _run(gov: SpecGovernor, steps: int, rate_on: float, rate_off: float, batch: int = 8) -> float:
    """Drive ``steps`` decisions with fixed rates (tokens/s); returns the share of steps speculating."""
    on = 0
    for _ in range(steps):
        speculate = gov.choose(batch)
        on += speculate
        gov.record(batch, speculate, tokens=100, seconds=100 / (rate_on if speculate else rate_off))
    return on / steps


def test_alternates_until_both_modes_are_measured():
    gov = SpecGovernor(GovernorConfig(min_samples=3))
    choices = []
    for _ in range(6):
        choices.append(gov.choose(4))
        gov.record(4, choices[-1], 10, 1.0)
    assert choices == [True, False, True, False, True, False]
    assert gov.preferred(4) is False  # equal rates: the margin keeps speculation off


def test_keeps_the_faster_mode_and_pays_only_exploration():
    cfg = GovernorConfig(explore_period=64, explore_steps=2)
    faster = SpecGovernor(cfg)
    share_on = _run(faster, 1000, rate_on=2000.0, rate_off=1000.0)
    assert share_on > 0.95 and faster.preferred(8) is True
    slower = SpecGovernor(cfg)
    share_on = _run(slower, 1000, rate_on=600.0, rate_off=1000.0)
    assert share_on < 0.05 and slower.preferred(8) is False


def test_follows_a_change_of_workload():
    gov = SpecGovernor(GovernorConfig(explore_period=16, explore_steps=2))
    _run(gov, 200, rate_on=2000.0, rate_off=1000.0)
    assert gov.preferred(8) is True
    _run(gov, 400, rate_on=500.0, rate_off=1000.0)  # drafts stopped paying
    assert gov.preferred(8) is False


def test_batch_classes_are_independent():
    gov = SpecGovernor()
    _run(gov, 300, rate_on=2000.0, rate_off=1000.0, batch=1)
    _run(gov, 300, rate_on=500.0, rate_off=1000.0, batch=64)
    assert gov.preferred(1) is True and gov.preferred(64) is False
    assert gov.preferred(2) is None  # never measured
