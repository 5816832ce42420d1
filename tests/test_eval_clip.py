"""CLIP image embeddings for CLIP-I / CLIP-FD against transformers with random weights (tiny configs)."""
import numpy as np
import pytest
import torch
from PIL import Image

from sketchcomp_jax.eval.clip_score import load_clip_encoder
from sketchcomp_jax.models.clip_vision import CLIP_MEAN, CLIP_STD
from sketchcomp_jax.weights.convert import CheckpointMismatchError
from sketchcomp_jax.weights.errors import CheckpointError

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=24)


def _images(n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 4 * i, 3), dtype=np.uint8) for i in range(n)]


def _torch_pixels(images, size):
    out = []
    for img in images:
        arr = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), np.float32) / 255.0
        out.append(((arr - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


@pytest.fixture(scope="module")
def with_projection_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)).eval()
    path = tmp_path_factory.mktemp("clip") / "vision_proj"
    model.save_pretrained(path)
    return path, model


def test_image_embeds_match_transformers(with_projection_dir):
    path, model = with_projection_dir
    encoder = load_clip_encoder(path, batch_size=2)
    images = _images()
    ours = encoder.embed(images)
    with torch.no_grad():
        ref = model(pixel_values=_torch_pixels(images, TINY_VISION["image_size"])).image_embeds.numpy()
    assert ours.shape == (3, TINY_VISION["projection_dim"])
    # fp32 on CPU through a 2-layer ViT: agreement to ~1e-6 of the output scale.
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_full_clip_model_folder_uses_get_image_features(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    vision = {k: v for k, v in TINY_VISION.items() if k != "projection_dim"}
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                max_position_embeddings=16)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=20)).eval()
    model.save_pretrained(tmp_path / "clip")
    images = _images(2, seed=3)
    ours = load_clip_encoder(tmp_path / "clip").embed(images)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=_torch_pixels(images, 32))
    ref = getattr(ref, "image_embeds", ref)
    ref = ref.numpy() if hasattr(ref, "numpy") else ref.pooler_output.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_bad_clip_folders_give_clear_errors(tmp_path, with_projection_dir):
    with pytest.raises(CheckpointError, match="not found|does not exist"):
        load_clip_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip_encoder(tmp_path / "empty")
    # A config that disagrees with the weights (wrong layer count): the key listing names the problem.
    import json
    import shutil

    path, _ = with_projection_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="missing keys.*layers.2"):
        load_clip_encoder(broken)
    cfg["num_hidden_layers"] = 2
    cfg["intermediate_size"] = 48
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="wrong shape.*fc1"):
        load_clip_encoder(broken)


def test_a_model_clip_tower_saved_as_a_transformers_folder_loads_in_both(tmp_path, tiny_model):
    from transformers import CLIPVisionModel

    from sketchcomp_jax.eval.clip_score import model_clip_encoder
    from sketchcomp_jax.weights.clip_vision_weights import save_clip_vision_folder

    config, params = tiny_model
    folder = save_clip_vision_folder(config.clip, params["conditioner"]["clip"], tmp_path / "tower")
    images = _images(2, seed=5)
    ours = model_clip_encoder(config, params).embed(images)
    np.testing.assert_array_equal(load_clip_encoder(folder).embed(images), ours)
    torch_model = CLIPVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = torch_model(pixel_values=_torch_pixels(images, config.clip.image_size)).pooler_output.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
