"""SAM 2's answer on one frame while the reviewer clicks: the app's only model user.

The run's own model (pipeline/stages/models.load_model with the run's model config: same weights, same
image size, random weights labelled so) is wrapped in sam2's SAM2ImagePredictor, which shares the video
predictor's image encoder and mask decoder (SAM2VideoPredictor is a SAM2Base). The frame's embedding is
computed once per frame (`set_frame`) and every click after that only runs the prompt encoder and the mask
decoder, so the answer comes back at once, as the sam2 web demo's `addPoints` does.

Candidates are sam2's multimask output (multimask_output=True: three masks with their predicted IoU),
each with the shape figures the run's quality signals use (area in pixels, perimeter as the summed
cv2.arcLength of its contours, pipeline/quality/signals.shape_of) and the time the call took, so the
reviewer picks with the same numbers the queue ranks by. Corrections store the prompts, not these pixels
(pipeline/review/records.py): refine replays them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from pipeline.quality.signals import shape_of


@dataclass(frozen=True)
class Candidate:
    index: int  # sam2's multimask output index: the `candidate` a correction records
    mask: np.ndarray  # bool (H, W), the frame's (= the stored masks') pixels
    score: float  # SAM 2's predicted IoU
    area: int
    perimeter: float


@dataclass(frozen=True)
class FrameAnswer:
    candidates: list[Candidate]  # best score first
    ms: float  # the prompt-to-masks call alone (the frame's embedding is timed in `embed_ms`)
    embed_ms: float


class FramePredictor:
    """One model, many frames: `predict(item_id, frame, rgb, points, labels, box)` embeds the frame when it
    is not the one embedded last, then answers the prompts. Thread-safe (Streamlit serves every session from
    threads of one process, and the model is shared through st.cache_resource): one call at a time, as the
    sam2 demo's inference lock does."""

    def __init__(self, model_cfg) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        from pipeline.stages.models import load_model

        self.loaded = load_model(model_cfg)
        self.loaded.predictor.eval()
        self._image = SAM2ImagePredictor(self.loaded.predictor)
        # sam2 hard-codes the backbone's feature sizes for image_size 1024; a run at another size (the tests'
        # 256) needs them scaled, or set_image fails reshaping the features.
        size = int(self.loaded.image_size)
        self._image._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self._key: tuple[str, int] | None = None
        self._embed_ms = 0.0
        self._lock = threading.Lock()

    @property
    def random_weights(self) -> bool:
        return self.loaded.random_weights

    def predict(self, item_id: str, frame: int, rgb: np.ndarray, points: list[tuple[float, float]],
                labels: list[int], box: tuple[float, float, float, float] | None = None) -> FrameAnswer:
        import torch

        if not points and box is None:
            raise ValueError("a prediction needs at least one point or a box")
        with self._lock, torch.inference_mode():
            embed_ms = 0.0
            if self._key != (item_id, frame):
                t0 = time.perf_counter()
                self._image.set_image(np.ascontiguousarray(rgb[..., :3]))
                embed_ms = (time.perf_counter() - t0) * 1000
                self._key = (item_id, frame)
            t0 = time.perf_counter()
            masks, scores, _ = self._image.predict(
                point_coords=np.asarray(points, dtype=np.float32) if points else None,
                point_labels=np.asarray(labels, dtype=np.int32) if points else None,
                box=np.asarray(box, dtype=np.float32) if box is not None else None,
                multimask_output=True,
            )
            ms = (time.perf_counter() - t0) * 1000
        candidates = []
        for k in range(len(scores)):
            mask = np.asarray(masks[k]) > 0
            shape = shape_of(mask)
            candidates.append(Candidate(k, mask, float(scores[k]), int(shape.area), float(shape.perimeter)))
        candidates.sort(key=lambda c: -c.score)
        return FrameAnswer(candidates, ms, embed_ms)
