"""What each side-by-side benchmark does around its run: where its results go, how a SIGTERM
stops it, and writing them. Stdlib only."""
import datetime
import json
import os
import signal

HERE = os.path.dirname(os.path.abspath(__file__))


def utc_stamp():
    """The time now, for file names: 20261206T034900Z."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def results_path(given, name):
    """``given`` (--output), or benchmarks/results/<name>-<UTC time>.json."""
    return given or os.path.join(HERE, "results", f"{name}-{utc_stamp()}.json")


def interrupt_on_sigterm():
    """A SIGTERM stops the run as Ctrl-C does: servers stopped, partial results written."""
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)


def write_results(output, result, announce=True):
    """The results as indented JSON at ``output`` (its folder made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if announce:
        print(f"\nresults written to {output}")
