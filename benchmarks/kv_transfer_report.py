"""The KV transfer bench's report: medians per configuration, the headline row and the printed table.

Used by ``kv_transfer_bench.py`` (which runs the transfers); kept apart so that file holds the runs.
"""

from __future__ import annotations

import statistics
import sys

import kv_transfer_trace as trace  # this folder: the script's own (sys.path[0])

MiB = 1 << 20


def default_mib() -> int:
    from kv_transfer.dist_sender import DEFAULT_MAX_MESSAGE_BYTES

    return DEFAULT_MAX_MESSAGE_BYTES // MiB


def summarize(args, sent: dict, received: dict) -> dict:
    import torch

    raw_by_size = {r["bytes"]: r for r in sent["raw"]}
    payload = args.num_blocks * 2 * args.num_layers * args.block_size * args.num_kv_heads * args.head_dim * 2
    raw_same = raw_by_size.get(payload)
    rows, first = [], 0
    for result in sent["ours"]:
        begin, first = first, first + result["count"]
        if result["name"].startswith(("trace", "count-")):
            continue
        # Same host, one wall clock: send() on the sender to SUCCESS seen on the receiver.
        receiver_s = [
            received["success_at"][i] - sent["started_at"][i] for i in range(begin + args.warmup, first)
        ]
        row = {
            "group": result["name"],
            "message_mib": result["mib"],
            "pattern": result["pattern"],
            "completion": result["how"],
            "payload_bytes": payload,
            "receiver_median_s": statistics.median(receiver_s),
            "sender_median_s": statistics.median(result["sender_s"]),
            "receiver_s": receiver_s,
            "sender_s": result["sender_s"],
        }
        for side in ("receiver", "sender"):
            seconds = row[f"{side}_median_s"]
            row[f"{side}_gb_per_s"] = payload / seconds / 1e9
            row[f"{side}_ratio_to_raw"] = raw_same["median_s"] / seconds if raw_same else None
        rows.append(row)
    matches = [
        got == result["fingerprint"]
        for got, result in zip(received["fingerprints"], sent["ours"], strict=True)
    ]
    report = {
        "device": torch.cuda.get_device_name(0) if args.backend == "nccl" else "cpu (gloo rehearsal)",
        "backend": args.backend,
        "torch": torch.__version__,
        "command": "python benchmarks/kv_transfer_bench.py " + " ".join(sys.argv[1:]),
        "shape": {
            k: getattr(args, k)
            for k in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_blocks")
        },
        "raw_nccl": sent["raw"],
        "ours": rows,
        "copy_ceilings": sent["ceilings"],
        "trace_median_us": trace.timeline(sent["trace"] + received["trace"], "send"),
        "trace_behind_median_us": trace.timeline(sent["trace"] + received["trace"], "kv ready"),
        "torch_calls": {"sender": sent["counts"], "receiver": received["counts"]},
        "receiver_states": received["receiver_states"],
        "data_matches": all(matches),
    }
    report["headline"] = _headline(rows, raw_same)
    return report


def _headline(rows: list[dict], raw_same: dict | None) -> dict | None:
    """send() -> receiver SUCCESS at the default message size with contiguous ids, against raw NCCL."""
    message_mib = default_mib()
    waited = [
        r for r in rows
        if r["pattern"] == "contiguous" and r["completion"] == "wait" and not r["group"].startswith("behind-compute")
    ]
    row = next((r for r in waited if r["message_mib"] == message_mib), waited[0] if waited else None)
    if row is None:
        return None
    behind = next((r for r in rows if r["group"] == "behind-compute"), None)
    return {
        "behind_compute_median_s": behind["receiver_median_s"] if behind else None,
        "behind_compute_ratio_to_raw": behind["receiver_ratio_to_raw"] if behind else None,
        "group": row["group"],
        "payload_bytes": row["payload_bytes"],
        "message_mib": row["message_mib"],
        "receiver_median_s": row["receiver_median_s"],
        "raw_median_s": raw_same["median_s"] if raw_same else None,
        "ratio_to_raw": row["receiver_ratio_to_raw"],
        "goal_ratio": 0.80,
    }


