#!/usr/bin/env python3
"""Where each microsecond of a drained event goes, from `perf record -e cpu-clock --call-graph
dwarf` of the relay's process (all its threads) while it drains (make bench-drain-profile).

Usage: drain_profile.py PERF_DATA EVENTS [LABEL]

Each sample of the worker's main thread is put in the first stage (walking from the sampled
function towards main) whose pattern one of its frames matches, so that, say, a malloc called
while routing counts as routing and a memcpy inside librdkafka's produce call as the produce
call. PostgreSQL's own functions have no stage of their own: whatever runs under
`decode_next` and in none of ours is decoding. The other threads (the producing thread,
librdkafka's) are summed by name.
Prints a markdown table: stage, share of the main thread, microseconds per event.
"""
import re
import subprocess
import sys
from collections import Counter

# (stage, pattern over a frame's symbol), tried for each frame from the leaf up; first match wins.
STAGES = [
    ("opening (HMAC check, parsing)", r"outbox_core::event::open|outbox_core::auth|sha2::|hmac::|digest::|Opener::open"),
    ("tracker", r"outbox_core::tracker|DeliveryTracker"),
    ("partition tails (exactly once)", r"Tails::place|relay::tail::"),
    ("hand-over to the producing thread", r"KafkaProducer::queue|KafkaProducer::hand_over|Batch::push"),
    ("produce call (librdkafka, headers)", r"rd_kafka_produce|rd_kafka_header|KafkaProducer::send|OwnedHeaders|rd_kafka_msg_new"),
    ("delivery reports", r"EventRouter::poll|KafkaProducer::poll|rd_kafka_poll|rd_kafka_event|BaseProducer.*poll|RelayContext.*delivery|crossbeam"),
    ("routing (headers, topic, ids)", r"EventRouter::route|outbox_core::routing|uuid7|Position|Rfc3339"),
    ("callback glue (prefix check, guard)", r"plugin_message|Routing as .*DecodeSink|run_guarded|check_active_thread"),
    ("confirmation", r"DecodingSession::confirm|LogicalConfirmReceivedLocation|ReplicationSlotSave|Relay::confirm"),
    ("status and progress", r"publish_progress|StatusWriter|status::"),
    ("decoding (PostgreSQL)", r"DecodingSession::decode_next|LogicalDecodingProcessRecord|XLogReadRecord"),
]
COMPILED = [(name, re.compile(p)) for name, p in STAGES]


def samples(path):
    """Yields (thread name, period in ns, [symbols from leaf to root])."""
    out = subprocess.run(
        ["perf", "script", "-i", path, "-F", "comm,tid,period,ip,sym", "--no-inline"],
        capture_output=True, text=True, check=True,
    ).stdout
    for block in out.split("\n\n"):
        lines = [l for l in block.splitlines() if l.strip()]
        if not lines:
            continue
        head = lines[0].split()
        comm, period = " ".join(head[:-2]), int(head[-1])
        frames = [l.strip().split(" ", 1)[1] if " " in l.strip() else "" for l in lines[1:]]
        yield comm, period, frames


def stage_of(frames):
    for f in frames:
        for name, rx in COMPILED:
            if rx.search(f):
                return name
    return "other (main loop, latch, start-up)"


def main():
    path, events = sys.argv[1], int(sys.argv[2])
    label = sys.argv[3] if len(sys.argv) > 3 else path
    main_ns, threads = Counter(), Counter()
    for comm, period, frames in samples(path):
        if comm != "postgres":
            threads[re.sub(r"\d+$", "", comm)] += period
        else:
            main_ns[stage_of(frames)] += period
    total = sum(main_ns.values())
    print(f"| {label}: stage | share of the main thread | µs per event |")
    print("|---|---|---|")
    order = [n for n, _ in STAGES] + ["other (main loop, latch, start-up)"]
    for name in order:
        if main_ns[name]:
            print(f"| {name} | {100 * main_ns[name] / total:.1f} % | {main_ns[name] / 1e3 / events:.3f} |")
    print(f"| **main thread, all** | 100 % | **{total / 1e3 / events:.3f}** |")
    for name, ns in sorted(threads.items()):
        print(f"| thread `{name}` (beside the main thread) | | {ns / 1e3 / events:.3f} |")


if __name__ == "__main__":
    main()
