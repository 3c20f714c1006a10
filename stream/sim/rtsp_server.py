#!/usr/bin/env python3
"""RTSP server for tests and load tests: looping mp4 cameras, A/V media files, publish/play relays.

It runs under the system Python, because GStreamer's bindings (python3-gi,
gir1.2-gst-rtsp-server-1.0) come from the distribution and do not import inside a virtual
environment; so it uses only the standard library and ``gi``, never the ``stream`` package::

    /usr/bin/python3 stream/sim/rtsp_server.py --port 8554 --camera /cam1=clip.mp4 --relay /live \
        --media /av1=scene.mkv

Camera mounts send the H.264 track of an mp4 as a live camera would: paced by the clock, looping
forever, never re-encoded, one pipeline shared by all readers. Media mounts send a file's H.264
video and its audio track (AAC, Opus or G.711 mu-law, found by probing the file; .mp4/.mov or .mkv)
as a camera with a microphone would, paced by the clock; every reader gets its own pipeline that
starts at the beginning of the file and plays it once (no loop: tests read a known stretch, then
the stream ends with RTCP BYE). Relay mounts take one publisher (ANNOUNCE + RECORD) and forward its
access units, again without re-encoding, to any number of readers that PLAY the same path. Prints
``READY <port>`` on stdout once listening; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

APT_PACKAGES = (
    "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
)

try:
    import gi

    for _namespace in ("Gst", "GstApp", "GstRtsp", "GstRtspServer"):
        gi.require_version(_namespace, "1.0")
    from gi.repository import GLib, Gst, GstApp, GstRtsp, GstRtspServer
except (ImportError, ValueError) as _exc:
    sys.stderr.write(
        f"rtsp_server: GStreamer RTSP server bindings are missing ({type(_exc).__name__}: {_exc}).\n"
        f"rtsp_server: install them with: apt-get install {APT_PACKAGES}\n"
    )
    raise SystemExit(3) from _exc

assert GstApp  # loaded for the appsrc/appsink methods (push_buffer, pull_sample, ...)

# Elements the pipelines use, and the Debian package that ships each one.
REQUIRED_ELEMENTS = {
    "filesrc": "libgstreamer1.0-0",
    "appsrc": "gstreamer1.0-plugins-base",
    "appsink": "gstreamer1.0-plugins-base",
    "qtdemux": "gstreamer1.0-plugins-good",
    "rtph264pay": "gstreamer1.0-plugins-good",
    "rtph264depay": "gstreamer1.0-plugins-good",
    "rtpbin": "gstreamer1.0-plugins-good",
    "h264parse": "gstreamer1.0-plugins-bad",
    "queue": "libgstreamer1.0-0",
    "fakesink": "libgstreamer1.0-0",
    "matroskademux": "gstreamer1.0-plugins-good",
    "aacparse": "gstreamer1.0-plugins-good",
    "rtpmp4gpay": "gstreamer1.0-plugins-good",
    "opusparse": "gstreamer1.0-plugins-bad",
    "rtpopuspay": "gstreamer1.0-plugins-good",
    "rtppcmupay": "gstreamer1.0-plugins-good",
}

# Access units travel as AVC with codec_data in the caps, so the SDP carries SPS/PPS
# (sprop-parameter-sets) and readers know the stream before its first keyframe arrives.
AVC_CAPS = "video/x-h264,stream-format=avc,alignment=au"
CAMERA_LAUNCH = (
    f"filesrc name=file ! qtdemux ! h264parse ! {AVC_CAPS} ! "
    "appsink name=sink sync=false emit-signals=true max-buffers=2 drop=false"
)
RECORD_LAUNCH = (
    f"( rtph264depay name=depay0 ! h264parse ! {AVC_CAPS} ! "
    "appsink name=sink sync=false async=false emit-signals=true )"
)
# SPS/PPS go in front of every IDR access unit, for readers that join mid-stream. h264parse does
# that per access unit; rtph264pay's config-interval=-1 would do it per IDR *slice*, and SPS/PPS
# between the slices of one picture make FFmpeg split it in two (PyAV's libx264 encodes several
# slices per picture by default: thread_type SLICE).
PLAY_LAUNCH = (
    "( appsrc name=src is-live=true format=time do-timestamp=false min-latency=0 max-bytes=8000000 "
    "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 config-interval=0 )"
)
# Media mounts: the demuxer by file suffix, and the payloader chain by the audio track's codec.
MEDIA_DEMUXERS = {".mp4": "qtdemux", ".m4v": "qtdemux", ".mov": "qtdemux", ".mkv": "matroskademux"}
MEDIA_AUDIO = {
    "aac": "aacparse ! rtpmp4gpay name=pay1 pt=97",
    "opus": "opusparse ! rtpopuspay name=pay1 pt=97",
    "pcmu": "rtppcmupay name=pay1",  # static payload type 0
}
MEDIA_VIDEO = "h264parse ! rtph264pay name=pay0 pt=96 config-interval=1"
ROLE_ANONYMOUS = "anonymous"
ROLE_USER = "user"
NONE = Gst.CLOCK_TIME_NONE
MS = Gst.MSECOND
COPY_SHALLOW = (
    Gst.BufferCopyFlags.FLAGS
    | Gst.BufferCopyFlags.TIMESTAMPS
    | Gst.BufferCopyFlags.META
    | Gst.BufferCopyFlags.MEMORY
)

_verbose = False


def log(message: str) -> None:
    """Errors (always) and, with --verbose, lifecycle events go to stderr; stdout is the READY line."""
    sys.stderr.write(f"rtsp_server: {message}\n")
    sys.stderr.flush()


def info(message: str) -> None:
    if _verbose:
        log(message)


class Unit(NamedTuple):
    """One H.264 access unit with its timestamps on the (shared) system clock."""

    buffer: Gst.Buffer
    caps: Gst.Caps | None
    abs_pts: int
    abs_dts: int
    keyframe: bool


def unit_from_sample(sample: Gst.Sample, base_time: int) -> Unit | None:
    """The access unit of an appsink sample, timed by its running time (pipeline started at `base_time`)."""
    buf = sample.get_buffer()
    pts, dts = buf.pts, buf.dts
    if pts == NONE:
        pts = dts
    if pts == NONE:
        return None
    running = sample.get_segment().to_running_time(Gst.Format.TIME, pts)
    if running == NONE:  # outside the segment
        return None
    abs_pts = base_time + running
    abs_dts = abs_pts - (pts - dts) if dts != NONE and dts <= pts else abs_pts
    return Unit(buf, sample.get_caps(), abs_pts, abs_dts, not buf.has_flags(Gst.BufferFlags.DELTA_UNIT))


class Reader:
    """The appsrc of one PLAY media (all clients of a shared media use it) and its time mapping.

    A reader starts at a keyframe, since nothing before one decodes. Timestamps are the producer's
    clock times shifted by a constant, so the spacing of frames survives exactly (a camera stays at
    its frame rate) while the stream starts at the reader pipeline's running time "now". The
    media's sink holds each unit until its timestamp. A camera's units come paced by the clock, and
    the constant is set at the first keyframe. A live publisher's (``live``) arrive when they
    arrive, and the constant is the least delay seen so far between a unit's producer time and its
    push here: fixed on the first keyframe alone (a large picture, often a frame later than the
    rest), it held every later frame that much longer for the whole connection (a relay hop took
    60 or 100 ms from one connection to the next; now 60).
    """

    def __init__(self, appsrc: Gst.Element, caps: Gst.Caps | None, live: bool = False) -> None:
        self.appsrc = appsrc
        self.caps = caps
        self.live = live
        self.delta: int | None = None
        self.last_dts = -1
        self.lock = threading.Lock()

    def push(self, unit: Unit) -> None:
        with self.lock:
            src = self.appsrc
            clock = src.get_clock()
            if clock is None:  # the media is not PLAYING yet
                return
            late = max(0, clock.get_time() - unit.abs_dts)
            if self.delta is None:
                if not unit.keyframe:
                    return
                self.delta = late
            elif self.live and late < self.delta:  # sooner after its time than any before: hold all less
                self.delta = late
            base = src.get_base_time()
            dts = unit.abs_dts + self.delta - base
            if dts < 0:  # the pipeline restarted its clock (PAUSE, PLAY): resync at a keyframe
                self.delta = None
                return
            pts = dts + (unit.abs_pts - unit.abs_dts)
            if dts <= self.last_dts:  # never let time go backwards (e.g. around a loop point)
                pts += self.last_dts + MS - dts
                dts = self.last_dts + MS
            self.last_dts = dts
            if unit.caps is not None and (self.caps is None or not unit.caps.is_equal(self.caps)):
                src.set_caps(unit.caps)
                self.caps = unit.caps
            buf = unit.buffer.copy_region(COPY_SHALLOW, 0, unit.buffer.get_size())
            buf.pts = pts
            buf.dts = dts
            src.push_buffer(buf)

    def end(self) -> None:
        """EOS: rtpbin then sends RTCP BYE, which FFmpeg-based readers report as end of stream."""
        with self.lock:
            self.appsrc.end_of_stream()


class Hub:
    """Fans the access units of a mount's current producer out to the readers of that mount.

    The producer is the looping file of a camera, or the RECORD media of a relay's publisher. A new
    producer (a publisher that reconnects, perhaps at another size) ends the readers of the old one,
    whose SDP described the old stream; `on_ready` then runs at the new producer's first keyframe and
    `on_retire` when a producer goes.
    """

    def __init__(self, path: str, on_ready: Callable[[], None], on_retire: Callable[[], None],
                 live: bool = False) -> None:
        self.path = path
        self.live = live
        """the producer is a live publisher, not a file paced here (see :class:`Reader`)"""
        self._on_ready = on_ready
        self._on_retire = on_retire
        self._lock = threading.Lock()
        self._readers: dict[int, Reader] = {}
        self._keys = itertools.count()
        self._producer: int | None = None
        self._caps: Gst.Caps | None = None
        self._ready = False

    def start_producer(self, token: int) -> None:
        with self._lock:
            old, self._readers = list(self._readers.values()), {}
            had_producer = self._producer is not None
            self._producer, self._caps, self._ready = token, None, False
        self._retire(old, had_producer)

    def stop_producer(self, token: int) -> None:
        with self._lock:
            if self._producer != token:
                return
            old, self._readers = list(self._readers.values()), {}
            self._producer, self._caps, self._ready = None, None, False
        self._retire(old, True)

    def _retire(self, readers: list[Reader], had_producer: bool) -> None:
        if had_producer:
            self._on_retire()
        for reader in readers:
            reader.end()

    def push(self, token: int, unit: Unit) -> None:
        """Forward one access unit of producer `token` to every reader (if `token` is still current)."""
        became_ready = False
        with self._lock:
            if token != self._producer:
                return
            if unit.caps is not None:
                self._caps = unit.caps
            if not self._ready and unit.keyframe and self._caps is not None:
                self._ready = became_ready = True
            readers = list(self._readers.values())
        if became_ready:
            info(f"{self.path}: stream ready ({unit.caps.to_string() if unit.caps else '?'})")
            self._on_ready()
        for reader in readers:
            reader.push(unit)

    def add_reader(self, appsrc: Gst.Element) -> int:
        """Register the appsrc of a new PLAY media; returns the key for `remove_reader`."""
        if appsrc.find_property("leaky-type") is not None:
            # A media that was described but never played must not hoard memory: drop its oldest.
            appsrc.set_property("leaky-type", 2)  # GST_APP_LEAKY_TYPE_DOWNSTREAM
        with self._lock:
            if self._caps is not None:
                appsrc.set_caps(self._caps)
            key = next(self._keys)
            self._readers[key] = Reader(appsrc, self._caps, self.live)
            count = len(self._readers)
        info(f"{self.path}: reader media {key} added ({count} now)")
        return key

    def remove_reader(self, key: int) -> None:
        with self._lock:
            gone = self._readers.pop(key, None)
        if gone is not None:
            info(f"{self.path}: reader media {key} removed")


def grant(factory: GstRtspServer.RTSPMediaFactory, roles: tuple[str, ...]) -> None:
    """Let `roles` use `factory`; the anonymous role may always see it, so a protected mount answers
    401 (ask for credentials) rather than 404 to a client that has not authenticated yet."""
    for role in dict.fromkeys((*roles, ROLE_ANONYMOUS)):
        construct = "true" if role in roles else "false"
        factory.add_role_from_structure(Gst.Structure.new_from_string(
            f"{role}, {GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS}=(boolean)true, "
            f"{GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT}=(boolean){construct}"))


def play_factory(hub: Hub, roles: tuple[str, ...]) -> GstRtspServer.RTSPMediaFactory:
    """A shared PLAY factory whose one pipeline (appsrc ! rtph264pay) serves every reader."""
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PLAY_LAUNCH)
    factory.set_shared(True)
    grant(factory, roles)

    def configure(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        key = hub.add_reader(media.get_element().get_by_name("src"))
        media.connect("unprepared", lambda _media: hub.remove_reader(key))

    factory.connect("media-configure", configure)
    return factory


class Camera:
    """A camera mount: the H.264 track of an mp4 played in real time, forever, to a shared PLAY media.

    The file is read as fast as the appsink is drained, and this class paces it: each access unit
    waits for its own time on the system clock (the clock every pipeline here runs on). Timing from
    the file's own timestamps, with each loop starting where the last one's final frame ends, keeps
    the frame spacing exact across loop points; a segment seek's running time does not (the next
    loop starts at the last frame's start, so two frames would share a time).
    """

    LATE_NS = 500 * MS  # further behind than this (a stalled machine), skip ahead rather than burst

    def __init__(self, path: str, location: str, roles: tuple[str, ...], on_fatal: Callable[[str], None]):
        self.path = path
        self.location = location
        self._on_fatal = on_fatal
        self.hub = Hub(path, on_ready=lambda: None, on_retire=lambda: None)
        self.factory = play_factory(self.hub, roles)
        self.pipeline = Gst.parse_launch(CAMERA_LAUNCH)
        self.pipeline.get_by_name("file").set_property("location", location)
        self.sink = self.pipeline.get_by_name("sink")
        self.sink.connect("new-sample", self._on_sample)
        self.clock = Gst.SystemClock.obtain()
        self.loops = 0
        self._stopping = threading.Event()
        # Timeline state, touched only by the appsink's streaming thread.
        self._loop_base: int | None = None  # clock time of the current loop's first unit
        self._loop_origin = 0  # file time (DTS) of the current loop's first unit
        self._last_file_dts = -1
        self._last_end = 0  # file time where the latest unit ends
        self._step = 40 * MS  # the latest unit's duration

    def start(self, timeout_s: float = 10.0) -> None:
        """Preroll and play; raises RuntimeError when the file does not play."""
        self.hub.start_producer(0)
        self.pipeline.set_state(Gst.State.PAUSED)
        ret, _state, _pending = self.pipeline.get_state(int(timeout_s * Gst.SECOND))
        if ret != Gst.StateChangeReturn.SUCCESS:
            msg = self.pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
            detail = msg.parse_error()[0].message if msg else f"no preroll within {timeout_s:g} s"
            self.pipeline.set_state(Gst.State.NULL)
            raise RuntimeError(f"cannot play {self.location} (an mp4 with an H.264 track?): {detail}")
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message", self._on_message)
        self.pipeline.set_state(Gst.State.PLAYING)

    def stop(self) -> None:
        self._stopping.set()
        self.pipeline.set_state(Gst.State.NULL)

    def _on_sample(self, sink: Gst.Element) -> Gst.FlowReturn:
        sample = sink.pull_sample()
        if sample is None:
            return Gst.FlowReturn.OK
        buf = sample.get_buffer()
        pts, dts = buf.pts, buf.dts
        if pts == NONE:
            pts = dts
        if pts == NONE:
            return Gst.FlowReturn.OK
        if dts == NONE or dts > pts:
            dts = pts
        now = self.clock.get_time()
        if self._loop_base is None:
            self._loop_base, self._loop_origin = now, dts
        elif dts < self._last_file_dts:  # the file started over
            self.loops += 1
            self._loop_base += self._last_end - self._loop_origin
            self._loop_origin = dts
        if buf.duration != NONE:
            self._step = buf.duration
        self._last_file_dts = dts
        self._last_end = dts + self._step
        abs_dts = self._loop_base + dts - self._loop_origin
        if now - abs_dts > self.LATE_NS:
            self._loop_base += now - abs_dts
            abs_dts = now
        elif abs_dts > now and self._stopping.wait((abs_dts - now) / Gst.SECOND):
            return Gst.FlowReturn.FLUSHING
        keyframe = not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)
        self.hub.push(0, Unit(buf, sample.get_caps(), abs_dts + pts - dts, abs_dts, keyframe))
        return Gst.FlowReturn.OK

    def _on_message(self, _bus: Gst.Bus, msg: Gst.Message) -> None:
        if msg.type == Gst.MessageType.EOS:
            self.pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH, 0)
        elif msg.type == Gst.MessageType.ERROR:
            err, debug = msg.parse_error()
            self._on_fatal(f"camera {self.path} ({self.location}): {err.message} [{debug}]")


def audio_kind(caps: Gst.Caps) -> str | None:
    """The MEDIA_AUDIO key for a demuxer's audio caps, None for a codec a media mount cannot send."""
    st = caps.get_structure(0)
    name = st.get_name()
    if name == "audio/mpeg":
        ok, version = st.get_int("mpegversion")
        return "aac" if ok and version in (2, 4) else None
    return {"audio/x-opus": "opus", "audio/x-mulaw": "pcmu"}.get(name)


