"""CLIP text encoder (Paint-by-T+S `FrozenCLIPEmbedder`): Flax tower, key map and BPE tokenizer.

References: transformers 5's PyTorch `CLIPTextModel` with random weights at a tiny config (hidden 32,
2 layers, 4 heads, vocab 1000, 77 positions), and transformers 5's `CLIPTokenizer` on a vocabulary /
merges file written by the test (byte alphabet + `</w>` variants + merges learned from a small corpus).

transformers 5 no longer has the python ("slow") CLIP tokenizer that the original code ran; its
`CLIPTokenizer` is the `tokenizers`-backed one (fast == slow there). Both share the BPE and the
pre-tokeniser; they differ in text cleanup (the slow one uses ftfy, or BERT's `BasicTokenizer` without
it). So the slow tokenizer is rebuilt here as transformers' own cleanup (`BasicTokenizer(strip_accents=
False, do_split_on_punc=False)` or `ftfy.fix_text` + whitespace cleanup + lower) followed by the fast
tokenizer, which leaves clean lower-case text unchanged. (Checked once by hand against transformers
4.46.3's python `CLIPTokenizer`, with and without ftfy: identical ids on all 20 prompts below and more.)

Tolerances: fp32 CPU parity of a 2-layer tower, 1e-5 of the output scale (outputs are O(1) after the
final LayerNorm; measured ~1e-6). Weight round trips are exact.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sketchcomp_jax.models.clip_text import CLIPTextConfig, CLIPTextTower
from sketchcomp_jax.models.clip_tokenizer import (
    CLIPTokenizer,
    TokenizerFileError,
    TokenizerFolderNotFoundError,
    basic_cleanup,
    ftfy_cleanup,
    learn_bpe,
    write_tokenizer_folder,
)
from sketchcomp_jax.weights.clip_text_weights import (
    TextEncoderCheckpointError,
    load_clip_text,
    text_key_map,
    text_params_from_state_dict,
    text_params_to_state_dict,
)

TOL = 1e-5

# --------------------------------------------------------------------------------------------------
# model parity
# --------------------------------------------------------------------------------------------------

VOCAB, BOS, EOS, BIG = 1000, 998, 997, 999  # EOS is not the largest id, so the two pooling rules differ


@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
    """A random-weight transformers CLIPTextModel saved as a folder: (model, folder)."""
    import torch
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    cfg = HFConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1,
    )
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so that scale/bias mapping matters
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf_clip_text")
    model.save_pretrained(folder)
    return model, folder


def _ids_batch() -> np.ndarray:
    """Prompts of 0, 5, 30 and 75 tokens, padded to 77 with EOS (SD v1) or id 0 (SD v2-style pad)."""
    rng = np.random.default_rng(0)
    rows = []
    for n, pad in ((0, EOS), (5, EOS), (30, 0), (75, EOS)):
        body = rng.integers(0, EOS, n).tolist()
        if n == 30:
            body[12] = BIG  # a larger id than EOS: the legacy argmax rule picks it, the EOS rule does not
        row = [BOS, *body, EOS]
        rows.append(row + [pad] * (77 - len(row)))
    return np.asarray(rows, dtype=np.int32)


def _hf_forward(model, ids: np.ndarray, eos_token_id: int):
    import torch

    model.eos_token_id = eos_token_id  # the attribute forward() reads for pooling
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("eos_token_id", [EOS, 2], ids=["eos-id-rule", "legacy-argmax-rule"])
def test_tower_matches_transformers(hf_text, eos_token_id):
    model, folder = hf_text
    config, params = load_clip_text(folder)
    assert config == CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=EOS,
    )
    config = dataclasses.replace(config, eos_token_id=eos_token_id)
    ids = _ids_batch()
    ref_hidden, ref_pooled = _hf_forward(model, ids, eos_token_id)
    hidden, pooled = jax.jit(CLIPTextTower(config).apply)({"params": params}, jnp.asarray(ids))
    assert hidden.shape == (4, 77, 32) and pooled.shape == (4, 32)
    assert _rel_err(hidden, ref_hidden) < TOL
    assert _rel_err(pooled, ref_pooled) < TOL
    # The rules pick different rows for the third prompt, so the pooled test is not vacuous.
    expected_pos = 13 if eos_token_id == 2 else 31
    np.testing.assert_allclose(pooled[2], hidden[2, expected_pos], rtol=0, atol=0)


def test_causal_mask_and_padding_do_not_leak(hf_text):
    """Changing tokens after position t leaves the states up to t unchanged (causal, no padding mask)."""
    _, folder = hf_text
    config, params = load_clip_text(folder)
    ids = _ids_batch()[1:2]
    other = ids.copy()
    other[0, 10:] = 5
    apply = jax.jit(CLIPTextTower(config).apply)
    a, _ = apply({"params": params}, jnp.asarray(ids))
    b, _ = apply({"params": params}, jnp.asarray(other))
    np.testing.assert_array_equal(np.asarray(a[0, :10]), np.asarray(b[0, :10]))
    assert not np.allclose(np.asarray(a[0, 10:]), np.asarray(b[0, 10:]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        CLIPTextTower(config).apply({"params": params}, jnp.zeros((1, 78), jnp.int32))


def test_key_map_matches_module_and_transformers_order(hf_text):
    model, folder = hf_text
    config, params = load_clip_text(folder)
    shapes = jax.eval_shape(CLIPTextTower(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
    assert jax.tree.map(lambda s: s.shape, shapes["params"]) == jax.tree.map(np.shape, params)
    # transformers 5's CLIPTextModel has no `text_model.` level: its state-dict keys are the bare map keys.
    assert [e.torch_key for e in text_key_map(config)] == list(model.state_dict())


def test_ldm_checkpoint_layout_with_inferred_config(hf_text, tmp_path):
    """An LDM `.ckpt` (Lightning `state_dict`, `cond_stage_model.transformer.` prefix, other networks and the
    old `position_ids` buffer beside it): the config is inferred from the shapes (heads given)."""
    import torch

    model, folder = hf_text
    sd = {f"cond_stage_model.transformer.text_model.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 8, 3, 3)
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    path = tmp_path / "pbts.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    config, params = load_clip_text(path, num_attention_heads=4)
    folder_config, folder_params = load_clip_text(folder)
    assert config == dataclasses.replace(folder_config, eos_token_id=VOCAB - 1)
    jax.tree.map(np.testing.assert_array_equal, params, folder_params)
    # Without the head count, hidden 32 is not a multiple of CLIP's 64-wide heads: a clear refusal.
    with pytest.raises(TextEncoderCheckpointError, match="num_attention_heads"):
        load_clip_text(path)


def test_round_trips_are_exact(hf_text):
    model, _ = hf_text
    hf_sd = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}  # the hub layout
    config, params = text_params_from_state_dict(hf_sd, num_attention_heads=4)
    # transformers -> Flax -> transformers: identical tensors under identical keys.
    back = text_params_to_state_dict(params, config)
    assert back.keys() == hf_sd.keys()
    for k in hf_sd:
        np.testing.assert_array_equal(back[k], hf_sd[k])
    # Flax (fresh init) -> transformers (LDM keys) -> Flax: identical.
    init = jax.jit(CLIPTextTower(config).init)(jax.random.PRNGKey(1), jnp.zeros((1, 77), jnp.int32))["params"]
    ldm = text_params_to_state_dict(
        init, config, prefix="cond_stage_model.transformer.text_model.", include_position_ids=True
    )
    assert ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"].shape == (1, 77)
    _, again = text_params_from_state_dict(ldm, config)
    jax.tree.map(np.testing.assert_array_equal, again, jax.tree.map(np.asarray, init))


def test_exported_weights_load_into_transformers(hf_text, tmp_path):
    """Export in the hub layout (`text_model.` keys, as every published checkpoint) loads with
    `from_pretrained`; with `prefix=""` the keys are transformers 5's own and load strictly."""
    import shutil

    import torch
    from safetensors.numpy import save_file
    from transformers import CLIPTextModel

    model, folder = hf_text
    config, params = load_clip_text(folder)
    out = tmp_path / "exported"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    save_file(text_params_to_state_dict(params, config), str(out / "model.safetensors"))
    reloaded = CLIPTextModel.from_pretrained(out).eval()
    ids = _ids_batch()
    reference = _hf_forward(model, ids, EOS)[0]
    np.testing.assert_array_equal(_hf_forward(reloaded, ids, EOS)[0], reference)
    strict = CLIPTextModel(model.config).eval()
    strict.load_state_dict(
        {k: torch.from_numpy(v) for k, v in text_params_to_state_dict(params, config, prefix="").items()}, strict=True
    )
    np.testing.assert_array_equal(_hf_forward(strict, ids, EOS)[0], reference)