def print_table(args, report: dict) -> None:
    print(f"\n{report['device']}, torch {report['torch']}; receiver states {report['receiver_states']};")
    print(f"data matches: {report['data_matches']}; command: {report['command']}")
    ceilings = report["copy_ceilings"]
    print(
        "copies of {:.0f} MiB on the sender: plain {:.3f} ms; gather contiguous {:.3f} ms, scattered {:.3f} ms;"
        " index_select contiguous {:.3f} ms, scattered {:.3f} ms".format(
            ceilings["bytes"] / MiB,
            *(
                ceilings[k] * 1e3
                for k in (
                    "plain_copy_s",
                    "gather_contiguous_s",
                    "gather_scattered_s",
                    "index_select_contiguous_s",
                    "index_select_scattered_s",
                )
            ),
        )
    )
    print("traced timeline (median us after send): " + ", ".join(
        f"{k} {v:.0f}" for k, v in report["trace_median_us"].items()
    ))  # fmt: skip
    print("traced timeline behind a stand-in step (median us after its end): " + ", ".join(
        f"{k} {v:.0f}" for k, v in report["trace_behind_median_us"].items()
    ))  # fmt: skip
    print(f"{'what':<40}{'bytes':>11}{'ms':>9}{'GB/s':>8}{'ratio':>7}{'sender ms':>11}{'ratio':>7}")
    for row in report["raw_nccl"]:
        what = f"raw {args.backend} send/recv"
        spread = f"  (before ours {row['median_before_s'] * 1e3:.3f} ms, after {row['median_after_s'] * 1e3:.3f} ms)"
        print(f"{what:<40}{row['bytes']:>11}{row['median_s'] * 1e3:>9.3f}{row['gb_per_s']:>8.1f}{spread}")
    for row in report["ours"]:
        what = f"ours, {row['pattern']}, {row['message_mib']} MiB msgs"
        what += ", polled" if row["completion"] == "poll" else ""
        what += ", behind compute" if row["group"].startswith("behind-compute") else ""

        def ratio(side: str, row=row) -> str:
            value = row[f"{side}_ratio_to_raw"]
            return f"{value:.2f}" if value else "-"

        print(
            f"{what:<40}{row['payload_bytes']:>11}{row['receiver_median_s'] * 1e3:>9.3f}"
            f"{row['receiver_gb_per_s']:>8.1f}{ratio('receiver'):>7}"
            f"{row['sender_median_s'] * 1e3:>11.3f}{ratio('sender'):>7}"
        )
    print(
        "ms/ratio: send() -> receiver SUCCESS; sender ms/ratio: send() -> sender SUCCESS; ratio = raw / ours"
    )
    trace.print_counts(report["torch_calls"])
    headline = report["headline"]
    if headline is not None:
        raw = f"{headline['raw_median_s'] * 1e3:.3f} ms" if headline["raw_median_s"] else "not measured"
        ratio = f"{headline['ratio_to_raw']:.2f}" if headline["ratio_to_raw"] else "-"
        print(
            f"\nHEADLINE  send() -> receiver SUCCESS, {headline['payload_bytes'] / MiB:.0f} MiB, contiguous ids, "
            f"{headline['message_mib']} MiB messages: {headline['receiver_median_s'] * 1e3:.3f} ms; raw "
            f"{args.backend} send/recv of the same bytes {raw}; ratio {ratio} (goal >= {headline['goal_ratio']:.2f})"
        )
        if headline["behind_compute_ratio_to_raw"]:
            print(
                f"HEADLINE  sent behind a {args.compute_ms:g} ms stand-in step (as a prefill worker sends), that "
                f"step's end -> receiver SUCCESS: {headline['behind_compute_median_s'] * 1e3:.3f} ms; ratio "
                f"{headline['behind_compute_ratio_to_raw']:.2f}"
            )
