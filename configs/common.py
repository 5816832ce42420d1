"""Defaults shared by every training config (the paper's Paint-by-Sketch settings)."""
import ml_collections


VARIANTS = ("paint_by_e_s", "paint_by_e", "paint_by_t_s")


def apply_variant(cfg: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
    """The paper's method and its two baselines (Table 1), trained with the same recipe:
    `paint_by_e_s` (default: reference + sketch, 12-channel U-Net), `paint_by_e` (reference only, 9-channel
    Paint-by-Example) and `paint_by_t_s` (text + sketch: the record's tags through a frozen CLIP text encoder)."""
    variant = variant or "paint_by_e_s"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; use one of {VARIANTS} (e.g. --config=configs/demo.py:paint_by_e)")
    cfg.variant = variant
    if variant == "paint_by_e":
        cfg.use_sketch = False
    elif variant == "paint_by_t_s":
        cfg.conditioning = "text"
    return cfg


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    # Model: either `init_from` (a model directory from launch/convert.py) or a random init of `model`.
    cfg.init_from = ""
    cfg.in_channels = 12  # 9-channel inits get zero-initialised sketch channels (the paper's init)
    cfg.model = ml_collections.ConfigDict()
    cfg.conditioning = "example"  # 'example' (PbE/PbS: reference image) or 'text' (the Paint-by-T+S baseline)
    cfg.use_sketch = True  # False trains a 9-channel Paint-by-Example baseline
    # Text baseline only: the frozen CLIP text encoder (transformers folder / checkpoint; empty = random init of
    # model.text) and its tokenizer folder (empty = the dataset's tokenizer/, which the synthetic set has).
    cfg.text = ml_collections.ConfigDict(dict(encoder_from="", tokenizer=""))
    cfg.train_uncond_vector = False  # Paint-by-Sketch never updates it (SPEC §2.2)
    cfg.uncond_prob = 0.2
    cfg.per_sample_uncond = False  # the original drops the reference for the whole batch
    cfg.compute_dtype = "float32"  # or "bfloat16" (parameters stay float32)
    cfg.remat = True
    cfg.attention = "auto"  # attention backend: auto|xla|chunked|splash|cudnn (docs/attention.md)
    # Random inits only (tiny configs): fit the random VAE to the data for this many steps before training the
    # U-Net, as SD's VAE was trained before it (see sketchcomp_jax/train/autoencoder.py).
    cfg.fit_vae_steps = 0
    cfg.fit_vae_batch_size = 16

    cfg.data = ml_collections.ConfigDict()
    cfg.data.dir = ""
    cfg.data.synthetic_images = 0  # >0: make the synthetic cartoon set in `dir` if it is missing
    cfg.data.worker_count = 0
    cfg.data.arbitrary_mask_percent = 0.5

    cfg.batch_size = 2  # global
    cfg.total_steps = 100_000
    cfg.optim = ml_collections.ConfigDict(dict(
        lr=1e-5, warmup_steps=10_000, warmup_f_start=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
        grad_clip_norm=0.0, grad_accum_steps=1,
    ))
    cfg.ema_decay = 0.0  # >0 keeps an EMA of the trainable weights

    # `rules`: (regex, value) sharding rules tried before the defaults (docs/training_at_scale.md), e.g.
    # --config.mesh.rules='(("clip/", "replicated"),)'
    cfg.mesh = ml_collections.ConfigDict(dict(ici=dict(data=-1, fsdp=1, tensor=1), dcn={}, strategy="dp",
                                              fsdp_min_size=2**14, rules=()))
    cfg.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1))

    cfg.peak_flops_per_device = 0.0  # e.g. 197e12 (TPU v5e bf16), 989e12 (H100 bf16 dense): enables MFU in metrics
    cfg.log_every = 50
    cfg.checkpoint_every = 1000
    cfg.max_to_keep = 3
    cfg.sample_every = 5000
    cfg.sample_steps = 50
    cfg.sample_guidance = 5.0
    cfg.eval_every = 5000
    cfg.eval_batches = 4
    return cfg
