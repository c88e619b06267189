"""``make fuzz``: the fuzz suite's targets (tests/fuzz_targets.py) for a set time, random seeds, one after another.

    python bench/fuzz.py --seconds 600 [--corpus DIR] [--targets embeddings,uploads]

The corpus folder (default ``${XDG_CACHE_HOME:-~/.cache}/textinv/fuzz-corpus``, outside the repository) keeps
hypothesis' example database (every failing case, replayed first on the next run), the tiny pipeline whose JSON
files seed the model-folder target, and ``findings/``: each failure's smallest input as files, and its error. A
finding becomes a regression file: copy it to tests/data/fuzz-regressions/ (see tests/test_fuzz_regressions.py).
Prints executions per target, the time, and the findings; exits 1 when there is one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
CHUNK = 200  # examples per hypothesis run; the clock is checked between runs


def default_corpus() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "textinv" / "fuzz-corpus"


def interop_embeddings() -> Path | None:
    folder = os.environ.get("TEXTINV_INTEROP_DATA")
    base = Path(folder) if folder else REPO.parent / "shared" / "data"
    return base / "embeddings" if (base / "embeddings").is_dir() else None


def save_finding(folder: Path, name: str, value: Any, error: BaseException) -> Path:
    """The smallest failing input as files a person can open (an embedding as its file), and the error."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{len(list(folder.iterdir()))}"
    if name == "embeddings" and value is not None:
        (folder / f"{stem}{value[0] or '.noext'}").write_bytes(value[1])
    else:
        (folder / f"{stem}.repr").write_text(repr(value), encoding="utf-8")
    (folder / f"{stem}.error.txt").write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    return folder / stem


def one_run(target: Any, seeds: Any, work: Path, counts: dict[str, int], name: str, last: list[Any], database: Any):
    """One hypothesis run of a target (CHUNK examples, the database's failures first)."""
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=CHUNK, database=database, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True
    )
    @given(target.strategy(seeds))
    def case(value: Any) -> None:
        last[0] = value
        counts[name] += 1
        target.run(value, work)

    return case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)  # the readers' warnings (skipped images...) are expected here
    warnings.filterwarnings("ignore", message="Generating overly large repr")  # hypothesis, on 40 kB inputs

    from hypothesis.database import DirectoryBasedExampleDatabase

    from fuzz_harness import embedding_seeds, image_seeds
    from fuzz_targets import TARGETS, load_seeds
    from textinv.tiny import build_tiny_pipeline

    corpus = args.corpus.expanduser()
    corpus.mkdir(parents=True, exist_ok=True)
    model = corpus / "tiny-sd1"
    if not (model / "model_index.json").is_file():
        build_tiny_pipeline(model, seed=0)
    names = [n for n in args.targets.split(",") if n] or list(TARGETS)
    database = DirectoryBasedExampleDatabase(str(corpus / "hypothesis"))
    counts = dict.fromkeys(names, 0)
    findings: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="textinv-fuzz-") as scratch:
        seeds = load_seeds(embedding_seeds(Path(scratch) / "seeds", interop_embeddings()), image_seeds(), model)
        work = Path(scratch) / "work"
        while time.monotonic() - started < args.seconds:
            for name in names:
                if time.monotonic() - started >= args.seconds:
                    break
                last: list[Any] = [None]
                case = one_run(TARGETS[name], seeds, work / name, counts, name, last, database)
                try:
                    case()
                except Exception as error:  # noqa: BLE001 - a finding: kept, and the run goes on
                    where = save_finding(corpus / "findings", name, last[0], error)
                    first = (str(error).splitlines() or [""])[0][:200]
                    findings.append(f"{name}: {type(error).__name__}: {first} ({where})")
    elapsed = time.monotonic() - started
    summary = {"seconds": round(elapsed), "executions": sum(counts.values()), "by_target": counts, "findings": findings}
    print(json.dumps(summary, indent=2))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
