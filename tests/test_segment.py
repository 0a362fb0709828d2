"""mm-segment: sliding-window tiling, image depths, outputs at native size, metrics files, bad input."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from safetensors.torch import save_file

from mm.config import config_json
from mm.evaluate import segment
from mm.evaluate.seg_io import percentile_stretch, read_image, to_rgb8
from mm.evaluate.segment import InferenceOptions, Segmenter, main
from mm.evaluate.tiling import blend_weights, tile_grid, tile_starts
from mm.metrics.segmentation import pool_metrics, segmentation_metrics
from mm.models.sam import PIXEL_MEAN, PIXEL_STD, SamModelConfig, build_topolora_sam

ROOT = Path(__file__).resolve().parents[1]
TILE = 32


def write_tiny_export(path: Path, image_size: int = TILE, task: str = "topolora_sam") -> Path:
    """A random tiny TopoLoRA-SAM saved as the trainer's export is (weights + mm_task/mm_config)."""
    from mm.tasks import get_task

    cfg = get_task("topolora_sam").config_class()
    cfg.model = SamModelConfig(variant="custom", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                               encoder_global_attn_indexes=[1], image_size=image_size)
    torch.manual_seed(0)
    model = build_topolora_sam(cfg.model)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"mm_task": task, "mm_config": config_json(cfg)})
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return write_tiny_export(tmp_path_factory.mktemp("export") / "model.safetensors")


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """main() in this process (much faster than a subprocess per case): exit code, stdout, stderr."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------------
# Tiling


class PointwiseStub(torch.nn.Module):
    """1x1 convolutions: each output pixel depends on its own input pixel only, so the output is exactly
    translation-equivariant and any image size works; a stand-in for SAM in the tiling test only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GELU(), torch.nn.Conv2d(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("blend", ["gaussian", "linear", "constant"])
@pytest.mark.parametrize("size", [(77, 131), (20, 90), (32, 33)])
def test_tiled_inference_equals_untiled_inference_of_an_equivariant_model(blend, size):
    stub = PointwiseStub()
    image = rgb(*size, seed=size[0])
    segmenter = Segmenter(stub, TILE, InferenceOptions(mode="tile", overlap=0.5, blend=blend, batch_size=3))
    tiled = segmenter.logits(image)
    # Reference: the whole image in one pass, normalised as SAM normalises.
    x = (torch.from_numpy(image).permute(2, 0, 1).float() - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) \
        / torch.tensor(PIXEL_STD).view(3, 1, 1)
    with torch.no_grad():
        whole = stub(x[None])[0, 0]
    assert tiled.shape == size
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    rows, cols = len(tile_starts(max(size[0], TILE), TILE, 0.5)), len(tile_starts(max(size[1], TILE), TILE, 0.5))
    assert segmenter.tiles_run == rows * cols


def test_bf16_autocast_on_the_cpu_and_no_fp16_there():
    stub = PointwiseStub()
    image = rgb(50, 40)
    fp32 = Segmenter(stub, TILE, InferenceOptions(mode="tile")).logits(image)
    bf16 = Segmenter(stub, TILE, InferenceOptions(mode="tile", precision="bf16")).logits(image)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)
    with pytest.raises(segment.UserError, match="fp16 needs a GPU"):
        Segmenter(stub, TILE, InferenceOptions(precision="fp16"))


def test_tiles_cover_the_image_and_end_at_its_border():
    assert tile_starts(100, 32, 0.25) == [0, 24, 48, 68]
    assert tile_starts(32, 32, 0.9) == [0]
    covered = np.zeros((70, 45), int)
    for top, left in tile_grid(70, 45, 16, 0.3):
        covered[top:top + 16, left:left + 16] += 1
    assert covered.min() >= 1


def test_gaussian_blend_weights_match_scipy_window():
    from scipy.signal.windows import gaussian

    g = gaussian(64, std=64 / 8)
    expected = np.maximum(np.outer(g, g) / np.outer(g, g).max(), 1e-3)
    np.testing.assert_allclose(blend_weights(64, "gaussian").numpy(), expected, rtol=1e-5)
    linear = blend_weights(8, "linear").numpy()
    assert linear[3, 3] == linear[4, 4] == 1 and linear[0].tolist() == [0.25] * 8


def test_segmenter_runs_sam_and_keeps_odd_sizes():
    cfg = SamModelConfig(variant="custom", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                         encoder_global_attn_indexes=[1], image_size=TILE)
    torch.manual_seed(0)
    model = build_topolora_sam(cfg)
    for mode, size in [("auto", (21, 13)), ("auto", (45, 70)), ("resize", (45, 70)), ("tile", (9, 31))]:
        segmenter = Segmenter(model, TILE, InferenceOptions(mode=mode, batch_size=2))
        logits = segmenter.logits(rgb(*size))
        assert logits.shape == size and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------
# Image depths


