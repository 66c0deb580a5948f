"""Where the time of a KV transfer goes, for benchmarks/kv_transfer_bench.py: wall-clock stamps at
points inside the transport (methods wrapped in place) for a few transfers, calls into torch counted
for a few others, and how both are summarised and printed.
"""

from __future__ import annotations

import statistics
import time


class Tracer:
    """Wall-clock stamps of a few transfers at points inside the transport (methods wrapped in place),
    and call counts of a few others.

    Only handles in ``handle_ids`` are stamped and only those in ``counted_ids`` counted, so the timed
    transfers run unwrapped code paths but for one set lookup per call.
    """

    def __init__(self, handle_ids: set[str], counted_ids: set[str]) -> None:
        self.handle_ids = handle_ids
        self.counted_ids = counted_ids
        self.events: list[tuple[str, str, float]] = []
        self.counters: dict[str, object] = {}  # handle id -> CallCounter
        self.current: str | None = None  # the handle whose piece the sender is posting
        self._seen: dict[tuple[str, str], int] = {}

    def mark(self, handle_id: str, label: str, numbered: bool = False) -> None:
        if handle_id in self.handle_ids:
            if numbered:
                index = self._seen[handle_id, label] = self._seen.get((handle_id, label), -1) + 1
                label = f"{label} {index}"
            self.events.append((handle_id, label, time.time()))
        counter = self.counters.get(handle_id)
        if counter is not None and counter.active:
            counter.mark(label)

    def wrap(self, owner, name: str, key, before: str | None, after, numbered: bool = False) -> None:
        """Stamp ``before`` on entry and ``after`` (a label, or a function of the arguments) on exit."""
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            handle_id = key(*args)
            if before:
                self.mark(handle_id, before)
            result = original(*args, **kwargs)
            if after:
                self.mark(handle_id, after if isinstance(after, str) else after(*args), numbered)
            return result

        setattr(owner, name, wrapped)

    def count_calls(self, handle_id: str):
        """Start counting this thread's calls into torch for ``handle_id`` (if it is a counted one)."""
        from kv_transfer.call_count import CallCounter

        if handle_id not in self.counted_ids:
            return None
        counter = self.counters[handle_id] = CallCounter().start()
        return counter

    def install_sender(self) -> None:
        from kv_transfer.dist_sender import DistKVSender
        from kv_transfer.sender_link import SenderConnection

        original_post, original_send = DistKVSender.post_piece, DistKVSender.send

        def post_piece(sender, job, *args):
            self.current = handle_id = job.outgoing.handle.handle_id
            self.mark(handle_id, "posting")
            try:
                return original_post(sender, job, *args)
            finally:
                self.mark(handle_id, "all posted")
                self.current = None

        def send(sender, handle, *args, **kwargs):
            counter = self.count_calls(handle.handle_id)
            try:
                return original_send(sender, handle, *args, **kwargs)
            finally:
                if counter is not None:
                    counter.stop()

        DistKVSender.post_piece, DistKVSender.send = post_piece, send
        self.wrap(SenderConnection, "send_header", lambda _, h, *a: h.handle_id, None, "header out")
        self.wrap(SenderConnection, "post_messages", lambda *a, **k: self.current, None, "send posted")
        self.wrap(DistKVSender, "settle", lambda _, o, *a: o.handle.handle_id, "sender settles", None)

    def install_receiver(self) -> None:
        from kv_transfer.dist_receiver import _Connection
        from kv_transfer.reservations import ReservationTable

        original_receive, original_finish = _Connection._receive_piece, ReservationTable.finish

        def receive_piece(connection, header):
            self.count_calls(header.handle_id)
            self.mark(header.handle_id, "header in")
            return original_receive(connection, header)

        def finish(table, done, *args, **kwargs):
            try:
                return original_finish(table, done, *args, **kwargs)
            finally:
                self.mark(done.handle_id, "receiver SUCCESS")
                counter = self.counters.get(done.handle_id)
                if counter is not None:
                    counter.stop()

        _Connection._receive_piece, ReservationTable.finish = receive_piece, finish
        ticket_key = lambda _, t, *a: t.handle_id  # noqa: E731
        self.wrap(
            _Connection, "_post_receives", lambda _, b, h, *a, **k: h.handle_id, None, "receives posted",
            numbered=True,
        )
        self.wrap(ReservationTable, "accept_header", lambda _, h, *a, **k: h.handle_id, None, "header ok")
        self.wrap(_Connection, "_wait", lambda _, w, h, d: h.handle_id, None, "message in", numbered=True)
        self.wrap(
            ReservationTable, "land_blocks", ticket_key, None, lambda _, t, lo, hi: f"blocks {hi} issued"
        )
        self.wrap(ReservationTable, "complete_piece", ticket_key, None, "piece landed")


