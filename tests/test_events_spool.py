"""The on-disk spool: order, acknowledgement, restart, crash damage, overflow policies, one user a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.core.errors import UserError
from stream.events.spool import SUFFIX, Spool


def enc(payload: bytes, seq: int) -> bytes:
    return b'{"n":%s,"seq":%d}' % (payload, seq)


def put(spool: Spool, *ns: int, key: str | None = "cam1") -> None:
    res = spool.append([(key, "track", 1.0, str(n).encode()) for n in ns], enc)
    assert res.written == len(ns)


def values(recs: list) -> list[int]:
    return [int(r.value.split(b",")[0][5:]) for r in recs]


def open_spool(path: Path, **kw: object) -> Spool:
    kw.setdefault("max_bytes", 1 << 20)
    return Spool(path, **kw)  # type: ignore[arg-type]


def test_records_come_back_in_order_with_keys_and_sequence_numbers(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        put(sp, *range(5))
        sp.append([(None, "pipeline", 2.0, b"99")], enc)
        recs = sp.read(100)
        assert values(recs) == [0, 1, 2, 3, 4, 99]
        assert [r.seq for r in recs] == [1, 2, 3, 4, 5, 6]
        assert recs[0].key == b"cam1" and recs[-1].key is None
        assert recs[-1].category == "pipeline" and recs[-1].time == 2.0
        assert recs[2].value == b'{"n":2,"seq":3}'  # the sequence is stamped into the value itself
        assert sp.read(100) == []
        assert sp.pending == 6


def test_written_seq_moves_only_once_the_records_are_in_the_file(tmp_path: Path) -> None:
    """What another thread may call accepted: ``next_seq`` runs ahead while ``append`` is writing."""
    with open_spool(tmp_path) as sp:
        seen: list[tuple[int, int, int]] = []

        def watch(payload: bytes, seq: int) -> bytes:
            size = sum(p.stat().st_size for p in tmp_path.glob("*" + SUFFIX))
            seen.append((sp.next_seq, sp.written_seq, size))
            return enc(payload, seq)

        sp.append([("cam1", "track", 1.0, b"%d" % n) for n in range(3)], watch)
        assert [s[0] for s in seen] == [1, 2, 3]  # numbering advanced record by record ...
        assert all(w == 1 and size == 0 for _, w, size in seen)  # ... while nothing was in the file
        assert sp.written_seq == sp.next_seq == 4
    with open_spool(tmp_path) as sp:
        assert sp.written_seq == 4


def test_unacknowledged_records_are_read_again_after_a_restart(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        put(sp, *range(10))
        recs = sp.read(100)
        sp.ack(recs[3])  # 0-3 delivered
    with open_spool(tmp_path) as sp:
        assert sp.pending == 6
        assert values(sp.read(100)) == [4, 5, 6, 7, 8, 9]
        put(sp, 10)
        assert [r.seq for r in sp.read(100)] == [11]  # numbering goes on


def test_rewind_resends_from_the_failed_record(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        put(sp, *range(6))
        recs = sp.read(100)
        sp.ack(recs[1])
        assert sp.rewind(recs[3]) == recs[3].seq
        assert values(sp.read(100)) == [3, 4, 5]
        sp.rewind_to_cursor()
        assert values(sp.read(100)) == [2, 3, 4, 5]


def test_reads_cross_segments_and_reading_back_from_disk_matches(tmp_path: Path) -> None:
    with open_spool(tmp_path, segment_bytes=200) as sp:
        put(sp, *range(50))
        assert len(list(tmp_path.glob("*" + SUFFIX))) > 5
        live = sp.read(1000)
    with open_spool(tmp_path, segment_bytes=200) as sp:  # no in-memory tail: all from the files
        disk = sp.read(1000)
    assert [(r.seq, r.value, r.segment, r.start, r.end) for r in live] == \
           [(r.seq, r.value, r.segment, r.start, r.end) for r in disk]
    assert values(disk) == list(range(50))


def test_acknowledged_segments_are_deleted_and_a_drained_spool_is_empty(tmp_path: Path) -> None:
    with open_spool(tmp_path, segment_bytes=200) as sp:
        put(sp, *range(50))
        recs = sp.read(1000)
        before = sp.bytes
        sp.ack(recs[30])
        assert sp.bytes < before  # segments before the cursor are gone
        assert sp.bytes == sum(p.stat().st_size for p in tmp_path.glob("*" + SUFFIX))
        sp.ack(recs[-1])
        assert sp.pending == 0
        sp.commit(compact=True)
        assert sp.bytes == 0 and not list(tmp_path.glob("*" + SUFFIX))
    with open_spool(tmp_path) as sp:
        put(sp, 1)
        assert [r.seq for r in sp.read(10)] == [51]


def test_a_record_cut_short_by_a_crash_is_dropped_on_restart(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        put(sp, 1, 2, 3)
    seg = next(tmp_path.glob("*" + SUFFIX))
    with seg.open("ab") as f:
        f.write(b"4 cam1 track 1.000 deadbeef {\"n\":4")  # a write the crash interrupted
    with open_spool(tmp_path) as sp:
        assert values(sp.read(10)) == [1, 2, 3]
        put(sp, 5)
        assert [r.seq for r in sp.read(10)] == [4]


def test_a_damaged_record_is_skipped_and_counted(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        put(sp, 1, 2, 3)
    seg = next(tmp_path.glob("*" + SUFFIX))
    data = seg.read_bytes()
    seg.write_bytes(data.replace(b'"n":2', b'"n":7'))  # bit rot: the CRC no longer matches
    with open_spool(tmp_path) as sp:
        assert values(sp.read(10)) == [1, 3]
        assert sp.corrupt == 1


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_a_full_spool_drops_by_policy_and_counts_exactly(tmp_path: Path, policy: str) -> None:
    with Spool(tmp_path, max_bytes=4000, overflow=policy, segment_bytes=500) as sp:
        written = dropped = 0
        for n in range(200):
            res = sp.append([("cam1", "track", 1.0, str(n).encode())], enc)
            written += res.written
            dropped += res.dropped_new + res.dropped_old
        assert sp.bytes <= 4000
        kept = values(sp.read(1000))
        assert len(kept) + dropped == 200
        if policy == "drop_newest":
            assert kept == list(range(len(kept)))  # the first ones stayed
            assert written == len(kept)
        else:
            assert kept == list(range(200 - len(kept), 200))  # the last ones stayed
            assert written == 200


def test_dropping_the_oldest_skips_records_in_flight_without_losing_count(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=4000, overflow="drop_oldest", segment_bytes=500) as sp:
        put(sp, *range(10))
        in_flight = sp.read(5)  # sent, not acknowledged
        lost = 0
        for n in range(10, 200):
            lost += sp.append([("cam1", "track", 1.0, str(n).encode())], enc).dropped_old
        # the five in flight are not counted here: their fate is decided by the broker's answer
        assert lost == 200 - 5 - sp.unread
        assert sp.rewind(in_flight[0]) > in_flight[-1].seq  # gone from the spool: reading resumes later
        assert sp.pending == sp.unread


def test_one_spool_folder_serves_one_pipeline(tmp_path: Path) -> None:
    with open_spool(tmp_path), pytest.raises(UserError, match=r"events.spool.dir: .* is in use by pid \d+; "
                                                              r"give each pipeline"):
        open_spool(tmp_path)
    open_spool(tmp_path).close()  # free again once closed


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_every_fsync_policy_keeps_what_was_written(tmp_path: Path, fsync: str) -> None:
    with open_spool(tmp_path, fsync=fsync, fsync_interval_s=0.01) as sp:
        put(sp, 1, 2)
        sp.tick()
    with open_spool(tmp_path) as sp:
        assert values(sp.read(10)) == [1, 2]