def test_16bit_and_float_images_get_the_shards_stretch(tmp_path):
    from mm.data.shards import _to_8bit

    rng = np.random.default_rng(0)
    img16 = rng.gamma(2.0, 3000, (37, 50)).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a16.tif", img16)
    f32 = rng.gamma(1.0, 0.05, (33, 40)).astype(np.float32)
    f32[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "f32.tif", f32)
    for name, arr in (("a16.tif", img16), ("f32.tif", f32)):
        pixels = read_image(tmp_path / name)
        assert pixels.shape == (*arr.shape, 1) and pixels.dtype == arr.dtype
        out = to_rgb8(pixels)
        # mm-shards writes training images of these depths with _to_8bit: inference must see the same
        expected = np.asarray(_to_8bit(Image.fromarray(arr)))
        assert out.shape == (*arr.shape, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., 0], expected)
        np.testing.assert_array_equal(out[..., 2], expected)


def test_sar_db_and_two_channels(tmp_path):
    rng = np.random.default_rng(1)
    vv = rng.gamma(1.0, 0.1, (24, 30)).astype(np.float32)
    vv[2, 3] = 0.0  # no log of zero: the smallest positive value is used
    vh = rng.gamma(1.0, 0.02, (24, 30)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s1.tif", np.stack([vv, vh]), photometric="minisblack", planarconfig="separate")
    pixels = read_image(tmp_path / "s1.tif")
    assert pixels.shape == (24, 30, 2)
    out = to_rgb8(pixels, db=True)
    db = 10 * np.log10(np.where(vv > 0, vv, vv[vv > 0].min()).astype(np.float64))
    lo, hi = np.percentile(db, [1, 99])
    np.testing.assert_array_equal(out[..., 0], np.clip((db - lo) / (hi - lo) * 255, 0, 255).round())
    np.testing.assert_array_equal(out[..., 1], percentile_stretch(vh, db=True))
    np.testing.assert_array_equal(out[..., 2], ((out[..., 0].astype(int) + out[..., 1]) / 2).round())
    np.testing.assert_array_equal(to_rgb8(pixels, channels=[1, 1, 1])[..., 0], percentile_stretch(vh))


# ---------------------------------------------------------------------------------------------------
# The command


def write_formats(folder: Path) -> dict[str, tuple[int, int]]:
    """One image of each input kind; name -> (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rgb(45, 70)).save(folder / "big.png")
    Image.fromarray(rgb(21, 13)[..., 0]).save(folder / "grey.jpg")
    Image.fromarray(rgb(17, 40)).save(folder / "fundus.ppm")
    Image.fromarray(rgb(35, 33)).convert("P").save(folder / "pal.gif")
    tifffile.imwrite(folder / "sar16.tif", rng.integers(0, 60000, (37, 50), dtype=np.uint16))
    tifffile.imwrite(folder / "sarf.tif", rng.gamma(1, 1, (33, 41)).astype(np.float32))
    return {"big": (45, 70), "grey": (21, 13), "fundus": (17, 40), "pal": (35, 33), "sar16": (37, 50),
            "sarf": (33, 41)}


def test_every_format_gives_outputs_at_native_size(tmp_path, export, capsys):
    sizes = write_formats(tmp_path / "in")
    code, out, err = run_main(capsys, "--checkpoint", str(export), "--input", str(tmp_path / "in"),
                              "--output", str(tmp_path / "out"), "--save-prob", "tif", "--batch-size", "2")
    assert code == 0, err
    assert "segmented 6 image(s)" in out
    for key, (h, w) in sizes.items():
        mask = np.asarray(Image.open(tmp_path / "out" / f"{key}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        prob = tifffile.imread(tmp_path / "out" / f"{key}_prob.tif")
        assert prob.shape == (h, w) and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
        np.testing.assert_array_equal(mask == 255, prob > 0.5)
        assert Image.open(tmp_path / "out" / f"{key}_overlay.png").size == (w, h)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_metrics_files_match_mm_metrics(tmp_path, export, capsys):
    images, masks, fovs = tmp_path / "images", tmp_path / "manual", tmp_path / "fov"
    for d in (images, masks, fovs):
        d.mkdir()
    rng = np.random.default_rng(5)
    truths, fov_masks = {}, {}
    for i, (h, w) in enumerate([(45, 70), (20, 25), (40, 36)]):
        Image.fromarray(rgb(h, w, seed=i)).save(images / f"{i:02d}_test.png")
        truths[i] = rng.random((h, w)) > 0.6
        Image.fromarray(np.where(truths[i], 255, 0).astype(np.uint8)).save(masks / f"{i:02d}_manual1.gif")
        fov_masks[i] = np.zeros((h, w), bool)
        fov_masks[i][2:-2, 3:] = True
        Image.fromarray(np.where(fov_masks[i], 255, 0).astype(np.uint8)).save(fovs / f"{i:02d}_test_mask.gif")
    out = tmp_path / "out"
    # The median probability of a random model as threshold: masks are neither empty nor full.
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(images), "--output", str(out),
                            "--masks", str(masks), "--mask-suffix", "_manual1", "--fov", str(fovs),
                            "--fov-suffix", "_test_mask", "--image-suffix", "_test", "--save-prob", "tif")
    assert code == 0, err
    probs = [tifffile.imread(out / f"{i:02d}_test_prob.tif") for i in range(3)]
    threshold = float(np.median(np.concatenate([p[f] for p, f in zip(probs, fov_masks.values())])))
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(images), "--output", str(out),
                            "--masks", str(masks), "--mask-suffix", "_manual1", "--fov", str(fovs),
                            "--fov-suffix", "_test_mask", "--image-suffix", "_test", "--threshold", str(threshold),
                            "--save-prob", "tif")
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    expected = []
    for i in range(3):
        pred = np.asarray(Image.open(out / f"{i:02d}_test_mask.png")) > 0
        assert not pred[~fov_masks[i]].any()  # outside the field of view: background
        prob = tifffile.imread(out / f"{i:02d}_test_prob.tif")
        expected.append(segmentation_metrics(pred, truths[i], fov_masks[i], prob=prob))
    assert 0 < expected[0]["dice"] < 1
    for got, want in zip(record["per_image"], expected):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, nan_ok=True) or (got[k] is None and math.isnan(v))
    pooled = pool_metrics(expected)
    for k, v in pooled.items():
        assert record["pooled"][k] == pytest.approx(v) or (record["pooled"][k] is None and math.isnan(v))
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["image"] for r in rows] == [str(images / f"{i:02d}_test.png") for i in range(3)] + ["mean", "global"]
    assert float(rows[1]["dice"]) == pytest.approx(expected[1]["dice"])
    assert float(rows[3]["cldice"]) == pytest.approx(pooled["mean_cldice"])
    assert float(rows[4]["dice"]) == pytest.approx(pooled["global_dice"]) and int(rows[4]["tp"]) == pooled["tp"]


# ---------------------------------------------------------------------------------------------------
# Bad input


def assert_error(code: int, err: str, *fragments: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_unreadable_single_file(tmp_path, export, capsys):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(bad), "--output",
                            str(tmp_path / "out"))
    assert_error(code, err, str(bad), "cannot decode")
    assert not (tmp_path / "out").exists()  # a run that wrote nothing leaves no folder


def test_one_bad_file_in_a_folder_is_skipped(tmp_path, export, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "c"):
        Image.fromarray(rgb(20, 30)).save(folder / f"{name}.png")
    (folder / "b.tif").write_bytes(b"II*\x00 not a tiff")
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(folder), "--output", str(out))
    assert_error(code, err, "1 of 3 images failed", exit_code=segment.EXIT_SOME_FAILED)
    assert f"skipped: {folder / 'b.tif'}:" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png", "c_mask.png", "c_overlay.png"]


def test_mask_of_another_size(tmp_path, export, capsys):
    Image.fromarray(rgb(20, 30)).save(tmp_path / "x.png")
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "gt" / "x.png")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(tmp_path / "x.png"),
                            "--masks", str(tmp_path / "gt"), "--output", str(tmp_path / "out"))
    assert_error(code, err, str(tmp_path / "gt" / "x.png"), "30x21 but the image is 30x20")
    assert not (tmp_path / "out").exists()  # a run that wrote nothing leaves no folder


def test_checkpoint_of_another_model(tmp_path, capsys):
    clip = tmp_path / "clip.safetensors"
    save_file({"w": torch.zeros(2)}, str(clip), metadata={"mm_task": "clip", "mm_config": "{}"})
    Image.fromarray(rgb(20, 30)).save(tmp_path / "x.png")
    code, _, err = run_main(capsys, "--checkpoint", str(clip), "--input", str(tmp_path / "x.png"),
                            "--output", str(tmp_path / "out"))
    assert_error(code, err, str(clip), "'clip'", "topolora_sam")


def test_empty_folder_and_unmatched_glob(tmp_path, export, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(tmp_path / "empty"),
                            "--output", str(tmp_path / "out"))
    assert_error(code, err, str(tmp_path / "empty"), "no images")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(tmp_path / "*.tif"),
                            "--output", str(tmp_path / "out"))
    assert_error(code, err, "*.tif", "no image files match")


def test_output_folder_not_writable(tmp_path, export, capsys):
    Image.fromarray(rgb(20, 30)).save(tmp_path / "x.png")
    (tmp_path / "file").write_text("a file, not a folder")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "--input", str(tmp_path / "x.png"),
                            "--output", str(tmp_path / "file" / "out"))
    assert_error(code, err, str(tmp_path / "file" / "out"), "not writable")


def test_command_line_script_reports_one_line(tmp_path, export):
    Image.fromarray(rgb(20, 30)).save(tmp_path / "x.png")
    proc = subprocess.run([sys.executable, "eval/segment.py", "--checkpoint", str(tmp_path / "none.safetensors"),
                           "--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "out")],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.safetensors'}: no such checkpoint file"]
