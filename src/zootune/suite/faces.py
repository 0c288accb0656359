"""The ``landmarks`` target: generated cartoon faces with known landmarks.

No face-landmark set can be downloaded here, so the ``landmarks`` target is rendered by code
(:func:`face_scenes`): one face per 32x32 RGB image with 8 landmarks

| index | landmark | drawn as |
|---|---|---|
| 0, 1 | left / right eye (pupil centre) | white eye ellipse with a dark pupil disk |
| 2 | nose tip | small disk, darker than the skin |
| 3, 4 | left / right mouth corner | a curved lip band (smile or frown) |
| 5 | chin | bottom of the head ellipse |
| 6, 7 | left / right eyebrow centre | short bar in the hair colour |

("left" is image-left for an upright face: the subject's right, as in 300W's numbering.) Each face
varies in pose (roll -30..30 degrees, scale, translation, yaw up to ~30 degrees by foreshortening the
face and shifting its features by their depth), shape (head aspect, eye spacing, mouth width and
curvature, hair), colour (skin tones plus some cartoon colours, hair, eyes, lips), lighting (a linear
illumination gradient, brightness, contrast, sensor noise), background (smooth colour fields,
stripes, checks or blotchy clutter) and occlusion (in ~35% of images a bar or disk covers part of the
face; the covered landmarks keep their true positions, as in COFW). Coordinates are in [0, 1]: x / width,
y / height, pixel centres at (i + 0.5) / size.

Why no MiniZoo member has seen such images: the ``shape-keypoints`` member is pretrained on single
filled convex *polygons* on a smooth colour field, with heatmaps of their *corners*; these faces are
ellipses with inner parts on textured backgrounds, and the points are the centres of parts (pupils,
nose, brows), mouth corners and the chin -- not polygon corners. No other member sees faces or
keypoints. What transfers is the skill (finding parts and points), not the images.

Augmentation: none for this target. A horizontal flip would have to swap every left/right index pair
and mirror x; a crop would have to move the points -- and the generator already varies pose, so the
training split gets no geometric transform (see ``docs/landmarks.md``).

Users' own landmark data (300W-style ``.pts`` files) is read by :mod:`zootune.data.landmarks`.
"""

from __future__ import annotations


import numpy as np

from zootune.suite import render

LANDMARK_NAMES = (
    "left_eye", "right_eye", "nose_tip", "left_mouth_corner", "right_mouth_corner", "chin",
    "left_brow", "right_brow",
)
NUM_LANDMARKS = len(LANDMARK_NAMES)
GENERATOR_VERSION = 1  # bump when face_scenes changes, so cached arrays are regenerated
EYE_INDICES = (0, 1)

# Part labels of the optional part map (which feature covers each output pixel).
PARTS = ("background", "skin", "hair", "eye_white", "pupil", "brow", "nose", "mouth", "occluder")

# Face-frame coordinates (u to the image-right of an upright face, v down; unit = head half-height)
# and depth z (how far a feature moves sideways under yaw: the nose sticks out most).
_EYE_V, _EYE_Z = -0.16, 0.75
_BROW_V, _BROW_Z = -0.42, 0.7
_NOSE_V, _NOSE_Z = 0.16, 1.0
_MOUTH_V, _MOUTH_Z = 0.5, 0.7




def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