def test_weight_errors_name_the_problem(hf_text, tmp_path):
    model, folder = hf_text
    sd = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}
    config, _ = load_clip_text(folder)

    bad = dict(sd)
    bad["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((36, 32), np.float32)
    with pytest.raises(TextEncoderCheckpointError, match=r"wrong shapes: text_model\.encoder\.layers\.1\.mlp\.fc1\.weight: \(36, 32\) \(expected \(37, 32\)\)"):
        text_params_from_state_dict(bad, config)

    missing = {k: v for k, v in sd.items() if "layers.0.self_attn.q_proj.bias" not in k}
    with pytest.raises(TextEncoderCheckpointError, match=r"missing keys: text_model\.encoder\.layers\.0\.self_attn\.q_proj\.bias"):
        text_params_from_state_dict(missing, config)

    extra = dict(sd, **{"text_model.encoder.layers.0.self_attn.rotary.weight": np.zeros(3, np.float32)})
    with pytest.raises(TextEncoderCheckpointError, match=r"unexpected keys: text_model\.encoder\.layers\.0\.self_attn\.rotary\.weight"):
        text_params_from_state_dict(extra, config)

    with pytest.raises(TextEncoderCheckpointError, match="no CLIP text encoder found"):
        text_params_from_state_dict({"model.diffusion_model.x": np.zeros(1)}, config)

    with pytest.raises(FileNotFoundError, match="CLIP text encoder not found"):
        load_clip_text(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------

CORPUS = """1girl, solo, long_hair, looking_at_viewer, smile, blue_eyes, blonde_hair, dress, holding, school_uniform,
short_hair, multiple_girls, 2girls, twintails, white_background, simple_background, brown_hair, black_hair,
a photo of a cat sitting on the table, the quick brown fox jumps over the lazy dog. it's a café in zürich;
ポニーテール 東方 hatsune_miku, pokémon, 3d, 4k, highres, absurdres, ((masterpiece)), best quality!!!
don't stop; we're here and they've gone, i'm sure you'll see what he'd do"""

PROMPTS = [
    "",
    "1girl, solo, long_hair, looking_at_viewer, smile",
    "A photo of a CAT   sitting\ton the table.",
    "café Zürich pokémon naïve",
    "ポニーテール, 東方, hatsune_miku",  # kana, and CJK ideographs (BasicTokenizer splits those)
    "3d 4k 1920x1080 highres 12345",  # CLIP splits digits one by one
    "((masterpiece)), best quality!!!",
    "don't stop; we're here, they've gone, i'm sure you'll see what he'd do",
    "emoji ★☆ 🎉 ok",
    " ".join(["long_hair blue_eyes"] * 60),  # truncated to 77 ids
    "hello <|endoftext|> world",
    "\x00ctrl\x07 char\u200b zero-width\ue000pua",  # control / format / private-use characters
    "ＦＵＬＬ　ｗｉｄｔｈ １２３",
    "don’t “quoted” &amp; x",
    "ﬁne ligature",
    "İstanbul ß",
    "a!b hello!",
]


def _learn_bpe(corpus: str, num_merges: int):
    return learn_bpe([corpus], num_merges)


def _write_folder(folder, vocab, merges, extra: dict | None = None):
    assert not folder.exists()
    return write_tokenizer_folder(folder, vocab, merges, extra)


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


@pytest.fixture(scope="module")
def tok_folders(tmp_path_factory):
    """{"sd1": pads with <|endoftext|> (no config files), "sd2": pads with "!" (AddedToken-style configs)}."""
    vocab, merges = _learn_bpe(CORPUS * 3, 400)
    assert 600 < len(vocab) < 1000 and len(merges) > 150
    root = tmp_path_factory.mktemp("clip_tokenizers")
    sd2_configs = {
        "tokenizer_config.json": {
            "bos_token": _added("<|startoftext|>"), "eos_token": _added("<|endoftext|>"), "unk_token": _added("<|endoftext|>"),
            "pad_token": "<|endoftext|>", "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
        },
        "special_tokens_map.json": {"pad_token": "!", "bos_token": _added("<|startoftext|>")},  # overrides the config
    }
    return {
        "sd1": _write_folder(root / "sd1", vocab, merges),
        "sd2": _write_folder(root / "sd2", vocab, merges, sd2_configs),
    }


def _hf_ids(hf, text: str) -> list[int]:
    return hf(text, truncation=True, max_length=77, padding="max_length")["input_ids"]


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_tokenizer_matches_transformers(tok_folders, flavour):
    import ftfy
    import regex
    from transformers import CLIPTokenizer as HFTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer

    folder = tok_folders[flavour]
    hf = HFTokenizer.from_pretrained(folder)
    basic_ref = BasicTokenizer(strip_accents=False, do_split_on_punc=False)
    ours_basic = CLIPTokenizer.from_folder(folder, text_cleanup="basic")
    ours_ftfy = CLIPTokenizer.from_folder(folder, text_cleanup="ftfy")
    assert ours_basic.pad_token_id == hf.pad_token_id == (hf.vocab["!"] if flavour == "sd2" else hf.eos_token_id)
    for prompt in PROMPTS:
        # No-ftfy slow tokenizer = BasicTokenizer cleanup, then CLIP's BPE.
        assert ours_basic.encode(prompt) == _hf_ids(hf, " ".join(basic_ref.tokenize(prompt))), prompt
        # ftfy slow tokenizer = `whitespace_clean(ftfy.fix_text(text)).lower()`, then CLIP's BPE.
        ftfy_clean = regex.sub(r"\s+", " ", ftfy.fix_text(prompt)).strip().lower()
        assert ours_ftfy.encode(prompt) == _hf_ids(hf, ftfy_clean), prompt
    # Where no cleanup step changes the text, all three agree with the tokenizer as is.
    for prompt in PROMPTS[:4] + PROMPTS[5:11]:
        assert ours_basic.encode(prompt) == ours_ftfy.encode(prompt) == _hf_ids(hf, prompt), prompt
    batch = ours_ftfy(PROMPTS)
    assert batch.shape == (len(PROMPTS), 77) and batch.dtype == np.int32


def test_tokenizer_matches_transformers_on_a_corpus(tok_folders):
    """Token ids identical to transformers' `CLIPTokenizer` (cleanup as the slow one, see the module docstring) on
    1,000 seeded texts: tag lists, and random strings of letters, digits, punctuation, contractions, accents,
    CJK, emoji, ligatures, zero-width / control characters and the special-token strings."""
    import random

    import ftfy
    import regex
    from transformers import CLIPTokenizer as HFTokenizer

    folder = tok_folders["sd1"]
    hf = HFTokenizer.from_pretrained(folder)
    ours = CLIPTokenizer.from_folder(folder, text_cleanup="ftfy")
    rnd = random.Random(0)
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.!?'’\"-_:;()[]{}<>/@#$%&*+=~|\t\n")
                + list("éüßçñ東方プロジェクト가나다😀🎨ﬁＦＵＬＬ\u200b\u00a0\x07") + ["'s", "'ll", "'t", "  ", "<|endoftext|>"])
    words = CORPUS.split()
    for i in range(1000):
        n = rnd.randint(0, 40)
        text = " ".join(rnd.choice(words) for _ in range(n)) if i % 2 else "".join(rnd.choice(alphabet) for _ in range(n))
        pieces = text.split("<|endoftext|>")  # transformers splits the special string off before cleaning too
        clean = "<|endoftext|>".join(regex.sub(r"\s+", " ", ftfy.fix_text(p)).strip().lower() for p in pieces)
        assert ours.encode(text) == _hf_ids(hf, clean), repr(text)


def test_tokenizer_special_cases(tok_folders):
    tok = CLIPTokenizer.from_folder(tok_folders["sd1"], text_cleanup="basic")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert tok("").tolist() == [[bos, eos] + [eos] * 75]  # the unconditional prompt
    long = tok.encode(PROMPTS[9])
    assert len(long) == 77 and long[0] == bos and long[-1] == eos and eos not in long[1:-1]
    assert tok.encode("a", max_length=4) == [bos, tok.vocab["a</w>"], eos, eos]
    # The two cleanups differ exactly where documented.
    assert basic_cleanup("東方 Project") == "東 方 project"
    assert basic_cleanup("a\x00b\u200bc\td") == "abc d"
    assert ftfy_cleanup("Don’t ＦＵＬＬ ﬁne &amp;") == "don't full fine &"
    # An SD pipeline root (tokenizer/ inside) is accepted.
    root = tok_folders["sd1"].parent / "pipeline"
    (root / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (root / "tokenizer" / name).write_bytes((tok_folders["sd1"] / name).read_bytes())
    assert CLIPTokenizer.from_folder(root, text_cleanup="basic").encode(PROMPTS[1]) == tok.encode(PROMPTS[1])


def test_tokenizer_errors(tok_folders, tmp_path):
    with pytest.raises(TokenizerFolderNotFoundError, match="CLIP tokenizer folder not found"):
        CLIPTokenizer.from_folder(tmp_path / "missing")
    no_merges = tmp_path / "no_merges"
    no_merges.mkdir()
    (no_merges / "vocab.json").write_bytes((tok_folders["sd1"] / "vocab.json").read_bytes())
    with pytest.raises(TokenizerFolderNotFoundError, match=r"merges\.txt not found .*\(it holds: vocab\.json\)"):
        CLIPTokenizer.from_folder(no_merges)
    (no_merges / "merges.txt").write_text("#version: 0.2\na b\nbroken\n")
    with pytest.raises(TokenizerFileError, match=r"line 3: a merge line must hold two symbols"):
        CLIPTokenizer.from_folder(no_merges)
    (no_merges / "merges.txt").write_text("#version: 0.2\n")
    (no_merges / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(TokenizerFileError, match=r"pad_token '<pad>' is not in the vocabulary"):
        CLIPTokenizer.from_folder(no_merges)
    (no_merges / "vocab.json").write_text("{not json")
    with pytest.raises(TokenizerFileError, match="not valid JSON"):
        CLIPTokenizer.from_folder(no_merges)


def test_default_config_is_clip_vit_l14_text():
    """The default config is SD v1's FrozenCLIPEmbedder (openai/clip-vit-large-patch14 text tower):
    123,060,480 parameters and a (B, 77, 768) context; shapes only (no full-size compute)."""
    config = CLIPTextConfig()
    assert sum(int(np.prod(e.torch_shape)) for e in text_key_map(config)) == 123_060_480
    out = jax.eval_shape(
        lambda ids: CLIPTextTower(config).init_with_output(jax.random.PRNGKey(0), ids)[0], jnp.zeros((2, 77), jnp.int32)
    )
    assert out[0].shape == (2, 77, 768) and out[1].shape == (2, 768)