def probe_media(location: str, timeout_s: float = 10.0) -> str | None:
    """Demux the start of `location` to learn its tracks: returns the audio kind (None: no audio);
    raises RuntimeError when the file does not demux, has no H.264 video or an unsupported audio codec.

    Probing, rather than a codec named on the command line, keeps the mount spec a plain path and
    fails at startup, with the reason, instead of at a reader's DESCRIBE.
    """
    demuxer = MEDIA_DEMUXERS[os.path.splitext(location)[1].lower()]
    pipeline = Gst.parse_launch(f"filesrc name=file ! {demuxer} name=demux")
    pipeline.get_by_name("file").set_property("location", location)
    tracks: list[tuple[str, Gst.Caps]] = []
    done = threading.Event()

    def on_pad(_demux: Gst.Element, pad: Gst.Pad) -> None:
        caps = pad.get_current_caps() or pad.query_caps(None)
        tracks.append((pad.get_name(), caps))
        sink = Gst.ElementFactory.make("fakesink", None)
        sink.set_property("async", False)
        pipeline.add(sink)
        sink.sync_state_with_parent()
        pad.link(sink.get_static_pad("sink"))

    demux = pipeline.get_by_name("demux")
    demux.connect("pad-added", on_pad)
    demux.connect("no-more-pads", lambda _demux: done.set())
    bus = pipeline.get_bus()
    deadline = time.monotonic() + timeout_s
    try:
        pipeline.set_state(Gst.State.PAUSED)
        while not done.is_set():
            msg = bus.timed_pop_filtered(50 * MS, Gst.MessageType.ERROR)
            if msg is not None:
                raise RuntimeError(f"cannot demux {location}: {msg.parse_error()[0].message}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot demux {location}: no tracks within {timeout_s:g} s")
    finally:
        pipeline.set_state(Gst.State.NULL)
    video = [caps for name, caps in tracks if name.startswith("video")]
    audio = [caps for name, caps in tracks if name.startswith("audio")]
    if not video or video[0].get_structure(0).get_name() != "video/x-h264":
        found = video[0].to_string() if video else "no video track"
        raise RuntimeError(f"{location}: a media mount needs H.264 video, found {found}")
    if not audio:
        return None
    kind = audio_kind(audio[0])
    if kind is None:
        raise RuntimeError(f"{location}: cannot send audio {audio[0].to_string()} "
                           f"(supported: AAC, Opus, mu-law)")
    return kind


