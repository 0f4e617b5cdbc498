"""Salience DETR, ResNet-50 backbone, 4 feature levels (strides 8-64): the official R50 model with 80 COCO classes."""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from salience_detr.layers.position_encoding import PositionEmbeddingSine
from salience_detr.modeling.criterion import HybridSetCriterion, SalienceCriterion
from salience_detr.modeling.decoder import SalienceDecoder, SalienceDecoderLayer
from salience_detr.modeling.denoising import GenerateCDNQueries
from salience_detr.modeling.encoder import SalienceEncoder, SalienceEncoderLayer
from salience_detr.modeling.matcher import HungarianMatcher
from salience_detr.modeling.meta_arch import SalienceDETR
from salience_detr.modeling.neck import ChannelMapper, RepVGGPluXNetwork
from salience_detr.modeling.transformer import SalienceTransformer

model = L(SalienceDETR)(
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        freeze_at=2,
    ),
    neck=L(ChannelMapper)(in_channels=[512, 1024, 2048], out_channels="${..embed_dim}", num_outs=4),
    position_embedding=L(PositionEmbeddingSine)(num_pos_feats=128, temperature=10000, normalize=True, offset=-0.5),
    transformer=L(SalienceTransformer)(
        encoder=L(SalienceEncoder)(
            layer=L(SalienceEncoderLayer)(
                embed_dim="${....embed_dim}",
                ffn_dim=2048,
                num_heads=8,
                num_levels="${...num_levels}",
                num_points=4,
                dropout=0.0,
                topk_sa=300,
            ),
            num_layers=6,
            max_num_embedding=200,
            embed_dim="${...embed_dim}",
        ),
        neck=L(RepVGGPluXNetwork)(
            in_channels_list=["${....embed_dim}"] * 4,
            out_channels_list=["${....embed_dim}"] * 4,
            groups=4,
            num_blocks=3,
            norm="BN",
        ),
        decoder=L(SalienceDecoder)(
            layer=L(SalienceDecoderLayer)(
                embed_dim="${....embed_dim}",
                ffn_dim=2048,
                num_heads=8,
                num_levels="${...num_levels}",
                num_points=4,
                dropout=0.0,
            ),
            num_layers=6,
            num_classes="${...num_classes}",
        ),
        num_classes="${..num_classes}",
        num_levels=4,
        num_queries=900,
        embed_dim="${..embed_dim}",
        level_filter_ratio=(0.4, 0.8, 1.0, 1.0),
        layer_filter_ratio=(1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
    ),
    criterion=L(HybridSetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0),
        weight_dict={"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        num_decoder_layers="${..transformer.decoder.num_layers}",
        alpha=0.25,
        gamma=2.0,
    ),
    focus_criterion=L(SalienceCriterion)(
        limit_range=[[-1, 64], [64, 128], [128, 256], [256, 99999]], noise_scale=0.0, alpha=0.25, gamma=2.0, weight=2.0
    ),
    denoising_generator=L(GenerateCDNQueries)(
        num_classes="${..num_classes}",
        label_embed_dim="${..embed_dim}",
        denoising_nums=100,
        label_noise_prob=0.5,
        box_noise_scale=1.0,
    ),
    num_classes=80,
    embed_dim=256,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    select_box_nums_for_evaluation=300,
    size_divisibility=32,
)
