"""A small Salience DETR trained from scratch on the built-in synthetic shapes dataset, on CPU in minutes.

The README's first command uses it. Same architecture as the R50 model, scaled down: ResNet-18 with
GroupNorm (no pretrained weights here, and batches of 4), 128 channels, 2 encoder and 3 decoder layers,
100 queries, 20 denoising queries, ~256 px images. Every backbone weight trains at the full learning rate
(the 0.1x factor of the recipe is for pretrained backbones).
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import ResNet

from ..common.data.synthetic import dataloader, datasets
from ..common.optim import AdamW as optimizer
from ..common.schedule import multistep_with_warmup
from ..common.train import train
from ..models.salience_detr_r50 import model

MAX_ITER = 1200  # 0.68-0.76 s per iteration on 2 idle cores: 14-16 minutes to box AP 30-33 (README); 600 gave AP ~13

model.num_classes = 5
model.embed_dim = 128
model.position_embedding.num_pos_feats = 64
model.backbone.stem.norm = "GN"
model.backbone.stages = L(ResNet.make_default_stages)(depth=18, norm="GN")
model.backbone.freeze_at = 0
model.neck.in_channels = [128, 256, 512]
model.transformer.encoder.num_layers = 2
model.transformer.encoder.layer.ffn_dim = 512
model.transformer.encoder.layer.topk_sa = 100
model.transformer.layer_filter_ratio = (1.0, 0.6)
model.transformer.neck.num_blocks = 1
model.transformer.decoder.num_layers = 3
model.transformer.decoder.layer.ffn_dim = 512
model.transformer.num_queries = 100
model.denoising_generator.denoising_nums = 20
model.select_box_nums_for_evaluation = 100

optimizer.lr = 2e-4
optimizer.params.low_lr_keywords = ["sampling_offsets"]

lr_multiplier = multistep_with_warmup(MAX_ITER, [int(MAX_ITER * 0.85)], warmup_iters=50)


# Loading in the training process: on a CPU the training threads already take every core, and a worker process
# takes one from them. 100 iterations of train_net on 2 idle cores, alternating: 0.73-0.75 s per iteration with no
# worker against 0.83-0.86 with one or two at one hour, 0.57-0.62 against 0.58-0.63 at another (never slower).
# Mapping a batch of these small images costs ~12 ms.
dataloader.train.num_workers = 0

train.device = "cpu"
train.output_dir = "./output/salience_detr_tiny_synthetic"
train.max_iter = MAX_ITER
train.eval_period = MAX_ITER
train.checkpointer.period = 200
train.log_period = 20
train.seed = 0