def counts_by_group(plan: list[dict], handles: list, tracer: Tracer, role: str) -> dict:
    """Per ``count-*`` group, where the calls into torch went in its last transfer."""
    out, first = {}, 0
    for config in plan:
        first += config["count"]
        counter = tracer.counters.get(handles[first - 1].handle_id)
        if config["name"].startswith("count-") and counter is not None:
            out[config["name"]] = _count_summary(role, counter)
    return out


def _count_summary(role: str, counter) -> dict:
    """Calls on the critical path: before bytes can move, and (receiver) after the last message arrived."""
    polls = counter.calls.count("_distributed_c10d.is_completed")  # the receiver's waits, a varying number
    out = {"first_post_after": counter.first(), "total": len(counter.calls), "completion_polls": polls}
    if role == "sender":
        out["header_out_after"] = counter.at("header out")
    else:
        last_message = counter.at("message in", last=True)
        success = counter.at("receiver SUCCESS")
        if last_message is not None and success is not None:
            out["after_last_message"] = success - last_message
    out["by_name"] = counter.summary()
    return out


def tracer_for(plan: list[dict], handles: list) -> Tracer:
    """Stamps for the ``trace`` group's transfers, call counts for the ``count-*`` groups'."""
    traced, counted, first = set(), set(), 0
    for config in plan:
        ids = {h.handle_id for h in handles[first : first + config["count"]]}
        first += config["count"]
        if config["name"].startswith("trace"):
            traced |= ids
        elif config["name"].startswith("count-"):
            counted |= ids
    return Tracer(traced, counted)


def timeline(events: list, origin_label: str) -> dict:
    """Median microseconds from ``origin_label`` to each traced point (first occurrence per transfer).

    "send": the transfers sent cold (no "kv ready" mark); "kv ready": those sent behind a stand-in step.
    """
    by_handle: dict[str, dict[str, float]] = {}
    for handle_id, label, at in events:
        by_handle.setdefault(handle_id, {}).setdefault(label, at)
    offsets: dict[str, list[float]] = {}
    for points in by_handle.values():
        origin = points.get(origin_label)
        if origin is None or (origin_label == "send" and "kv ready" in points):
            continue
        for label, at in points.items():
            offsets.setdefault(label, []).append((at - origin) * 1e6)
    return dict(sorted(((k, statistics.median(v)) for k, v in offsets.items()), key=lambda kv: kv[1]))


def print_counts(calls: dict) -> None:
    """Calls into torch on the critical path of the last counted transfer of each pattern."""
    for role in ("sender", "receiver"):
        for group, count in calls[role].items():
            if role == "sender":
                where = (
                    f"{count['header_out_after']} before the header left, {count['first_post_after']} before "
                    f"the first send, {count['total']} in send()"
                )
            else:
                where = (
                    f"{count['first_post_after']} before the first receive, {count.get('after_last_message')} "
                    f"after the last message arrived, {count['total']} per piece "
                    f"({count['completion_polls']} completion polls)"
                )
            print(f"torch calls, {role}, {group}: {where}")
