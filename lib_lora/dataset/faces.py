"""Finding the main face: YuNet when its model file is present, else OpenCV's Haar cascades.

Both ship with or run through opencv-python-headless, offline. Detection runs on a small
grayscale copy (long side <= DETECT_SIDE); boxes come back in that copy's pixels.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

DETECT_SIDE = 800


@dataclass(frozen=True)
class Face:
    x: float
    y: float
    w: float
    h: float
    score: float

    def scaled(self, fx: float, fy: float) -> Face:
        return Face(self.x * fx, self.y * fy, self.w * fx, self.h * fy, self.score)


@functools.lru_cache(maxsize=2)
def _cascade(name: str) -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / name))
    if cascade.empty():
        raise RuntimeError(f"OpenCV's {name} is missing from this opencv installation")
    return cascade


@functools.lru_cache(maxsize=2)
def _yunet(path: str) -> cv2.FaceDetectorYN:
    return cv2.FaceDetectorYN.create(path, "", (320, 320), 0.7, 0.3, 50)


def find_yunet(face_model: str, model_dir: str | Path | None) -> str | None:
    """The YuNet model to use: the configured file, else one found in `model_dir`, else None."""
    if face_model:
        return face_model if Path(face_model).is_file() else None
    if model_dir and Path(model_dir).is_dir():
        found = sorted(Path(model_dir).glob("face_detection_yunet*.onnx"))
        if found:
            return str(found[-1])
    return None


def detect_faces(rgb: np.ndarray, yunet_path: str | None = None) -> list[Face]:
    """Faces in an RGB uint8 array, largest first, in that array's pixel coordinates."""
    h, w = rgb.shape[:2]
    f = min(1.0, DETECT_SIDE / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    faces = None
    if yunet_path:
        try:
            faces = _detect_yunet(small, yunet_path)
        except cv2.error:  # an unreadable or incompatible model file: the cascades still work
            log.warning("YuNet model %s could not be used; using OpenCV's Haar cascades.", yunet_path)
    if faces is None:
        faces = _detect_haar(small)
    faces = [face.scaled(1 / f, 1 / f) for face in faces]
    return sorted(faces, key=lambda face: face.w * face.h, reverse=True)


def _detect_haar(rgb: np.ndarray) -> list[Face]:
    gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    side = min(gray.shape)
    min_size = max(20, int(side * 0.05))
    found = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.15, minNeighbors=5, minSize=(min_size, min_size)
    )
    if len(found) == 0:  # a face turned away: try the profile cascade, both directions
        prof = _cascade("haarcascade_profileface.xml")
        found = list(prof.detectMultiScale(gray, 1.15, 5, minSize=(min_size, min_size)))
        flipped = prof.detectMultiScale(gray[:, ::-1].copy(), 1.15, 5, minSize=(min_size, min_size))
        found += [(gray.shape[1] - x - fw, y, fw, fh) for x, y, fw, fh in flipped]
    return [Face(float(x), float(y), float(fw), float(fh), 1.0) for x, y, fw, fh in found]


def _detect_yunet(rgb: np.ndarray, path: str) -> list[Face]:
    det = _yunet(path)
    h, w = rgb.shape[:2]
    det.setInputSize((w, h))
    _, rows = det.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if rows is None:
        return []
    return [Face(float(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[-1])) for r in rows]
