"""Which worker runs which stream: a stable split of stream ids over N workers.

Each stream must run on exactly one worker of a scaled-out deployment (a Kubernetes StatefulSet:
worker ``i`` of ``N`` is the pod ``<name>-i``). Every worker reads the same config and keeps only
the streams it owns, so no coordinator is needed. Ownership uses rendezvous (highest random
weight) hashing on SHA-256: it depends only on the id and N (never on Python's per-process hash
seed, the order of the config or the host), and going from N to N+1 workers moves only about
1/(N+1) of the streams, the ones the new worker takes.

``python -m stream.live.shard --count N ID...`` prints the owning shard of each id (which pod to ask
for a WHIP/WHEP stream).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stream.core.errors import UserError

INDEX_ENV = "STREAM_REDACT_SHARD_INDEX"
COUNT_ENV = "STREAM_REDACT_SHARD_COUNT"
MAX_SHARDS = 1024
_ORDINAL = re.compile(r"^(?P<prefix>.+)-(?P<ordinal>\d+)$")


def _weight(shard: int, stream_id: str) -> int:
    digest = hashlib.sha256(f"{shard}\x00{stream_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def owner(stream_id: str, count: int) -> int:
    """The shard (0..count-1) that runs ``stream_id``; the same in every process and on every host."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    return max(range(count), key=lambda shard: (_weight(shard, stream_id), -shard))


def worker_of(stream_id: str, count: int) -> int:
    """The worker process (0..count-1) of ``run --workers count`` that runs ``stream_id``.

    Hashed apart from :func:`owner` (salted): a shard's streams are those on which shard wins,
    and the same unsalted weights would then put most of them on one worker."""
    return owner(f"worker\x00{stream_id}", count)


@dataclass(frozen=True)
class Shard:
    """This worker's place among its peers: ``index`` of ``count`` (and the pod name prefix, if known)."""

    index: int
    count: int
    host_prefix: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise UserError(f"shard count must be between 1 and {MAX_SHARDS}, got {self.count}", exit_code=2)
        if not 0 <= self.index < self.count:
            raise UserError(f"shard index must be between 0 and {self.count - 1} (shard count {self.count}), "
                            f"got {self.index}", exit_code=2)

    def owns(self, stream_id: str) -> bool:
        return owner(stream_id, self.count) == self.index

    def owner_name(self, stream_id: str) -> str:
        """Where ``stream_id`` lives, in words an operator can use (a pod name when known)."""
        i = owner(stream_id, self.count)
        return f"{self.host_prefix}-{i}" if self.host_prefix else f"shard {i} of {self.count}"

    def split(self, stream_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """(ids this worker runs, ids other workers run), each in the given order."""
        mine: list[str] = []
        others: list[str] = []
        for sid in stream_ids:
            (mine if self.owns(sid) else others).append(sid)
        return mine, others


def ordinal_from_hostname(hostname: str) -> tuple[int, str]:
    """(ordinal, prefix) of a StatefulSet pod name such as ``stream-redact-2`` -> (2, "stream-redact")."""
    m = _ORDINAL.match(hostname.split(".", 1)[0])
    if not m:
        raise UserError(f"--shard-index auto: host name {hostname!r} does not end in -<number> as a "
                        "StatefulSet pod's does; pass the index as a number", exit_code=2)
    return int(m.group("ordinal")), m.group("prefix")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{what}: expected a whole number or 'auto', got {text!r}", exit_code=2) from None


def resolve(index: str | None, count: str | int | None, environ: dict[str, str] | None = None,
            hostname: str | None = None) -> Shard | None:
    """The worker's shard from options, else ``$STREAM_REDACT_SHARD_INDEX``/``_COUNT``; None: unsharded.

    ``index`` may be ``auto``: the ordinal at the end of the host name (a StatefulSet pod's name).
    Giving one of index and count without the other is an error, since guessing would run streams
    twice or not at all."""
    env = os.environ if environ is None else environ
    if index is None:
        index = env.get(INDEX_ENV) or None
    if count is None:
        count = env.get(COUNT_ENV) or None
    if index is None and count is None:
        return None
    if index is None or count is None:
        missing = "--shard-index (or $" + INDEX_ENV + ")" if index is None else "--shard-count (or $" + \
            COUNT_ENV + ")"
        raise UserError(f"sharding needs both a shard index and a shard count; {missing} is missing",
                        exit_code=2)
    n = count if isinstance(count, int) else _int(count, "--shard-count")
    prefix = None
    if str(index).strip().lower() == "auto":
        i, prefix = ordinal_from_hostname(hostname or env.get("HOSTNAME") or socket.gethostname())
    else:
        i = _int(str(index), "--shard-index")
    return Shard(i, n, prefix)



def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream.live.shard",
                                description="Print the shard that runs each stream id.")
    p.add_argument("--count", type=int, required=True, help="number of workers (StatefulSet replicas)")
    p.add_argument("ids", nargs="+", help="stream ids")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error("--count must be >= 1")
    for sid in args.ids:
        print(f"{sid}\t{owner(sid, args.count)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
