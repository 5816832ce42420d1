"""Tiny Paint-by-Sketch on the synthetic cartoon set: CPU-friendly, a few minutes.

    python launch/train.py --config=configs/demo.py --workdir runs/demo
    python launch/train.py --config=configs/demo.py:paint_by_e --workdir runs/demo_e      # baseline: no sketch
    python launch/train.py --config=configs/demo.py:paint_by_t_s --workdir runs/demo_ts   # baseline: tags + sketch

Random init of a tiny model (64² images, VAE factor 4, 32² CLIP input); the synthetic data set is made
in `runs/data/synthetic` on first use. Re-running the same command resumes from the last checkpoint.
The text baseline uses a tiny random CLIP text tower and the synthetic set's own tokenizer.
"""
from configs.common import apply_variant, base_config


def get_config(variant: str | None = None):
    cfg = base_config()
    cfg.model = dict(
        resolution=64,
        context_dim=32,
        unet=dict(in_channels=12, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(1, 2), num_heads=2, context_dim=32),
        vae=dict(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=64),
        clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8),
        mapper=dict(width=32, layers=5, heads=1),
    )
    cfg.remat = False
    cfg.data.dir = "runs/data/synthetic"
    cfg.data.synthetic_images = 128
    cfg.batch_size = 8
    cfg.total_steps = 300
    cfg.optim.lr = 2e-4
    cfg.optim.warmup_steps = 20
    cfg.log_every = 10
    cfg.checkpoint_every = 100
    cfg.sample_every = 150
    cfg.sample_steps = 10
    cfg.eval_every = 150
    cfg.eval_batches = 2
    apply_variant(cfg, variant)
    if cfg.conditioning == "text":
        # 600 ≥ the synthetic tokenizer's 556 tokens; width = the U-Net's context_dim.
        cfg.model["text"] = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77)
    return cfg
