"""Scene cuts with PySceneDetect's ContentDetector, fed small frames we already decoded.

Why PySceneDetect and why this way (measured on bikes.mp4, 250 frames 640x272, 2 busy cores):
PyAV decode alone took ~0.30 s; ContentDetector on 64-128 px wide BGR frames added ~0.05 s
(0.2 ms/frame, its HSV conversion is OpenCV) and found the clip's 5 cuts, the same frames a
numpy mean-abs-HSV-difference of our own found. The detector is not the cost; getting small
frames out of the decoder is: a fresh ``frame.reformat`` per frame builds a new swscale context
(+1 ms/frame), so one ``VideoReformatter`` is reused per video. We use the library's detector
rather than our own so its tuned default threshold and flash filter apply, and drive it frame by
frame (``SUPPRESS`` mode reports a cut on the frame it happens), so clips are cut while streaming
and a long video never has to sit in memory.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scenedetect.common import FrameTimecode
from scenedetect.detector import FlashFilter
from scenedetect.detectors import ContentDetector


class SceneCuts:
    """Streaming cut detector: ``is_cut(index, small_bgr)`` is True on a scene's first frame."""

    def __init__(self, threshold: float, min_scene_s: float, rate: float) -> None:
        self._rate = Fraction(rate).limit_denominator(1001) if rate > 0 else Fraction(25)
        self._detector = ContentDetector(
            threshold=threshold,
            min_scene_len=float(min_scene_s),
            filter_mode=FlashFilter.Mode.SUPPRESS,
        )

    def is_cut(self, index: int, small_bgr: np.ndarray) -> bool:
        """Feed frame ``index`` (``H W 3`` uint8 BGR, small); True if a new scene starts here."""
        cuts = self._detector.process_frame(FrameTimecode(index, fps=self._rate), small_bgr)
        return bool(cuts)
