"""bench/ridge_filter.py, the training-free floor of docs/segmentation.md section 8: its per-scale cache
and variants must not change what the plain recipe computes."""

import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import exposure, filters

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ridge_filter", ROOT / "bench" / "ridge_filter.py")
ridge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ridge)


def _fundus_like() -> tuple[np.ndarray, np.ndarray]:
    rgb = np.full((96, 96, 3), 180, np.uint8)
    rgb[:, 40:43, 1] = 90  # a dark vertical vessel, 3 px wide, in the green channel
    yy, xx = np.mgrid[:96, :96]
    fov = (yy - 48) ** 2 + (xx - 48) ** 2 < 45**2
    rgb[~fov] = 0
    return rgb, fov


def test_per_scale_response_and_cache_equal_skimage_multiscale(tmp_path: Path) -> None:
    rgb, fov = _fundus_like()
    # Reference: the recipe written directly with skimage's own multi-scale call.
    green = exposure.equalize_adapthist(rgb[..., 1], clip_limit=0.01)
    ref = np.where(fov, filters.sato(green, sigmas=(1, 2, 3), black_ridges=True), 0.0)
    raw = ridge.ridge_response(rgb, fov, norm="none")
    np.testing.assert_allclose(raw, ref, rtol=1e-5, atol=1e-6)
    first = ridge.ridge_response(rgb, fov, cache=tmp_path, name="img")
    assert len(list(tmp_path.glob("img-s*-fill0.npy"))) == 3
    again = ridge.ridge_response(rgb, fov, cache=tmp_path, name="img")
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, ref / ref[fov].max(), rtol=1e-5, atol=1e-6)
    # The vessel is the strongest ridge inside the field of view.
    assert ridge.predict(first, fov, 0.5, 0)[:, 40:43].sum() > 0.8 * ridge.predict(first, fov, 0.5, 0).sum()


def test_min_size_drops_only_small_components() -> None:
    r = np.zeros((40, 40))
    r[5:25, 10] = 1.0  # a 20 px segment
    r[30, 30] = r[31, 30] = 1.0  # a 2 px speck
    fov = np.ones_like(r, bool)
    kept = ridge.predict(r, fov, 0.5, min_size=5)
    labels, n = ndimage.label(kept, structure=np.ones((3, 3)))
    assert n == 1 and kept.sum() == 20
    assert ridge.predict(r, fov, 0.5, min_size=0).sum() == 22


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    for args in (["--root", str(tmp_path / "absent")], ["--root", str(tmp_path), "--sigmas", "1,x"]):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ridge_filter.py"), *args],
                              capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
        assert proc.returncode == 2, proc.stderr
        # argparse's usage lines may precede it; the message itself is the one last line
        assert "Traceback" not in proc.stderr and "error: " in proc.stderr.strip().splitlines()[-1]
