"""`SketchCompositionPipeline`: source image + mask + sketch + reference → edited images.

Preprocessing follows the original demo (`demo/app.py:paint_with_sketch`) exactly:
  * image `.convert('RGB').resize((R, R))` (BICUBIC), [-1, 1];
  * mask (white = fill) → keep-mask `1 − L/255` thresholded at 0.5; masked image `image · keep`;
  * sketch white-on-black in [-1, 1], kept only inside the hole, resized to the latent size with
    no-antialias bilinear (as the mask);
  * reference resized to the CLIP size (BICUBIC, aspect not kept) and CLIP-normalised;
  * masked-image latent: 0.18215 · posterior sample (default, as the original) or mean;
then the jitted sampler (one compiled program for the whole loop), VAE decode, `clamp((x+1)/2)`,
truncation to uint8, and a resize back to the input size. R is the model's `resolution`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageFilter

from sketchcomp_jax import imageio
from sketchcomp_jax.diffusion.inputs import latent_conditioning, masked_image_latent, posterior_latent_shape
from sketchcomp_jax.diffusion.samplers import SamplingCond, make_sampler
from sketchcomp_jax.diffusion.schedule import schedule_for
from sketchcomp_jax.model_source import load_model_source
from sketchcomp_jax.models.clip_vision import CLIP_MEAN, CLIP_STD
from sketchcomp_jax.models.config import ModelConfig, build_networks
from sketchcomp_jax.models.vae import AutoencoderKL

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreparedInputs:
    """Model-size inputs, NHWC float32, batch 1. `source_size` = (W, H) of the user's image."""

    image: np.ndarray  # (1, R, R, 3) in [-1, 1]
    keep_mask: np.ndarray  # (1, R, R, 1) in {0, 1}
    sketch: np.ndarray | None  # (1, R, R, 3) in [-1, 1] before the in-hole rule
    reference: np.ndarray  # (1, S, S, 3) CLIP-normalised
    source_size: tuple[int, int]
    source_image: Image.Image


@dataclasses.dataclass
class CompositionResult:
    images: list[Image.Image]  # at the source size
    images01: np.ndarray  # (N, R, R, 3) float in [0, 1], model size, before any paste-back
    latents: np.ndarray  # (N, h, w, 4) final latents
    references: list[Image.Image]  # the reference used for each round (self-reference adds rounds)


def load_tokenizer(model_dir: str | os.PathLike, config: ModelConfig):
    """The CLIP tokenizer a text-conditioned model (the Paint-by-T+S baseline) keeps beside its weights (in a
    model directory or a training work directory: `tokenizer/`); None for a reference-conditioned model."""
    if config.conditioning != "text":
        return None
    from sketchcomp_jax.models.clip_tokenizer import CLIPTokenizer
    from sketchcomp_jax.weights.model_dir import model_tokenizer_dir

    return CLIPTokenizer.from_folder(model_tokenizer_dir(model_dir, config))


