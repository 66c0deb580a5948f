"""The throughput governor keeps speculation on exactly where the measured steps say it pays."""

from __future__ import annotations

from types import SimpleNamespace

from engine.spec_decode.decoder import SpecDecoder
from engine.spec_decode.governor import GovernorConfig, SpecGovernor
from engine.spec_decode.ngram import NgramProposer


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


def _sched(remaining: list[int], waiting: int = 0, max_num_seqs: int = 8) -> SimpleNamespace:
    """What ``SpecDecoder`` reads of a scheduler: running requests' progress, the queue, the seat limit."""
    running = [SimpleNamespace(num_tokens=100, num_computed_tokens=100 - r) for r in remaining]
    return SimpleNamespace(
        running=running, waiting=[object()] * waiting, config=SimpleNamespace(max_num_seqs=max_num_seqs)
    )


def test_only_decode_only_steps_explore():
    dec = SpecDecoder(NgramProposer())
    # A step that will run a prompt chunk: no decision is made or recorded, and before the class
    # has settled on speculation, no drafts.
    for sched in (_sched([1, 37]), _sched([1, 1], waiting=1)):
        assert dec._speculates(sched) is False and dec._mode is None
    assert dec.governor.preferred(2) is None
    # Waiting requests that cannot be seated leave the step decode-only.
    assert dec._speculates(_sched([1, 1], waiting=3, max_num_seqs=2)) is True
    assert dec._mode == (2, True)
    # Once the class prefers speculation, steps with prompt chunks follow it (without exploring).
    for _ in range(20):
        speculate = dec.governor.choose(2)
        dec.governor.record(2, speculate, tokens=10, seconds=0.5 if speculate else 1.0)
    dec._mode = None
    assert dec._speculates(_sched([1, 37])) is True and dec._mode is None
