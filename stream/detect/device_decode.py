"""Decoding on the device: threshold, top-K, boxes and NMS in torch, one small tensor back per batch.

The host decoders (:meth:`OnnxDetector.decode`) need each model's whole output on the host: 21 MB
of CenterFace heatmaps for a batch of 32 at 1080p, and about half a millisecond of Python per
frame holding the GIL. Here the same steps run on the device as fixed-shape tensor operations (no
data-dependent shapes, no host reads, so they can sit inside a captured CUDA graph) and give one
``(batch, K + 1, 6)`` tensor: row 0 of each frame is a header (candidates above threshold,
whether the NMS result is certified), rows 1..K are ``x1, y1, x2, y2, score, class`` on the
canvas, score 0 where nothing was kept.

Nothing is dropped silently: a frame with more than K candidates above its threshold, or whose
NMS did not reach its fixed point within the iterations allowed, is reported as not decoded, and
the caller decodes that frame on the host from the raw outputs (:func:`unpack` returns None).

NMS is Cluster-NMS: with candidates sorted by score, ``keep[i] = not any(keep[j] and iou(j, i) >
t for j < i)`` is iterated from "keep all". Its fixed point is unique and is exactly greedy NMS's
result (by induction over i), and one more iteration that changes nothing certifies it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stream.detect.base import Group

DEFAULT_K = 128
"""candidates per frame and model after the score threshold (a crowd of 40 faces leaves about 100
CenterFace peaks above 0.35); a frame with more is decoded on the host"""
NMS_ITERATIONS = 12
"""Cluster-NMS iterations before the certifying one; chains of suppression longer than this are
rare (the host decodes the frame then)"""


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (B, K, 4) and (B, M, 4) boxes: (B, K, M), the host rule (area floor 1e-6)."""
    x1 = torch.maximum(a[:, :, None, 0], b[:, None, :, 0])
    y1 = torch.maximum(a[:, :, None, 1], b[:, None, :, 1])
    x2 = torch.minimum(a[:, :, None, 2], b[:, None, :, 2])
    y2 = torch.minimum(a[:, :, None, 3], b[:, None, :, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-6)


def cluster_nms(boxes: torch.Tensor, valid: torch.Tensor, classes: torch.Tensor, iou_thr: float,
                iterations: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS per class of score-sorted candidates, as fixed-shape tensor ops.

    ``boxes`` (B, K, 4), ``valid`` and ``classes`` (B, K), sorted by score, highest first. Returns
    ``keep`` (B, K) and ``certified`` (B,): True where ``keep`` is greedy NMS's exact result.
    """
    iterations = NMS_ITERATIONS if iterations is None else iterations
    k = boxes.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)  # [j, i]: j before i
    sup = (box_iou(boxes, boxes) > iou_thr) & earlier & (classes[:, :, None] == classes[:, None, :])
    sup &= valid[:, :, None] & valid[:, None, :]
    keep = valid
    for _ in range(iterations):
        keep = valid & ~(sup & keep[:, :, None]).any(1)
    again = valid & ~(sup & keep[:, :, None]).any(1)
    return keep, (again == keep).all(1)


def select(scores: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, thresholds: torch.Tensor,
           iou_thr: float, k: int = DEFAULT_K) -> torch.Tensor:
    """Per frame: candidates at or above their class's threshold, the ``k`` best, NMS; packed.

    ``scores`` (B, N), ``boxes`` (B, N, 4) canvas pixels, ``classes`` (B, N) long, ``thresholds``
    one per class. Returns (B, k + 1, 6) float32 as the module docstring describes.
    """
    b, n = scores.shape
    k = min(k, n)
    above = scores >= thresholds[classes]
    count = above.sum(1)
    masked = torch.where(above, scores, torch.full_like(scores, -1.0))
    # a stable sort keeps equal scores in anchor order, as a stable host sort would
    top, idx = torch.sort(masked, dim=1, descending=True, stable=True)
    top, idx = top[:, :k], idx[:, :k]
    valid = top >= 0
    sel_boxes = torch.gather(boxes, 1, idx[:, :, None].expand(b, k, 4))
    sel_classes = torch.gather(classes, 1, idx)
    keep, certified = cluster_nms(sel_boxes, valid, sel_classes, iou_thr)
    rows = torch.cat([sel_boxes, torch.where(keep, top, torch.zeros_like(top))[:, :, None],
                      sel_classes[:, :, None].to(sel_boxes.dtype)], 2)
    header = torch.zeros(b, 1, 6, dtype=rows.dtype, device=rows.device)
    header[:, 0, 0] = count.to(rows.dtype)
    header[:, 0, 1] = certified.to(rows.dtype)
    header[:, 0, 2] = float(k)
    return torch.cat([header, rows], 1).float()


def unpack(packed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Per frame of a downloaded :func:`select` result: (boxes, scores, classes) of the kept
    candidates, or None where the frame must be decoded on the host (overflow, not certified)."""
    out: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    for frame in packed:
        count, certified, k = frame[0, 0], frame[0, 1], frame[0, 2]
        if count > k or certified < 0.5:
            out.append(None)
            continue
        rows = frame[1:]
        kept = rows[:, 4] > 0
        out.append((rows[kept, :4].astype(np.float32), rows[kept, 4].astype(np.float32),
                    rows[kept, 5].astype(np.int64)))
    return out


# -- the models' heads -----------------------------------------------------------------------------

def yolo_candidates(out: torch.Tensor, groups: Sequence[Group]) -> tuple[torch.Tensor, ...]:
    """A YOLOv8 head (B, 4 + rows, A): per group and anchor a score, the anchor's box, the group."""
    cx, cy, w, h = out[:, 0], out[:, 1], out[:, 2], out[:, 3]
    box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 2)  # (B, A, 4)
    scores = [out[:, g.start:g.stop].amax(1) for g in groups]
    b, a = box.shape[:2]
    # expand, not repeat_interleave: that one may read its output size back from the device
    g = len(groups)
    classes = torch.arange(g, device=out.device)[:, None].expand(g, a).reshape(1, g * a).expand(b, -1)
    return torch.cat(scores, 1), box.repeat(1, len(groups), 1), classes


def centerface_candidates(heat: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                          stride: int) -> tuple[torch.Tensor, ...]:
    """CenterFace's stride-4 heatmap (B, 1, h, w), log sizes and offsets: a box per cell."""
    b, _, h, w = heat.shape
    ys = torch.arange(h, device=heat.device, dtype=heat.dtype)[:, None].expand(h, w)
    xs = torch.arange(w, device=heat.device, dtype=heat.dtype)[None, :].expand(h, w)
    sh = torch.exp(scale[:, 0]) * stride
    sw = torch.exp(scale[:, 1]) * stride
    cy = (ys + offset[:, 0] + 0.5) * stride
    cx = (xs + offset[:, 1] + 0.5) * stride
    box = torch.stack([cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2], -1).reshape(b, h * w, 4)
    classes = torch.zeros(b, h * w, dtype=torch.long, device=heat.device)
    return heat.reshape(b, h * w), box, classes


def yunet_candidates(named: dict[str, torch.Tensor], n: int, canvas: tuple[int, int],
                     strides: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """YuNet's three heads (batch folded into the anchor axis): score sqrt(cls * obj), a box per
    grid cell of each stride."""
    h, w = canvas
    scores, boxes = [], []
    for s in strides:
        rows, cols = h // s, w // s
        cls = named[f"cls_{s}"].reshape(n, -1).clamp(0, 1)
        obj = named[f"obj_{s}"].reshape(n, -1).clamp(0, 1)
        bb = named[f"bbox_{s}"].reshape(n, -1, 4)
        r = torch.arange(rows, device=bb.device, dtype=bb.dtype)[:, None].expand(rows, cols).reshape(-1)
        c = torch.arange(cols, device=bb.device, dtype=bb.dtype)[None, :].expand(rows, cols).reshape(-1)
        cx = (c + bb[..., 0]) * s
        cy = (r + bb[..., 1]) * s
        bw = torch.exp(bb[..., 2]) * s
        bh = torch.exp(bb[..., 3]) * s
        boxes.append(torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1))
        scores.append(torch.sqrt(cls * obj))
    score = torch.cat(scores, 1)
    return score, torch.cat(boxes, 1), torch.zeros_like(score, dtype=torch.long)