class SketchCompositionPipeline:
    """Load once, call many times. Compiled programs are cached per (sampler, steps, drop step, batch).

    Open a model with `from_pretrained(path, ...)` (a model directory or a training work directory); the
    constructor takes a config and parameters already in memory (tests, code that holds them already)."""

    def __init__(self, config: ModelConfig, params: dict[str, Any], dtype: Any = jnp.float32,
                 tokenizer: Any = None, description: str = "parameters given in memory"):
        if config.conditioning == "text" and tokenizer is None:
            raise ValueError("a text-conditioned model (the Paint-by-T+S baseline) needs its CLIP tokenizer")
        self.config = config
        self.tokenizer = tokenizer
        self.description = description  # where the parameters came from (shown by the app, logged by tools)
        # Arrays already on devices (e.g. replicated over a mesh by `from_pretrained(sharding=...)`) stay where
        # they are; host arrays go to the default device.
        self.params = jax.device_put(params)
        self.nets = build_networks(config, dtype=dtype)
        self.alphas_cumprod = schedule_for(config.schedule)["alphas_cumprod"]
        vae, cond = self.nets.vae, self.nets.conditioner
        self._encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
        self._decode = jax.jit(
            lambda p, z: vae.apply({"params": p}, (1.0 / config.scale_factor) * z, method=AutoencoderKL.decode)
        )
        self._context = jax.jit(lambda p, x: cond.apply({"params": p}, x))
        self._samplers: dict[tuple, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, step: int | None = None, weights: str | None = None,
                        dtype: Any = jnp.float32, attention: str | None = None,
                        sharding: Any = None) -> "SketchCompositionPipeline":
        """The one way to open a model: a model directory (`launch/convert.py`) or a training work directory
        (`launch/train.py --workdir`; reference- or text-conditioned), local or `gs://`.

        `step`: a training run's checkpoint step (default: the latest). `weights`: "raw" or "ema" (default: a
        run's raw U-Net, or the one set a model directory holds). Only the parameters are read (U-Net, VAE,
        conditioner), never the optimizer state (`model_source.load_model_source`). `dtype`: compute dtype
        (parameters stay float32). `attention` overrides the config's attention backend. `sharding`: a
        `jax.sharding.Sharding` for every parameter (e.g. replicated over the mesh evaluation generates on);
        None puts them on the default device. A text-conditioned model also gets its CLIP tokenizer."""
        source = load_model_source(path, step, weights, sharding)
        log.info("loaded %s", source.description)
        config = source.config.replace(attention=attention) if attention else source.config
        return cls(config, source.params, dtype, load_tokenizer(path, config), source.description)

    # ------------------------------------------------------------------ preprocessing
    def preprocess(
        self,
        image: imageio.ImageLike,
        mask: imageio.ImageLike,
        sketch: imageio.ImageLike | None,
        reference: imageio.ImageLike | None,
        reference_box: Sequence[int] | None = None,
    ) -> PreparedInputs:
        cfg = self.config
        size = (cfg.resolution, cfg.resolution)
        src = imageio.to_rgb(imageio.load_image(image, "image"))
        imageio.check_image_size(src.size, "image")  # also for arrays: a 1×1 source would give a 1×1 result
        image_arr = imageio.to_unit_range(src.resize(size, Image.BICUBIC))
        mask_img = imageio.load_image(mask, "mask")
        _warn_if_resized(mask_img, src, "mask")
        keep = imageio.keep_mask_from_image(mask_img, size)
        if keep.min() == 1.0:
            raise ValueError(
                "mask has no region to fill at the model size (white = fill): draw the region in white, "
                "or check that the mask is not inverted"
            )
        sketch_arr = None
        if cfg.uses_sketch:
            if sketch is None:
                log.info("no sketch given: using an empty one (no strokes)")
                sketch_arr = -np.ones(size[::-1] + (3,), np.float32)
            else:
                sketch_img = imageio.load_image(sketch, "sketch")
                _warn_if_resized(sketch_img, src, "sketch")
                sketch_arr = imageio.sketch_from_image(sketch_img, size)
        elif sketch is not None:
            log.warning("this is a %d-channel model without sketch input: the sketch is ignored", cfg.unet.in_channels)
        if cfg.conditioning == "text":
            if reference is not None or reference_box is not None:
                log.warning("this is a text-conditioned model: the reference is ignored (give a prompt)")
            ref_img = src  # unused by the model; kept so the result records what was given
        else:
            ref_img = self._reference_image(src, reference, reference_box)
        return PreparedInputs(
            image=image_arr[None], keep_mask=keep[None], sketch=None if sketch_arr is None else sketch_arr[None],
            reference=self._clip_pixels(ref_img), source_size=src.size, source_image=src,
        )

    def _reference_image(self, src: Image.Image, reference, box) -> Image.Image:
        if box is not None:
            return src.crop(imageio.check_box(box, src.size))  # inverted and outside-image boxes: own messages
        if reference is None:
            raise ValueError("give a reference image, or a reference_box to crop it from the source (self-reference)")
        return imageio.to_rgb(imageio.load_image(reference, "reference"))

    def _clip_pixels(self, ref: Image.Image) -> np.ndarray:
        s = self.config.clip.image_size
        arr = np.asarray(ref.resize((s, s), Image.BICUBIC), np.float32) / 255.0
        return ((arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32))[None]

    # ------------------------------------------------------------------ sampling
    def _sampler(self, sampler: str, steps: int, drop_after: float, drop_value: float, eta: float, use_cfg: bool):
        key = (sampler, steps, drop_after, drop_value, eta, use_cfg)
        if key not in self._samplers:
            unet = self.nets.unet
            self._samplers[key] = make_sampler(
                lambda p, x, t, c: unet.apply({"params": p}, x, t, c),
                sampler=sampler, num_steps=steps, sketch_drop_after=drop_after, drop_value=drop_value,
                eta=eta, use_cfg=use_cfg, alphas_cumprod=self.alphas_cumprod,
            )
        return self._samplers[key]

    def __call__(
        self,
        image: imageio.ImageLike,
        mask: imageio.ImageLike,
        sketch: imageio.ImageLike | None = None,
        reference: imageio.ImageLike | None = None,
        *,
        num_samples: int = 1,
        seed: int = 0,
        noise: np.ndarray | None = None,
        sampler: str = "plms",
        steps: int = 50,
        guidance_scale: float = 5.0,
        sketch_drop_after: float = 1.0,
        drop_value: float = 0.0,
        eta: float = 0.0,
        vae_encode: str = "sample",
        paste_back: bool = False,
        reference_box: Sequence[int] | None = None,
        self_reference_iterations: int = 0,
        prompt: str | None = None,
    ) -> CompositionResult:
        """Runs the composition. `noise`: initial latents, NCHW (N or 1, 4, h, w) as the PyTorch
        original lays them out (N = num_samples). `self_reference_iterations=k` runs k more rounds, each
        using the padded hole box of the previous result as the reference (`eval_dataloader.py`).
        `prompt`: the text of a text-conditioned model (the T+S baseline; "" is unconditional)."""
        if vae_encode not in ("sample", "mean"):
            raise ValueError(f"vae_encode must be 'sample' or 'mean', got {vae_encode!r}")
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        text_model = self.config.conditioning == "text"
        if text_model and self_reference_iterations:
            raise ValueError("self-reference needs a reference-conditioned model; this one is conditioned on text")
        if prompt is not None and not text_model:
            log.warning("this model is conditioned on a reference image: the prompt is ignored")
        inputs = self.preprocess(image, mask, sketch, reference, reference_box)
        rng = jax.random.PRNGKey(seed)
        rng, noise_rng, enc_rng, eta_rng = jax.random.split(rng, 4)
        x_T = self._initial_noise(noise, num_samples, noise_rng)
        cond = self._spatial_condition(inputs, num_samples, None if vae_encode == "mean" else enc_rng)
        run = self._sampler(sampler, steps, float(sketch_drop_after), float(drop_value), float(eta),
                            use_cfg=guidance_scale != 1.0)
        reference_pixels = inputs.reference
        references = [self._pixels_to_image(reference_pixels)]
        hole_box = imageio.hole_bbox(inputs.keep_mask[0])
        for round_index in range(self_reference_iterations + 1):
            conditioning_input = self.tokenizer(prompt or "") if text_model else reference_pixels
            context = self._context(self.params["conditioner"], jnp.asarray(conditioning_input))
            context = jnp.broadcast_to(context, (num_samples,) + context.shape[1:])
            uncond = self.params["conditioner"]["uncond_vector"]
            cond = cond._replace(context=context, uncond_context=jnp.broadcast_to(uncond, context.shape))
            latents = run(self.params["unet"], x_T, cond, jnp.float32(guidance_scale),
                          eta_rng if eta > 0 else None)
            decoded = np.asarray(self._decode(self.params["vae"], latents))
            images01 = np.clip((decoded + 1.0) / 2.0, 0.0, 1.0)
            if round_index < self_reference_iterations:
                if hole_box is None:
                    break
                crop = Image.fromarray(imageio.to_uint8(images01[0])).crop(hole_box)
                reference_pixels = self._clip_pixels(crop)
                references.append(crop)
        pictures = [self._to_output(img, inputs, paste_back) for img in images01]
        return CompositionResult(pictures, images01, np.asarray(latents), references)

    def _initial_noise(self, noise, num_samples: int, rng) -> jax.Array:
        lat = self.config.latent_size
        shape = (num_samples, lat, lat, self.config.unet.out_channels)
        if noise is None:
            return jax.random.normal(rng, shape, jnp.float32)
        arr = np.asarray(noise, np.float32)
        expected = (shape[3], lat, lat)
        if arr.ndim != 4 or arr.shape[1:] != expected or arr.shape[0] not in (1, num_samples):
            raise ValueError(
                f"noise must be NCHW (N, {expected[0]}, {expected[1]}, {expected[2]}) with N = 1 or num_samples="
                f"{num_samples} (the PyTorch original's layout), got {arr.shape}"
            )
        return jnp.broadcast_to(jnp.asarray(arr.transpose(0, 2, 3, 1)), shape)

    def _spatial_condition(self, inputs: PreparedInputs, num_samples: int, enc_rng) -> SamplingCond:
        cfg = self.config
        lat = cfg.latent_size
        masked = jnp.asarray(inputs.image * inputs.keep_mask)
        moments = self._encode(self.params["vae"], masked)
        if enc_rng is None:
            z_masked = masked_image_latent(moments, None, cfg.scale_factor)
            z_masked = jnp.broadcast_to(z_masked, (num_samples,) + z_masked.shape[1:])
        else:
            # One posterior draw per sample, as the original encodes each batch element separately.
            eps = jax.random.normal(enc_rng, (num_samples, *posterior_latent_shape(moments)))
            z_masked = masked_image_latent(moments, eps, cfg.scale_factor)
        mask_lat, sketch_lat = latent_conditioning(
            jnp.asarray(inputs.keep_mask), None if inputs.sketch is None else jnp.asarray(inputs.sketch),
            (lat, lat), cfg.sketch_edge_type,
        )
        tile = lambda a: None if a is None else jnp.broadcast_to(a, (num_samples,) + a.shape[1:])  # noqa: E731
        return SamplingCond(
            z_masked=z_masked, keep_mask=tile(mask_lat), sketch=tile(sketch_lat),
            context=jnp.zeros((num_samples, 1, cfg.context_dim)), uncond_context=None,
        )

    def _pixels_to_image(self, clip_pixels: np.ndarray) -> Image.Image:
        arr = clip_pixels[0] * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32)
        return Image.fromarray(imageio.to_uint8(arr))

    def _to_output(self, images01: np.ndarray, inputs: PreparedInputs, paste_back: bool) -> Image.Image:
        out = Image.fromarray(imageio.to_uint8(images01))
        if out.size != inputs.source_size:
            out = out.resize(inputs.source_size, Image.BICUBIC)
        if not paste_back:
            return out
        return paste_into_source(out, inputs.source_image, inputs.keep_mask[0, ..., 0])


