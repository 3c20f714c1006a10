"""Frame slots in shared memory: how a stream worker hands pixels to the detection stage process.

A worker copies each frame it sends for detection into a slot, a file under ``/dev/shm`` mapped
into both processes, and sends only the slot's name and the picture's geometry over its socket;
the stage reads the pixels in place. No pixels are pickled, and a frame crosses once (one
``memcpy``) whatever its size.

Slots belong to the worker: it takes a free one, grows it (under a new name) when a larger
picture comes, and frees it only when the stage has answered for the frame in it, so the stage
never reads a slot that is being rewritten. Every name starts with the worker's prefix, so the
supervisor can delete what a killed worker left behind (:func:`remove_prefix`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream.core.yuv import I420, Picture

MAX_SLOTS = 256
"""frames one worker may have at the stage at once; more wait in the stream queues (newest wins)"""


def shm_root() -> Path:
    """Where slot files live: tmpfs (``/dev/shm``) so they are memory, else the temp folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def remove_prefix(directory: Path, prefix: str) -> int:
    """Delete every slot file in ``directory`` whose name starts with ``prefix``; how many went."""
    n = 0
    for p in directory.glob(f"{prefix}*"):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


@dataclass(frozen=True)
class SlotRef:
    """What crosses the socket instead of the pixels: which file, and how to read it."""

    slot: int
    name: str
    kind: str
    """``i420`` or ``bgr``"""
    shape: tuple[int, ...]
    """the array's shape: (height*3/2, width) for I420, (height, width, 3) for BGR"""


class _Slot:
    __slots__ = ("capacity", "map", "name")

    def __init__(self, name: str, capacity: int, mapped: mmap.mmap | None) -> None:
        self.name, self.capacity, self.map = name, capacity, mapped


class SlotWriter:
    """The worker's side: free slots, a copy of each frame into one, and cleanup."""

    def __init__(self, directory: Path, prefix: str, max_slots: int = MAX_SLOTS) -> None:
        self.directory, self.prefix, self.max_slots = directory, prefix, max_slots
        self._slots: list[_Slot] = []
        self._free: list[int] = []
        self._names = 0

    def put(self, image: Picture) -> SlotRef | None:
        """Copy ``image`` into a free slot; None when every slot is still at the stage; OSError
        (naming the fix) when shared memory is full."""
        data = image.data if isinstance(image, I420) else np.ascontiguousarray(image)
        if data.dtype != np.uint8:
            raise ValueError(f"frames are uint8 pictures, got {data.dtype}")
        if self._free:
            index = self._free.pop()
        elif len(self._slots) < self.max_slots:
            index = len(self._slots)
            self._slots.append(_Slot("", 0, None))
            try:
                self._slots[index] = self._new_slot(data.nbytes)
            except OSError:
                self._free.append(index)
                raise
        else:
            return None
        slot = self._slots[index]
        if slot.capacity < data.nbytes:  # a larger picture than this slot held: a new, larger file
            self._drop(slot)
            try:
                slot = self._slots[index] = self._new_slot(data.nbytes)
            except OSError:
                self._slots[index] = _Slot("", 0, None)  # empty: the next frame tries to fill it again
                self._free.append(index)
                raise
        assert slot.map is not None
        np.frombuffer(slot.map, np.uint8, data.nbytes)[:] = data.reshape(-1)
        return SlotRef(index, slot.name, "i420" if isinstance(image, I420) else "bgr", tuple(data.shape))

    def release(self, slot: int) -> None:
        """The stage has answered for the frame in ``slot``: it may be written again."""
        if 0 <= slot < len(self._slots) and slot not in self._free:
            self._free.append(slot)

    def release_all(self) -> None:
        """The stage is gone (its connection closed): nothing reads any slot any more."""
        self._free = list(range(len(self._slots)))

    @property
    def in_use(self) -> int:
        return len(self._slots) - len(self._free)

    def close(self) -> None:
        for slot in self._slots:
            self._drop(slot)
        self._slots, self._free = [], []

    def _new_slot(self, nbytes: int) -> _Slot:
        # round up so a stream's frames of one size keep their slot, and small ones share sizes
        capacity = max(1 << 16, 1 << max(0, nbytes - 1).bit_length())
        self._names += 1
        name = f"{self.prefix}{self._names}"
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # reserve the memory now: a sparse file on a full tmpfs would kill the process with
            # SIGBUS at the first write instead of failing here
            os.posix_fallocate(fd, 0, capacity)
            mapped = mmap.mmap(fd, capacity)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise OSError(e.errno, f"cannot reserve {capacity >> 20} MiB for a frame slot in "
                                   f"{self.directory} ({e.strerror}); give the container more shared "
                                   "memory (docker --shm-size, a Kubernetes emptyDir with medium: Memory on "
                                   "/dev/shm) or run fewer streams per worker") from None
        os.close(fd)
        return _Slot(name, capacity, mapped)

    def _drop(self, slot: _Slot) -> None:
        if slot.map is None:
            return
        slot.map.close()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / slot.name).unlink()


class SlotReader:
    """The stage's side: a picture backed by a slot's memory, mapped once per slot file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[int, tuple[str, mmap.mmap]] = {}

    def view(self, ref: SlotRef) -> Picture:
        """The picture in ``ref``'s slot, without a copy; valid until the stage answers for it."""
        if "/" in ref.name or ref.name.startswith("."):
            raise ValueError(f"bad slot name {ref.name!r}")
        held = self._maps.get(ref.slot)
        if held is None or held[0] != ref.name:
            if held is not None:
                _close(held[1])
            with open(self.directory / ref.name, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            held = self._maps[ref.slot] = (ref.name, mapped)
        count = int(np.prod(ref.shape))
        arr = np.frombuffer(held[1], np.uint8, count).reshape(ref.shape)
        if ref.kind == "i420":
            return I420(arr)
        if ref.kind == "bgr" and len(ref.shape) == 3 and ref.shape[2] == 3:
            return arr
        raise ValueError(f"bad slot picture: {ref.kind} {ref.shape}")

    def close(self) -> None:
        for _, mapped in self._maps.values():
            _close(mapped)
        self._maps.clear()


def _close(mapped: mmap.mmap) -> None:
    """Unmap, unless a picture still views it (a batch in flight): then it goes with the last view."""
    with contextlib.suppress(BufferError):
        mapped.close()