class _FacePose:
    """Maps face-frame points (u, v, depth z) to image pixels and image pixels back to the face frame.

    image = centre + R(roll) @ (scale * (u * cos(yaw) + z * sin(yaw)), scale * v)

    so yaw foreshortens the face horizontally and shifts each feature by its depth.
    """

    def __init__(self, centre: np.ndarray, scale: float, roll: float, yaw: float):
        self.centre, self.scale, self.roll, self.yaw = centre, scale, roll, yaw
        self.rotation = _rotation(roll)

    def to_image(self, u: float, v: float, z: float) -> np.ndarray:
        local = self.scale * np.array([u * np.cos(self.yaw) + z * np.sin(self.yaw), v])
        return self.centre + self.rotation @ local

    def to_face(self, x: np.ndarray, y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        """Face-frame (u, v) of image points (x, y) for features at depth z (inverse of to_image)."""
        dx, dy = x - self.centre[0], y - self.centre[1]
        c, s = np.cos(self.roll), np.sin(self.roll)
        a = (c * dx + s * dy) / self.scale  # R(roll)^T
        b = (-s * dx + c * dy) / self.scale
        return (a - z * np.sin(self.yaw)) / np.cos(self.yaw), b


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _background(rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth colour field, optionally with stripes, checks or blotchy clutter laid over it."""
    canvas = 0.15 + 0.7 * render.smooth_noise(rng, size, cells=int(rng.integers(2, 6)))
    kind = int(rng.integers(4))
    colour = rng.uniform(0, 1, 3)
    if kind == 1:  # stripes at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    elif kind == 2:  # checks
        period = rng.uniform(4, 9)
        pattern = (np.floor(x / period) + np.floor(y / period)) % 2
    elif kind == 3:  # blotchy clutter
        pattern = render.smooth_noise(rng, size, cells=int(rng.integers(8, 14)), channels=1)[..., 0]
    else:
        return canvas
    weight = rng.uniform(0.3, 0.7)
    return (1 - weight * pattern[..., None]) * canvas + weight * pattern[..., None] * colour


def _skin_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.uniform() < 0.2:  # cartoon colours, so colour alone never says "face"
        return rng.uniform(0.35, 0.95, 3)
    tone = rng.uniform()
    dark, light = np.array([0.45, 0.3, 0.2]), np.array([0.98, 0.84, 0.72])
    return np.clip(dark + tone * (light - dark) + rng.uniform(-0.05, 0.05, 3), 0, 1)


class _FaceDrawing:
    """A face being drawn on the supersampled pixel grid (``x``, ``y``): colours, the index in
    :data:`PARTS` of what covers each pixel, and the landmarks (K, 2) in pixels."""

    def __init__(self, x: np.ndarray, y: np.ndarray, canvas: np.ndarray, pose: _FacePose):
        self.x, self.y, self.canvas, self.pose = x, y, canvas, pose
        self.parts = np.zeros(x.shape, np.int64)
        self.points = np.zeros((NUM_LANDMARKS, 2))

    def face_frame(self, z: float) -> tuple[np.ndarray, np.ndarray]:
        """Face-frame (u, v) of every pixel, for features at depth ``z``."""
        return self.pose.to_face(self.x, self.y, z)

    def paint(self, mask: np.ndarray, colour, part: str) -> None:
        self.canvas[mask] = colour
        self.parts[mask] = PARTS.index(part)


def _random_pose(rng: np.random.Generator, size: int) -> _FacePose:
    """A pose whose head (half-height ``scale`` pixels) keeps every landmark inside the image; redrawn
    up to 100 times (the last draw is kept if none fits)."""
    for _attempt in range(100):
        scale = rng.uniform(0.28, 0.4) * size
        roll = np.deg2rad(rng.uniform(-30, 30))
        yaw = np.deg2rad(rng.uniform(-30, 30))
        centre = rng.uniform(0.3, 0.7, 2) * size
        pose = _FacePose(centre, scale, roll, yaw)
        chin = pose.to_image(0.0, 1.0, 0.0)
        top = pose.to_image(0.0, -1.0, 0.0)
        if min(chin.min(), top.min()) > 1.0 and max(chin.max(), top.max()) < size - 1.0:
            break
    return pose


def _draw_head(rng: np.random.Generator, face: _FaceDrawing, aspect: float, skin: np.ndarray,
               hair: np.ndarray) -> None:
    """The head: an ellipse foreshortened by yaw (depth 0: the outline does not shift), maybe hair."""
    u, v = face.face_frame(0.0)
    head = _ellipse(u, v, 0.0, 0.0, aspect, 1.0)
    face.paint(head, skin, "skin")
    if rng.uniform() < 0.7:  # hair: the top of the head above a wavy line
        hairline = -0.62 + 0.08 * np.sin(u * rng.uniform(4, 9) + rng.uniform(0, 2 * np.pi))
        face.paint(head & (v < hairline), hair, "hair")


def _draw_eyes(rng: np.random.Generator, face: _FaceDrawing, eye_u: float) -> None:
    """Landmarks 0, 1: white eye ellipses, each with a dark pupil disk at the landmark."""
    eye_white = rng.uniform(0.82, 1.0, 3)
    pupil_colour = rng.uniform(0.0, 0.2, 3)
    pupil_radius = max(0.85, rng.uniform(0.06, 0.09) * face.pose.scale)  # >= 0.85 px: the centre pixel is all pupil
    u, v = face.face_frame(_EYE_Z)
    for index, side in ((0, -1.0), (1, 1.0)):
        face.paint(_ellipse(u, v, side * eye_u, _EYE_V, 0.16, 0.1), eye_white, "eye_white")
        gaze = rng.uniform(-0.05, 0.05)  # pupil slightly off the eye's centre
        face.points[index] = face.pose.to_image(side * eye_u + gaze, _EYE_V, _EYE_Z)
        px, py = face.points[index]
        face.paint(render.coverage(render.disk_distance(face.x, face.y, px, py, pupil_radius)), pupil_colour,
                   "pupil")


def _draw_brows(rng: np.random.Generator, face: _FaceDrawing, eye_u: float, hair: np.ndarray) -> None:
    """Landmarks 6, 7: short bars above the eyes, in a darker hair colour."""
    u, v = face.face_frame(_BROW_Z)
    brow_tilt = rng.uniform(-0.3, 0.3)
    for index, side in ((6, -1.0), (7, 1.0)):
        cu = side * eye_u
        # a short bar, tilted symmetrically (both inner ends up or down)
        bar_v = v - _BROW_V - side * brow_tilt * (u - cu)
        face.paint((np.abs(u - cu) <= 0.17) & (np.abs(bar_v) <= 0.09), hair * 0.8, "brow")
        face.points[index] = face.pose.to_image(cu, _BROW_V, _BROW_Z)


def _draw_nose(rng: np.random.Generator, face: _FaceDrawing, skin: np.ndarray) -> None:
    """Landmark 2: a small disk darker than the skin."""
    nose_colour = np.clip(skin * rng.uniform(0.55, 0.8) + np.array([0.08, 0.0, 0.0]), 0, 1)
    face.points[2] = face.pose.to_image(0.0, _NOSE_V, _NOSE_Z)
    nose_radius = max(0.9, rng.uniform(0.08, 0.12) * face.pose.scale)
    face.paint(render.coverage(render.disk_distance(face.x, face.y, *face.points[2], nose_radius)), nose_colour,
               "nose")


def _draw_mouth(rng: np.random.Generator, face: _FaceDrawing, mouth_u: float, smile: float) -> None:
    """Landmarks 3, 4 (mouth corners) on a curved lip band, and 5, the chin."""
    u, v = face.face_frame(_MOUTH_Z)
    lips = np.array([rng.uniform(0.45, 0.85), rng.uniform(0.05, 0.3), rng.uniform(0.1, 0.35)])
    t = np.clip(u / mouth_u, -1.0, 1.0)
    middle = _MOUTH_V + smile * (1 - t**2)
    thickness = 0.06 + rng.uniform(0.03, 0.07) * (1 - t**2)
    mouth = (np.abs(u) <= mouth_u) & (np.abs(v - middle) <= thickness)
    face.paint(mouth, lips, "mouth")
    face.points[3] = face.pose.to_image(-mouth_u, _MOUTH_V, _MOUTH_Z)
    face.points[4] = face.pose.to_image(mouth_u, _MOUTH_V, _MOUTH_Z)
    face.points[5] = face.pose.to_image(0.0, 1.0, 0.0)


def _draw_occluder(rng: np.random.Generator, face: _FaceDrawing, skin: np.ndarray) -> None:
    """A disk or a bar near a random landmark (a hand, a scarf, a cup), in a colour unlike the skin."""
    x, y, scale = face.x, face.y, face.pose.scale
    anchor = face.points[rng.integers(NUM_LANDMARKS)] + rng.normal(0, 0.15 * scale, 2)
    colour = render.random_color(rng, skin, min_dist=0.3)
    if rng.uniform() < 0.5:
        occluder = render.disk_distance(x, y, *anchor, rng.uniform(0.2, 0.4) * scale) >= 0
    else:
        angle = rng.uniform(0, np.pi)
        along = (x - anchor[0]) * np.cos(angle) + (y - anchor[1]) * np.sin(angle)
        across = -(x - anchor[0]) * np.sin(angle) + (y - anchor[1]) * np.cos(angle)
        occluder = ((np.abs(along) <= rng.uniform(0.4, 0.9) * scale)
                    & (np.abs(across) <= rng.uniform(0.12, 0.25) * scale))
    face.paint(occluder, colour, "occluder")


def _lit_output(rng: np.random.Generator, face: _FaceDrawing, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, part map) at the output size, the image lit: a linear illumination gradient times
    a brightness, then contrast about the mean, then sensor noise -- applied to everything, so no
    part has a fixed colour."""
    x, y = face.x, face.y
    direction = _rotation(rng.uniform(0, 2 * np.pi)) @ np.array([1.0, 0.0])
    gradient = ((x - size / 2) * direction[0] + (y - size / 2) * direction[1]) / size
    canvas = face.canvas * (rng.uniform(0.7, 1.15) + rng.uniform(0.0, 0.6) * gradient)[..., None]
    mean = canvas.mean(axis=(0, 1))
    canvas = mean + rng.uniform(0.7, 1.2) * (canvas - mean)
    image = render.downsample(canvas)
    image = image + rng.normal(0, rng.uniform(0.0, 0.03), image.shape)
    part_map = render.downsample(np.eye(len(PARTS), dtype=np.float32)[face.parts]).argmax(-1)
    return render.to_uint8(image), part_map


def render_face(
    rng: np.random.Generator, size: int = 32, occlusion_prob: float = 0.35
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One face: uint8 image (size, size, 3), landmarks (K, 2) in pixels, part map (size, size) int64.

    The part map gives, per output pixel, the index in :data:`PARTS` of the part covering most of it.
    """
    # Every random draw happens in a fixed order (pose, shape, background, colours, parts from the
    # back to the front, occlusion, lighting): the same rng state gives the same face.
    x, y = render.pixel_grid(size)
    pose = _random_pose(rng, size)
    aspect = rng.uniform(0.7, 0.88)  # head half-width / half-height
    eye_u = rng.uniform(0.3, 0.4)
    mouth_u = rng.uniform(0.22, 0.34)
    smile = rng.uniform(-0.08, 0.16)  # > 0: the lip band sags in the middle (a smile)

    face = _FaceDrawing(x, y, _background(rng, size, x, y), pose)
    skin = _skin_colour(rng)
    hair = rng.uniform(0, 0.45, 3) * rng.uniform(0.3, 1.0)
    _draw_head(rng, face, aspect, skin, hair)
    _draw_eyes(rng, face, eye_u)
    _draw_brows(rng, face, eye_u, hair)
    _draw_nose(rng, face, skin)
    _draw_mouth(rng, face, mouth_u, smile)
    if rng.uniform() < occlusion_prob:
        _draw_occluder(rng, face, skin)
    image, part_map = _lit_output(rng, face, size)
    return image, face.points, part_map


def face_scenes(
    n: int, seed: int, size: int = 32, occlusion_prob: float = 0.35, return_parts: bool = False
):
    """``n`` faces from ``numpy.random.default_rng(seed)``: uint8 images (n, size, size, 3) and
    float32 landmarks (n, K, 2) in [0, 1] (x / size, y / size); with ``return_parts`` also the part
    maps (n, size, size) (indices into :data:`PARTS`)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    landmarks = np.empty((n, NUM_LANDMARKS, 2), np.float32)
    part_maps = np.empty((n, size, size), np.int64)
    for i in range(n):
        images[i], points, part_maps[i] = render_face(rng, size, occlusion_prob)
        landmarks[i] = points / size
    return (images, landmarks, part_maps) if return_parts else (images, landmarks)