def _warn_if_resized(img: Image.Image, src: Image.Image, what: str) -> None:
    """The API stretches a mask/sketch of another size onto the image (launch/sample.py refuses it instead)."""
    if img.size != src.size:
        log.warning("%s is %dx%d but the image is %dx%d: stretching it to the image (draw it at the image's size "
                    "to avoid distortion)", what, *img.size, *src.size)


def paste_into_source(generated: Image.Image, source: Image.Image, keep_mask: np.ndarray, feather: float | None = None) -> Image.Image:
    """Composites `generated` into `source` inside the hole only, with a feathered (Gaussian-blurred)
    edge, so pixels away from the hole are exactly the source's (avoids the VAE colour shift, PbE #64).
    `keep_mask` is (H, W) at any size (1 = keep); it is resized to the source size."""
    w, h = source.size
    hole = Image.fromarray(((1.0 - keep_mask) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    feather = max(1.0, min(w, h) / 128) if feather is None else feather
    # Grow the hole before blurring so the generated pixels keep full weight inside it.
    grown = hole.filter(ImageFilter.MaxFilter(2 * int(round(feather)) + 1))
    alpha = np.asarray(grown.filter(ImageFilter.GaussianBlur(feather)), np.float32)[..., None] / 255.0
    mixed = np.asarray(generated, np.float32) * alpha + np.asarray(source, np.float32) * (1 - alpha)
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))

