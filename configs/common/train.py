# Training options read by train_net.py: detectron2's train dict plus the DETR recipe's extras.
train = dict(
    output_dir="./output/salience_detr",
    init_checkpoint="",
    max_iter=90000,
    amp=dict(enabled=False, dtype="float16"),  # CUDA only; dtype "float16" (with a GradScaler) or "bfloat16"
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    # model_best.pth: the checkpoint with the best `metric` of the evaluations so far (mode "max" or "min")
    best_checkpointer=dict(enabled=True, metric="bbox/AP", mode="max"),
    log_period=20,
    device="cuda",
    # global L2 norm (docs/model.md#optimizer); each module in `separate` is clipped on its own, so that the add-on
    # RoI head (trained by its own loss alone) does not change the step of the rest of the model
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0, separate=["roi_refine"]),
    # module paths that train, e.g. ["roi_refine"] to add the RoI head to a trained checkpoint; the rest stays as
    # loaded (no gradients, eval mode). None: everything trains
    trainable=None,
    accumulate_steps=1,  # optimizer step every N batches: effective batch = N x total_batch_size
    seed=-1,  # -1: a random seed, logged
    ema=dict(enabled=False, decay=0.9998),  # evaluation uses the EMA weights when enabled
    overwrite=False,  # True: a new run may replace the checkpoints of an earlier run in output_dir (deleted first)
    fast_dev_run=False,  # True: 2 iterations, a checkpoint and an evaluation on 2 images, to test a set-up
    # before the model is built, check that each dataset's image files exist, decode and have the json's size: all
    # of them up to this many per dataset, a seeded random sample of this many beyond (1000 COCO images: ~2 s); 0: off
    check_images=1000,
)
