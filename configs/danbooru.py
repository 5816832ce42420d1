"""Paint-by-Sketch as the paper trains it: 512², initialised from Paint-by-Example + zero sketch channels.

Prepare once:
    python launch/convert.py --src Paint-by-Example/model.ckpt --out models/pbe
    python launch/prepare_data.py --images danbooru/images --tags danbooru/tags --out data/danbooru \
        --sketcher pidinet --pidinet_weights table5_pidinet.pth
(prepare_data.py's defaults keep every image at its native size and run PiDiNet unpadded, so the sketches
are the original's; the crop constants, 10 px pad and ±5 px jitter, assume native resolution: do not add
--max_side or --pidinet_bucket for the paper setting.)

Single GPU node (all local GPUs, data parallel):
    python launch/train.py --config=configs/danbooru.py --workdir runs/pbs \
        --config.init_from=models/pbe --config.data.dir=data/danbooru --config.batch_size=16

TPU pod (run the same command on every worker, e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all
--command="..."`; JAX discovers the pod by itself; FSDP shards weights and Adam moments over chips; paths on a
filesystem all workers mount, e.g. a gcsfuse-mounted bucket):
    python launch/train.py --config=configs/danbooru.py --workdir /mnt/shared/runs/pbs \
        --config.init_from=/mnt/shared/models/pbe --config.data.dir=/mnt/shared/data/danbooru \
        --config.batch_size=256 --config.mesh.strategy=fsdp --config.mesh.ici.data=1 --config.mesh.ici.fsdp=-1

Multi-node GPU without a cluster manager: add `--config.distributed.coordinator=HOST0:1234
--config.distributed.num_processes=N --config.distributed.process_id=I` on each node.
The paper's recipe: lr 1e-5 (AdamW, wd 0.01), 10k warm-up steps, batch 2 (1 × 2 GPUs), 40 epochs, fp32,
reference dropped with p = 0.2, the unconditional vector frozen.

Baselines of Table 1, same recipe and init:
    --config=configs/danbooru.py:paint_by_e     Paint-by-E: 9-channel U-Net, no sketch
    --config=configs/danbooru.py:paint_by_t_s   Paint-by-T+S: the record's tags through the frozen CLIP ViT-L/14
        text encoder instead of the reference; also pass --config.text.encoder_from=clip-vit-large-patch14/
        (a transformers CLIPTextModel / CLIPModel folder or an SD checkpoint) and
        --config.text.tokenizer=clip-vit-large-patch14/ (vocab.json + merges.txt). The data set needs tags
        (prepare_data.py --tags). The U-Net starts from Paint-by-Example as for E+S (context width 768 in both).
"""
from configs.common import apply_variant, base_config


def get_config(variant: str | None = None):
    cfg = base_config()
    cfg.model = dict(resolution=512)  # SD v1 U-Net (12 ch), SD VAE, CLIP ViT-L/14: taken from init_from
    cfg.init_from = ""  # set: a model directory converted from Paint-by-Example (`--in_channels` 12 is applied here)
    cfg.data.dir = ""
    cfg.data.worker_count = 8
    cfg.batch_size = 2
    cfg.total_steps = 1_100_000  # ≈ 40 epochs of 55k images at batch 2
    cfg.sample_steps = 50
    return apply_variant(cfg, variant)