def media_launch(location: str, audio: str | None) -> str:
    """The launch line of a media mount (the file's location is set per media, so it needs no quoting)."""
    demuxer = MEDIA_DEMUXERS[os.path.splitext(location)[1].lower()]
    launch = f"( filesrc name=file ! {demuxer} name=demux demux.video_0 ! queue ! {MEDIA_VIDEO}"
    if audio is not None:
        launch += f" demux.audio_0 ! queue ! {MEDIA_AUDIO[audio]}"
    return launch + " )"


class Media:
    """A media mount: a file's H.264 video and its audio, sent as a live camera with a microphone.

    Each reader gets its own pipeline (the factory is not shared), which starts at the beginning of
    the file, so a test knows what time in the file every frame and sample it reads came from. The
    RTSP server's sinks sync to the clock, which paces the file at real time; at the end of the
    file the stream ends (RTCP BYE) instead of looping.

    Lip-sync as FFmpeg readers see it: until the first RTCP sender report, FFmpeg times each stream
    from its own first packet; both start at file time 0 here, so those clocks already agree and no
    jump shows when the reports arrive. Opus arrives 6.5 ms late: RTP does not carry the encoder's
    pre-skip (312 samples), so readers play the priming samples too.
    """

    def __init__(self, path: str, location: str, roles: tuple[str, ...]) -> None:
        self.path = path
        self.location = location
        self.audio = probe_media(location)
        self.factory = GstRtspServer.RTSPMediaFactory()
        self.factory.set_launch(media_launch(location, self.audio))
        self.factory.set_shared(False)
        grant(self.factory, roles)
        self.factory.connect("media-configure", self._configure)

    def _configure(self, _factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        media.get_element().get_by_name("file").set_property("location", self.location)
        info(f"{self.path}: reader media for {self.location} (audio {self.audio or 'none'})")


class Relay:
    """A relay mount: one publisher RECORDs, any number of readers PLAY the same path.

    The publisher's RECORD media ends in an appsink whose access units a Hub forwards to the appsrc
    of the shared PLAY media. Each publisher gets a fresh PLAY factory once its first keyframe
    arrives, so the SDP readers get always describes the stream they receive; until then (and after
    the publisher leaves) a DESCRIBE of the path answers 404, as a restreaming server does.
    """

    _tokens = itertools.count(1)

    def __init__(self, path: str, play_mounts: GstRtspServer.RTSPMountPoints,
                 record_mounts: GstRtspServer.RTSPMountPoints, roles: tuple[str, ...]):
        self.path = path
        self._play_mounts = play_mounts
        self._roles = roles
        self.hub = Hub(path, on_ready=self._mount_play, on_retire=self._unmount_play, live=True)
        record = GstRtspServer.RTSPMediaFactory()
        record.set_launch(RECORD_LAUNCH)
        record.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        grant(record, roles)
        record.connect("media-configure", self._on_record_media)
        record_mounts.add_factory(path, record)
        self._record_factory = record

    def _on_record_media(self, _factory: GstRtspServer.RTSPMediaFactory,
                         media: GstRtspServer.RTSPMedia) -> None:
        token = next(self._tokens)
        sink = media.get_element().get_by_name("sink")
        sink.connect("new-sample", self._on_sample, token)
        media.connect("unprepared", lambda _media: self._on_publisher_gone(token))
        info(f"{self.path}: publisher {token} announced")
        self.hub.start_producer(token)

    def _on_publisher_gone(self, token: int) -> None:
        info(f"{self.path}: publisher {token} left")
        self.hub.stop_producer(token)

    def _on_sample(self, sink: Gst.Element, token: int) -> Gst.FlowReturn:
        sample = sink.pull_sample()
        unit = unit_from_sample(sample, sink.get_base_time()) if sample is not None else None
        if unit is not None:
            self.hub.push(token, unit)
        return Gst.FlowReturn.OK

    def _mount_play(self) -> None:
        self._play_mounts.add_factory(self.path, play_factory(self.hub, self._roles))

    def _unmount_play(self) -> None:
        self._play_mounts.remove_factory(self.path)


class Auth(GstRtspServer.RTSPAuth):
    """Checks camera credentials, and gives each connection the mount table its first request needs.

    A publisher's ANNOUNCE and a reader's DESCRIBE name the same relay path but need different
    factories (RECORD versus PLAY). The URL check runs before either looks the path up, so that is
    where the connection's mount points are switched; the connection keeps them for its SETUPs.
    """

    def __init__(self, play_mounts: GstRtspServer.RTSPMountPoints,
                 record_mounts: GstRtspServer.RTSPMountPoints) -> None:
        super().__init__()
        self._play = play_mounts
        self._record = record_mounts

    def do_check(self, ctx: GstRtspServer.RTSPContext, check: str) -> bool:
        if check == GstRtspServer.RTSP_AUTH_CHECK_URL and ctx.client is not None:
            if ctx.method == GstRtsp.RTSPMethod.ANNOUNCE:
                ctx.client.set_mount_points(self._record)
            elif ctx.method == GstRtsp.RTSPMethod.DESCRIBE:
                ctx.client.set_mount_points(self._play)
        return GstRtspServer.RTSPAuth.do_check(self, ctx, check)


def make_token(role: str) -> GstRtspServer.RTSPToken:
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, role)
    return token


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default)")
    parser.add_argument("--camera", action="append", default=[], metavar="/PATH=FILE.mp4",
                        help="serve the H.264 of FILE.mp4 as a looping live camera at /PATH (repeatable)")
    parser.add_argument("--media", action="append", default=[], metavar="/PATH=FILE",
                        help="serve FILE's H.264 video and AAC/Opus/mu-law audio at /PATH, from its start "
                             "for each reader, once (.mp4, .mov or .mkv; repeatable)")
    parser.add_argument("--relay", action="append", default=[], metavar="/PATH",
                        help="accept a publisher (ANNOUNCE/RECORD) at /PATH and fan it out (repeatable)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="camera mounts require these credentials")
    parser.add_argument("--auth-method", choices=("basic", "digest"), default="basic",
                        help="RTSP authentication scheme for --auth (default basic)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="stop when stdin closes (ties the server's life to its parent's)")
    parser.add_argument("--verbose", action="store_true", help="log publishers and readers to stderr")
    args = parser.parse_args(argv)
    cameras: dict[str, str] = {}
    for spec in args.camera:
        path, sep, location = spec.partition("=")
        if not sep or not path.startswith("/") or not location:
            parser.error(f"--camera wants /PATH=FILE.mp4, got {spec!r}")
        if not os.path.isfile(location):
            parser.error(f"--camera {path}: no such file {location!r}")
        cameras[path] = location
    media: dict[str, str] = {}
    for spec in args.media:
        path, sep, location = spec.partition("=")
        if not sep or not path.startswith("/") or not location:
            parser.error(f"--media wants /PATH=FILE, got {spec!r}")
        if os.path.splitext(location)[1].lower() not in MEDIA_DEMUXERS:
            parser.error(f"--media {path}: {location!r} is not one of {', '.join(sorted(MEDIA_DEMUXERS))}")
        if not os.path.isfile(location):
            parser.error(f"--media {path}: no such file {location!r}")
        if path in cameras or path in media:
            parser.error(f"{path} is mounted twice")
        media[path] = location
    for path in args.relay:
        if not path.startswith("/"):
            parser.error(f"--relay wants /PATH, got {path!r}")
        if path in cameras or path in media:
            parser.error(f"{path} is both a {'camera' if path in cameras else 'media'} and a relay")
    if args.auth is not None and ":" not in args.auth:
        parser.error("--auth wants USER:PASSWORD")
    args.cameras = cameras
    args.media = media
    return args


def main(argv: list[str] | None = None) -> int:
    global _verbose
    args = parse_args(argv)
    _verbose = args.verbose
    Gst.init(None)
    missing = sorted({pkg for name, pkg in REQUIRED_ELEMENTS.items() if not Gst.ElementFactory.find(name)})
    if missing:
        log(f"GStreamer elements are missing; install: apt-get install {' '.join(missing)}")
        return 3

    loop = GLib.MainLoop()
    exit_code = 0

    def fatal(message: str) -> None:
        nonlocal exit_code
        log(message)
        exit_code = 1
        GLib.idle_add(loop.quit)

    play_mounts = GstRtspServer.RTSPMountPoints()
    record_mounts = GstRtspServer.RTSPMountPoints()
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    server.set_mount_points(play_mounts)
    server.set_backlog(128)  # load tests open many connections at once; the default is 5
    # One thread per connection: with the default pool a reader's DESCRIBE, which waits for a
    # keyframe from the publisher, blocks the publisher's own connection (deadlock).
    server.get_thread_pool().set_max_threads(64)

    auth = Auth(play_mounts, record_mounts)
    auth.set_default_token(make_token(ROLE_ANONYMOUS))
    if args.auth is not None:
        user, _, password = args.auth.partition(":")
        user_token = make_token(ROLE_USER)
        # One scheme only: the bindings take a single GstRTSPAuthMethod, not a combination.
        if args.auth_method == "digest":
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
            auth.add_digest(user, password, user_token)
        else:
            auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), user_token)
        camera_roles: tuple[str, ...] = (ROLE_USER,)
    else:
        camera_roles = (ROLE_ANONYMOUS,)
    server.set_auth(auth)

    cameras: list[Camera] = []
    try:
        for path, location in args.cameras.items():
            camera = Camera(path, location, camera_roles, fatal)
            camera.start()
            play_mounts.add_factory(path, camera.factory)
            cameras.append(camera)
        media = [Media(path, location, camera_roles) for path, location in args.media.items()]
        for item in media:
            play_mounts.add_factory(item.path, item.factory)
    except (RuntimeError, GLib.Error) as exc:
        log(str(exc))
        for camera in cameras:
            camera.stop()
        return 1
    relays = [Relay(path, play_mounts, record_mounts, (ROLE_ANONYMOUS, ROLE_USER)) for path in args.relay]

    if server.attach(None) == 0:
        log(f"cannot listen on {args.host}:{args.port} (port in use?)")
        for camera in cameras:
            camera.stop()
        return 1

    def on_signal() -> bool:
        loop.quit()
        return GLib.SOURCE_REMOVE

    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, on_signal)
    if args.exit_on_stdin_eof:
        def wait_stdin_eof() -> None:
            while sys.stdin.buffer.read1(4096):
                pass
            GLib.idle_add(loop.quit)

        threading.Thread(target=wait_stdin_eof, name="stdin-eof", daemon=True).start()

    port = server.get_bound_port()
    mounts = [*(camera.path for camera in cameras), *(item.path for item in media),
              *(relay.path for relay in relays)]
    info(f"listening on {args.host}:{port}; mounts {mounts}")
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    loop.run()

    # Close client connections so readers see the end at once, stop the files, and leave without
    # running Python finalizers while GStreamer threads may still call into Python.
    server.client_filter(lambda _server, _client, *_: GstRtspServer.RTSPFilterResult.REMOVE, None)
    for camera in cameras:
        camera.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    sys.exit(main())
