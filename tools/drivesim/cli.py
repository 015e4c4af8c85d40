"""The drivesim command line: ``python -m tools.drivesim [--port N] [--data-dir DIR]
[--fault KIND:PROB[:MATCH]] ... [--no-sha256]`` serves until SIGINT or SIGTERM."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from tools.drivesim.protocol import FAULT_KINDS
from tools.drivesim.server import DriveSim


def _parse_fault(text: str) -> tuple[str, float, str | None]:
    kind, _, rest = text.partition(":")
    prob, _, match = rest.partition(":")
    try:
        p = float(prob) if prob else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad probability in {text!r}") from None
    if kind not in FAULT_KINDS or not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"bad fault {text!r}: KIND:PROB[:MATCH], KIND one of "
                                         f"{', '.join(FAULT_KINDS)}, PROB in [0, 1]")
    return kind, p, match or None


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; print the URL (the rootUrl) as the first stdout line."""
    ap = argparse.ArgumentParser(prog="python -m tools.drivesim",
                                 description="A local Google Drive v3 test server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    ap.add_argument("--data-dir", type=Path, help="keep files here across restarts")
    ap.add_argument("--fault", action="append", type=_parse_fault, default=[],
                    metavar="KIND:PROB[:MATCH]",
                    help=f"inject a fault with probability PROB; KIND: {', '.join(FAULT_KINDS)}; "
                         f"MATCH: a request kind or path regex")
    ap.add_argument("--seed", type=int, help="seed for probabilistic faults")
    ap.add_argument("--no-sha256", action="store_true",
                    help="omit sha256Checksum from file metadata (Drive gives it only 'if available')")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="drivesim: %(message)s")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    sim = DriveSim(args.data_dir, args.host, args.port, seed=args.seed, sha256=not args.no_sha256)
    for kind, p, match in args.fault:
        sim.inject(kind, probability=p, match=match)
    with sim:
        print(sim.url, flush=True)
        print(f"drivesim: serving Drive v3 at {sim.url} (root folder id {sim.root_id}); "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
        while not done.wait(0.5):
            pass
    return 0
