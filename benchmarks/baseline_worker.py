"""A pipeline with detection switched off: the load-test harness's baseline, never part of the product.

- ``--mode transcode``: the transcode-only ceiling (decode + re-encode, no detection), a baseline
  every load-test figure is compared with.
- ``--mode no-redact``: the same process presented as a redacting pipeline that does not redact,
  so the harness can prove its leak check fails when faces go out in the clear.

Both publish every face as it came in, so the worker says so loudly on stderr. It lives here, in
the source checkout, and not in the installed package: no flag, environment variable or config
of an installed stream-redact can make it publish unredacted frames. `stream-redact bench` runs
it by path (``--baseline-worker``, default: this file next to the checkout's ``stream/``):

    python benchmarks/baseline_worker.py CONFIG --mode transcode

A config with ``workers: N`` (N > 1) runs the multi-process service of ``run --workers N``, so
the ceiling is measured with as many stream processes as the redacting pipeline it is compared
with. Its detection stage process builds the detector from :func:`no_detection`, passed by
reference: the spawned process re-imports this script (as ``__mp_main__``) to find it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from stream.config import load_config  # noqa: E402
from stream.core.detections import Detections, FrameRef  # noqa: E402
from stream.live.service import serve  # noqa: E402
from stream.live.supervisor import supervise  # noqa: E402

MODES = ("transcode", "no-redact")
WARNING = ("stream-redact load test: WARNING: this pipeline DOES NOT REDACT ({mode}); every face and plate "
           "goes out in the clear. For load tests on synthetic cameras only.")


def no_detection() -> object:
    """A detector factory whose detector looks at nothing, so every frame goes out unchanged.

    Module level, so that it pickles for the detection stage process of ``workers: N``."""

    def detect(images: list[np.ndarray], refs: Sequence[FrameRef] | None = None) -> list[Detections]:
        return [Detections(observed=frozenset()) for _ in images]

    return detect


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/baseline_worker.py",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--mode", required=True, choices=MODES)
    args = ap.parse_args(argv)
    print(WARNING.format(mode=args.mode), file=sys.stderr, flush=True)
    config = load_config(args.config)
    workers = config.workers or 1  # unset: one process, as before (not one per core, as `run` would)
    if workers > 1:
        return asyncio.run(supervise(config, workers, detector_factory=no_detection))  # type: ignore[arg-type]
    return asyncio.run(serve(config, no_detection))  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
