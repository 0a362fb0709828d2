"""mm filip-heatmap: the token-wise scores land where the matching content is, drawn at the image's size."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torchvision import transforms

from mm.evaluate.heatmap import box_overlap, main, render, token_map

RED_BOX = (40, 16, 56, 32)  # in the 80 x 64 image: exactly one 16 px patch of the centre 64 x 64 view
BLUE_BOX = (8, 48, 24, 64)


def scene() -> Image.Image:
    image = Image.new("RGB", (80, 64), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle((RED_BOX[0], RED_BOX[1], RED_BOX[2] - 1, RED_BOX[3] - 1), fill=(255, 0, 0))
    draw.rectangle((BLUE_BOX[0], BLUE_BOX[1], BLUE_BOX[2] - 1, BLUE_BOX[3] - 1), fill=(0, 0, 255))
    return image


class ColourModel(torch.nn.Module):
    """A constructed FILIP: a patch token is the patch's mean colour around grey, every caption token
    the direction of pure red; so red patches match best, grey and blue ones worst."""

    patch = 8

    def encode_image_tokens(self, pixels):
        patches = torch.nn.functional.avg_pool2d(pixels, self.patch)  # (B, 3, g, g)
        tokens = (patches - 0.5).flatten(2).transpose(1, 2)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)

    def encode_text_tokens(self, ids):
        tokens = torch.tensor([1.0, -1.0, -1.0]).expand(*ids.shape, 3)
        return tokens, ids != 0


def tokenizer(captions):
    return torch.tensor([[5] * len(c.split()) + [0] * (6 - len(c.split())) for c in captions])


PREPROCESS = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])


@pytest.mark.parametrize("direction", ["text", "image"])
def test_hottest_patch_of_a_constructed_model_is_the_named_objects(direction):
    image = scene()
    tmap = token_map(ColourModel(), tokenizer, PREPROCESS, image, "the red square")
    assert tmap.grid == 4 and tmap.crop == (8.0, 0.0, 64.0)  # the centre crop of an 80 x 64 image
    heat = tmap.heat(direction)
    hottest = int(heat.flatten().argmax())
    assert tmap.patch_box(hottest) == RED_BOX
    assert all(box_overlap(tmap.patch_box(k), RED_BOX) for k in tmap.best_patches())
    assert not box_overlap(tmap.patch_box(hottest), BLUE_BOX)
    if direction == "text":  # the text->image heat sums to the caption's s^T
        assert heat.sum().item() == pytest.approx(tmap.sim.amax(0).mean().item())
    picture = render(image, tmap, heat)
    assert picture.size == image.size and picture.mode == "RGB"
    # The hottest patch is drawn brightest; outside the model's view the image is only dimmed.
    px = picture.load()
    assert sum(px[48, 24]) > max(sum(px[x, y]) for x, y in ((16, 8), (70, 40), (30, 40)))
    assert px[2, 30] == tuple(round(0.35 * 128) for _ in range(3))


@pytest.fixture(scope="module")
def filip_export(tmp_path_factory):
    from mm.config import config_json
    from mm.models.filip import FilipModel, FilipModelConfig
    from mm.tasks.filip import FilipRunConfig

    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    cfg = FilipModelConfig(arch=arch, embed_dim=16)
    torch.manual_seed(0)
    model = FilipModel(cfg).eval()
    path = tmp_path_factory.mktemp("filip") / "model.safetensors"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"mm_task": "filip", "mm_step": "0",
                                          "mm_config": config_json(FilipRunConfig(model=cfg))})
    return path


def test_command_writes_a_png_of_the_images_size(filip_export, tmp_path, capsys):
    scene().save(tmp_path / "scene.png")
    out = tmp_path / "maps" / "heat.png"
    assert main(["--checkpoint", str(filip_export), "--image", str(tmp_path / "scene.png"),
                 "--caption", "a red square on the right", "--out", str(out)]) == 0
    with Image.open(out) as written:
        assert written.size == (80, 64) and written.format == "PNG"
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["grid"] == 4
    # Word tokens and EOT (the model's default text_special), each with a patch inside the centre view.
    assert [t["token"] for t in record["tokens"]][:6] == ["a", "red", "square", "on", "the", "right"]
    assert len(record["tokens"]) == 7
    for t in record["tokens"]:
        x0, y0, x1, y1 = t["best_patch"]
        assert 8 <= x0 < x1 <= 72 and 0 <= y0 < y1 <= 64 and x1 - x0 == 16


@pytest.mark.parametrize("bad, message", [
    (["--image", "{tmp}/missing.png"], "does not exist"),
    (["--out", "{tmp}/heat.jpg"], "must end in .png"),
    (["--caption", " "], "--caption is empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(filip_export, tmp_path, capsys, bad, message):
    scene().save(tmp_path / "scene.png")
    args = {"--checkpoint": str(filip_export), "--image": str(tmp_path / "scene.png"), "--caption": "a red square",
            "--out": str(tmp_path / "heat.png")}
    args[bad[0]] = bad[1].format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        main([x for kv in args.items() for x in kv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.png"]


def test_box_hits_over_clutter_shards(filip_export, tmp_path, capsys):
    from mm.data.synthetic import write_clutter

    shards = write_clutter(tmp_path / "c", 12, image_size=48, seed=3)
    assert main(["--checkpoint", str(filip_export), "--data", shards[0]]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    one_object = sum(len(json.loads(s["json"])["named"]) == 1 for s in _read(shards[0]))
    assert result["captions"] == one_object > 0
    # Each one-object caption has a colour and a shape word among its tokens.
    assert result["word_tokens"] == 2 * one_object and result["tokens"] > result["word_tokens"]
    for key in ("chance", "hit_rate_all_tokens", "hit_rate_words"):
        assert 0 <= result[key] <= 1
    assert 0 < result["chance"] < 0.5  # a small object overlaps a few of the 16 patches
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(filip_export), "--data", shards[0], "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2


def _read(url):
    import webdataset as wds

    return list(wds.WebDataset(url, shardshuffle=False))
