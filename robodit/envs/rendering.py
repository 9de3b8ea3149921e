"""Fast offscreen RGB rendering of any MuJoCo model/data (Meta-World now, robosuite later).

Why this exists: the default MJCF visual quality (4096 shadow map, 4x MSAA, reflections) renders at 6-20 fps
on a CPU; with those off it is 5-10x faster, and 84 px policy images lose nothing that matters.
The quality settings are read when the GL context is created, so they are written on the model before the
first `mujoco.Renderer` exists.

Orientation: `mujoco.Renderer` already turns OpenGL's bottom-up rows into a top-down image, so its output is
what the camera sees. Meta-World's corner cameras are mounted rolled by 180 degrees (their image-up axis
points at the floor), which is why their frames look upside down. A plain vertical flip (`img[::-1]`) would
make them look upright but mirrored left-right; the correct fix is a 180-degree rotation. We decide it per
camera from its pose: if the camera's image-up axis points downwards in the world, the frame is rotated.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref

# MuJoCo picks its GL backend when it is first imported; headless machines need EGL.
os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

CameraRef = str | int


def _headless_fallback() -> None:
    """If mujoco was imported before MUJOCO_GL was set, it chose GLFW, which fails with no display: use EGL."""
    from mujoco import gl_context

    chose_glfw = getattr(gl_context, "_MUJOCO_GL", None) == "" and getattr(
        gl_context.GLContext, "__module__", ""
    ).startswith("mujoco.glfw")
    if chose_glfw and sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        try:
            from mujoco.egl import GLContext
        except Exception:  # no EGL either: leave MuJoCo's choice and its own error message
            return
        gl_context.GLContext = GLContext


_headless_fallback()

# Live renderers are closed at exit *before* MuJoCo's EGL hook terminates the display (that hook is registered
# when the first GL context is made, so ours is registered after our first renderer: atexit runs LIFO).
# Otherwise a renderer garbage-collected after it prints EGL errors at shutdown.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK = False


def _close_all() -> None:
    for r in list(_LIVE):
        try:
            r.close()
        except Exception:
            pass


def configure_fast_quality(model: mujoco.MjModel, max_size: int = 0) -> None:
    """No shadow map, no MSAA; offscreen buffer at least `max_size`. Must run before a GL context exists."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    if max_size:
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), max_size)
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), max_size)


