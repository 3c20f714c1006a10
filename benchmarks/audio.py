"""Audio redaction measured: how much speech is muted, how much else is kept, the onset, the cost.

Why: speech is personal data, and the detector that finds it (Silero VAD) was never tuned on this
project's sound. The scenes are made here (tests/audio_material.py): espeak-ng speech in several
voices and languages, a siren, street-like noise at two levels, and a flash with a 1 kHz beep
every few seconds. Each scene goes through the same :class:`AudioRedactor` the live pipeline and
``redact`` use, fed in 20 ms blocks as a live source delivers them, and is scored sample by
sample against the scene's ground truth:

- speech muted: share of speech samples that come out silent (mute_speech), the target is >= 99%;
- kept: share of the samples at least 0.6 s from any speech that come out as they went in (the
  look-ahead and the hangover mute a little around speech on purpose);
- siren kept: the same for the siren's samples;
- onset lead: how long before each utterance's first sample the muting starts (positive: early);
- CPU: redactor CPU seconds per second of 48 kHz audio, per stream, for mute_speech and disguise.

With ``--av`` it also redacts an A/V clip with ``stream-redact redact`` and reports the flash/beep
offset in the output (lip-sync).

    python benchmarks/audio.py          # table, and benchmarks/results/audio.json
    python benchmarks/audio.py --av     # also the A/V offset of a redacted file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from audio_material import Scene, ambient, make_scene, read_av, write_av_clip  # noqa: E402

from stream.audio.codec import RATE  # noqa: E402
from stream.audio.redactor import AudioPolicy, AudioRedactConfig, AudioRedactor  # noqa: E402

VOICES = ("en", "en-us", "de", "fr", "es", "it", "pl", "hi")
NOISE = {"street": 0.0, "loud street": 0.06}
"""extra noise RMS mixed into the scene (its own ambient is 0.02)"""
BLOCK = 960
SILENT = 1e-4


def scenes(seeds: int) -> list[tuple[str, Scene]]:
    out = []
    for i, voice in enumerate(VOICES):
        for noise_name, rms in NOISE.items():
            for seed in range(seeds):
                sc = make_scene(12.0, RATE, seed=100 * i + seed, voice=voice)
                if rms:
                    noise = ambient(sc.duration, RATE, seed + 7, rms)[:len(sc.samples)]
                    sc.samples = np.clip(sc.samples + noise,
                                         -1, 1).astype(np.float32)
                out.append((f"{voice}/{noise_name}/{seed}", sc))
    return out


def run(sc: Scene, policy: AudioPolicy) -> tuple[np.ndarray, float]:
    red = AudioRedactor(RATE, 1, AudioRedactConfig(policy=policy, key=1234))
    parts = []
    t0 = time.process_time()
    for i in range(0, len(sc.samples), BLOCK):
        parts += [r.samples[:, 0] for r in red.push(sc.samples[i:i + BLOCK, None], i / RATE)]
    parts += [r.samples[:, 0] for r in red.flush()]
    return np.concatenate(parts), (time.process_time() - t0) / sc.duration


def mask(n: int, intervals: list[tuple[float, float]], pad: float = 0.0) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    for a, b in intervals:
        m[max(0, round((a - pad) * RATE)):min(n, round((b + pad) * RATE))] = True
    return m


def score(sc: Scene, y: np.ndarray) -> dict[str, float]:
    n = len(sc.samples)
    speech, siren = mask(n, sc.speech), mask(n, sc.siren)
    near = mask(n, sc.speech, pad=0.6)
    silent = np.abs(y) < SILENT
    same = np.abs(y - sc.samples) < 1e-6
    leads = []
    for a, _ in sc.speech:
        i = round(a * RATE)
        j = i
        while j > 0 and silent[j - 1] and i - j < RATE:  # back from the onset while muted
            j -= 1
        leads.append((i - j) / RATE if silent[i] else -1.0)
    quiet = ~near
    return {"speech_muted": float(silent[speech].mean()), "kept": float(same[quiet].mean()),
            "siren_kept": float(same[siren].mean()) if siren.any() else 1.0,
            "onset_lead_s": float(min(leads)) if leads else 0.0, "speech_s": float(speech.sum() / RATE)}


def av_offset() -> dict[str, object]:
    sc = make_scene(12.0, RATE, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_av_clip(Path(tmp) / "in.mp4", sc, size=(320, 180))
        out = Path(tmp) / "out.mp4"
        subprocess.run([sys.executable, "-m", "stream.cli", "redact", str(src), "-o", str(out), "--preset",
                        "fast", "--no-plates", "--no-heads", "--no-progress"], check=True, cwd=REPO,
                       capture_output=True)
        offsets = read_av(out).offsets()
    return {"offsets_ms": [round(o * 1000, 1) for o in offsets],
            "max_abs_ms": round(max(abs(o) for o in offsets) * 1000, 1) if offsets else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2, help="scenes per voice and noise level (default 2)")
    ap.add_argument("--av", action="store_true", help="also measure lip-sync through `redact`")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "audio.json")
    args = ap.parse_args()
    rows = []
    cpu = {p.value: [] for p in (AudioPolicy.MUTE_SPEECH, AudioPolicy.DISGUISE)}
    for name, sc in scenes(args.seeds):
        y, c = run(sc, AudioPolicy.MUTE_SPEECH)
        cpu[AudioPolicy.MUTE_SPEECH.value].append(c)
        rows.append({"scene": name, **score(sc, y)})
    for _, sc in scenes(1)[:4]:
        cpu[AudioPolicy.DISGUISE.value].append(run(sc, AudioPolicy.DISGUISE)[1])
    total_speech = sum(r["speech_s"] for r in rows)
    summary = {
        "scenes": len(rows),
        "speech_s": round(total_speech, 1),
        "speech_muted": round(sum(r["speech_muted"] * r["speech_s"] for r in rows) / total_speech, 4),
        "worst_scene_speech_muted": round(min(r["speech_muted"] for r in rows), 4),
        "kept": round(float(np.mean([r["kept"] for r in rows])), 4),
        "siren_kept": round(float(np.mean([r["siren_kept"] for r in rows])), 4),
        "min_onset_lead_ms": round(min(r["onset_lead_s"] for r in rows) * 1000),
        "cpu_per_audio_s": {k: round(float(np.median(v)), 4) for k, v in cpu.items()},
    }
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["scene"].rsplit("/", 1)[0], []).append(r)
    print(f"{'voice / noise':24} {'speech muted':>12} {'kept':>6} {'siren kept':>10} {'onset lead':>10}")
    for g, rs in by_group.items():
        sp = sum(r["speech_s"] for r in rs)
        print(f"{g:24} {sum(r['speech_muted'] * r['speech_s'] for r in rs) / sp:12.2%} "
              f"{np.mean([r['kept'] for r in rs]):6.1%} {np.mean([r['siren_kept'] for r in rs]):10.1%} "
              f"{min(r['onset_lead_s'] for r in rs) * 1000:8.0f} ms")
    print(f"{'all':24} {summary['speech_muted']:12.2%} {summary['kept']:6.1%} {summary['siren_kept']:10.1%} "
          f"{summary['min_onset_lead_ms']:8d} ms")
    print("CPU per second of 48 kHz audio, one stream: " +
          ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in summary["cpu_per_audio_s"].items()))
    doc: dict[str, object] = {"summary": summary, "rows": rows, "block_samples": BLOCK, "rate": RATE}
    if args.av:
        doc["av"] = av_offset()
        print(f"A/V offset through `redact` (flash vs beep): {doc['av']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
