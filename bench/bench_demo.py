"""End-to-end wall time of the README's first command, `make demo`, as a new user meets it.

Clones the repository's HEAD into a temporary folder with an empty model cache and times, in turn,
`make setup` (venv and dependencies, from the package registry or pip's cache), and `make demo`
(pretraining the embedded model once, then training the demo's rows, FARE, update-matched FARE, the FARE-reg
λ sweep and LORE, two runs at a time, and the evaluation). Writes bench/results/demo.json: the phases' wall
times, the demo's table (its rows and wall time), and the machine. Run it on an otherwise idle machine: it
measures wall time.

    python bench/bench_demo.py
    python bench/bench_demo.py --venv /path/to/.venv   # offline: reuse an installed venv, setup not timed

With --venv the clone's `make demo` runs with that environment (make's BIN/VENV/STAMP overridden, nothing is
installed into it) and setup is not measured: the closest proxy of a fresh clone on a machine without network.
The model cache is empty either way, so the pretraining is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def timed_make(target: str, cwd: Path, log: Path, variables: list[str] | None = None) -> float:
    # The caller's environment (pip's index settings) minus what would point the clone at this checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("LOREKIT_CACHE", "JUPYTER_PATH", "VIRTUAL_ENV")}
    start = time.perf_counter()
    with log.open("a") as out:
        subprocess.run(["make", target, *(variables or [])], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                       check=True, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "demo.json"))
    parser.add_argument("--venv", help="reuse this installed virtual environment (no network): setup is not timed")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lorekit-bench-demo-") as tmp:
        clone = Path(tmp) / "lorekit"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        log = Path(tmp) / "make.log"
        variables = []
        if args.venv:
            venv = Path(args.venv).resolve()
            stamp = Path(tmp) / "installed-stamp"
            stamp.touch()  # newer than the clone's pyproject.toml: make installs nothing
            variables = [f"VENV={venv}", f"BIN={venv / 'bin'}", f"STAMP={stamp}"]
            setup_s = None
        else:
            setup_s = timed_make("setup", clone, log)
        demo_s = timed_make("demo", clone, log, variables)
        text = log.read_text()
        pretrain = re.search(r"pretraining took (\d+) s", text)
        pretrain_s = int(pretrain.group(1)) if pretrain else None
        demo = json.loads((clone / "runs" / "demo" / "results.json").read_text())
        # The clone's interpreter describes the machine as the demo saw it (threads, torch build).
        info = json.loads(subprocess.run(
            [str(Path(args.venv).resolve() / "bin" / "python" if args.venv else clone / ".venv" / "bin" / "python"), "-c",
             "import json; from lorekit.robustness import machine; print(json.dumps(machine()))"],
            cwd=clone, capture_output=True, text=True, check=True).stdout)
    command = "make demo (fresh clone, empty LOREKIT_CACHE" + (f", venv {args.venv} reused: setup not timed)"
                                                                if args.venv else ")")
    out = {"commit": commit, "command": command,
           # The demo's own wall time includes the one-time pretraining (its first worker loads the model).
           "seconds": {"setup": None if setup_s is None else round(setup_s, 1), "demo_total": round(demo_s, 1),
                       "pretraining": pretrain_s,
                       "train_and_eval": round(demo["wall_time_s"] - (pretrain_s or 0), 1),
                       "end_to_end": None if setup_s is None else round(setup_s + demo_s, 1)},
           "demo": {k: demo[k] for k in ("command", "commit", "seeds", "wall_time_s", "workers", "rows", "labels",
                                         "fare_reg_best_lam") if k in demo},
           "machine": info}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["seconds"], indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