class FastRenderer:
    """Upright uint8 RGB frames from named cameras of one (model, data) pair.

    One `mujoco.Renderer` (one GL context) per image size serves every camera of that size; the camera id and
    its orientation fix are cached per (size, camera), decided once so a frame never flips between steps.
    `fast=False` keeps the model's own quality (for comparisons and pretty videos); `fast` also culls geoms
    outside the camera's view (`_cull`). `hidden_groups` are geom
    groups not drawn (robosuite's own renderer hides group 0, the collision geoms). `orient=False` returns what
    the camera sees as MuJoCo renders it, with no per-camera rotation (for a caller with its own convention).
    """

    def __init__(self, model: mujoco.MjModel, data: mujoco.MjData, fast: bool = True, max_size: int = 0,
                 hidden_groups: tuple[int, ...] = (), orient: bool = True, cull: bool | None = None):
        self.model, self.data, self.fast, self.orient = model, data, fast, orient
        self.cull = fast if cull is None else cull
        self.option = None
        if hidden_groups:
            self.option = mujoco.MjvOption()
            for g in hidden_groups:
                self.option.geomgroup[g] = 0
        if fast:
            configure_fast_quality(model, max_size)
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._cameras: dict[tuple[int, int, CameraRef], tuple[int, bool]] = {}
        _LIVE.add(self)

    def camera_names(self) -> list[str]:
        return [mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(self.model.ncam)]

    def camera_id(self, camera: CameraRef) -> int:
        if isinstance(camera, (int, np.integer)):
            cam_id = int(camera)
            if not -1 <= cam_id < self.model.ncam:
                raise ValueError(f"camera id {cam_id} out of range (model has {self.model.ncam} cameras)")
            return cam_id
        cam_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if cam_id < 0:
            raise ValueError(f"unknown camera {camera!r}; the model has {self.camera_names()}")
        return cam_id

    def needs_rotation(self, cam_id: int) -> bool:
        """True when the camera's image-up axis (its local +y) points below the horizon in the world."""
        if cam_id < 0:  # the free camera is always upright
            return False
        if not self.data.cam_xmat[cam_id].any():  # data not forwarded yet
            mujoco.mj_forward(self.model, self.data)
        up_world_z = self.data.cam_xmat[cam_id].reshape(3, 3)[2, 1]
        return bool(up_world_z < 0.0)

    def _renderer(self, height: int, width: int) -> mujoco.Renderer:
        key = (height, width)
        r = self._renderers.get(key)
        if r is None:
            g = self.model.vis.global_
            if g.offwidth < width or g.offheight < height:  # the offscreen buffer is sized at context creation
                g.offwidth, g.offheight = max(int(g.offwidth), width), max(int(g.offheight), height)
            r = mujoco.Renderer(self.model, height=height, width=width)
            global _EXIT_HOOK
            if not _EXIT_HOOK:
                atexit.register(_close_all)
                _EXIT_HOOK = True
            if self.fast:
                r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                r.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            self._renderers[key] = r
        return r

    def _camera(self, height: int, width: int, camera: CameraRef) -> tuple[int, bool]:
        key = (height, width, camera)
        cam = self._cameras.get(key)
        if cam is None:
            cam_id = self.camera_id(camera)
            cam = self._cameras[key] = (cam_id, self.orient and self.needs_rotation(cam_id))
        return cam

    def render(
        self, camera: CameraRef, size: int | tuple[int, int], *, segmentation: bool = False
    ) -> np.ndarray:
        """Upright frame [H, W, 3] uint8 (or [H, W, 2] int32 geom ids/types with `segmentation=True`)."""
        height, width = (size, size) if isinstance(size, (int, np.integer)) else size
        r = self._renderer(int(height), int(width))
        cam_id, rotate = self._camera(int(height), int(width), camera)
        r.update_scene(self.data, camera=cam_id, scene_option=self.option)
        if self.fast:  # update_scene keeps scene flags, but be robust to anyone else toggling them
            r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            r.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        if self.cull:
            self._cull(r.scene, width / height)
        if segmentation:
            r.enable_segmentation_rendering()
            try:
                img = r.render()
            finally:
                r.disable_segmentation_rendering()
        else:
            img = r.render()
        if rotate:
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img)

    def _cull(self, scene, aspect: float) -> None:
        """Drop geoms whose bounding sphere lies wholly outside the camera's view (type -> mjGEOM_NONE, which
        mjr_render skips). A software renderer transforms every vertex of every geom it is given, seen or not:
        LIBERO's wrist camera sees a few of its ~300k mesh faces and costs half as much culled. Pixel-identical
        (a test checks it): nothing outside the frustum can reach the image once shadows and reflections are off.
        Only the plain perspective frustum is handled; other cameras are left alone."""
        cam = scene.camera[0]
        if cam.orthographic or cam.frustum_width or cam.frustum_center or cam.frustum_near <= 0:
            return
        ty = max(abs(cam.frustum_top), abs(cam.frustum_bottom)) / cam.frustum_near
        tx = ty * aspect
        kx, ky = np.sqrt(1 + tx * tx), np.sqrt(1 + ty * ty)  # a sphere's reach across the tilted side planes
        pos, fwd, up = np.array(cam.pos), np.array(cam.forward), np.array(cam.up)
        right = np.cross(fwd, up)
        rbound = self.model.geom_rbound
        for i in range(scene.ngeom):
            g = scene.geoms[i]
            if g.objtype != mujoco.mjtObj.mjOBJ_GEOM or rbound[g.objid] <= 0:  # planes have no bound
                continue
            r = rbound[g.objid]
            v = np.array(g.pos) - pos
            z, x, y = v @ fwd, v @ right, v @ up
            if z < -r or abs(x) - r * kx > tx * z or abs(y) - r * ky > ty * z:
                g.type = mujoco.mjtGeom.mjGEOM_NONE

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        self._cameras.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: GL may already be gone
            pass
