#!/usr/bin/env python
"""Train and evaluate Salience DETR with a LazyConfig, in the shape of detectron2's lazyconfig_train_net.

  python train_net.py --config-file configs/salience_detr/salience_detr_tiny_synthetic.py train.device=cpu
  python train_net.py --config-file CONFIG --num-gpus 8                       # multi-GPU (NCCL)
  python train_net.py --config-file CONFIG --num-gpus 2 train.device=cpu      # two CPU processes (GLOO)
  python train_net.py --config-file CONFIG --resume                           # continue at the last iteration + 1
  python train_net.py --config-file CONFIG --eval-only train.init_checkpoint=model_final.pth

Everything after the flags is a ``key=value`` override of the config. One iteration is one optimizer step
(``train.accumulate_steps`` batches).
"""

from __future__ import annotations

# first, in a block of its own: besides registering the model and datasets, the import hides torch's jit.script
# deprecation warning that detectron2 and fvcore trigger when they are imported (salience_detr.compat)
import salience_detr  # noqa: F401

# isort: split
import logging
import os

import torch
from detectron2.config import instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from salience_detr.config.loading import config_dataset_names, load_config, load_raw_config, training_metadata
from salience_detr.data.image_check import check_images_on_each_machine
from salience_detr.engine import (
    AtomicDetectionCheckpointer,
    BestCheckpointer,
    EMAHook,
    ModelEMA,
    ModelIterationHook,
    freeze_for_config,
    launch,
    resolve_amp,
    trainer_from_config,
)
from salience_detr.engine.preflight import check_device, claim_output_dir, eval_weights, resume_has_work
from salience_detr.engine.run_lock import trim_metrics
from salience_detr.modeling.cpu_inference import optimize_on_cpu
from salience_detr.tools.user_errors import exit_on_user_error
from salience_detr.utils.held_logs import held_records, replay

logger = logging.getLogger("salience_detr.train_net")

FAST_DEV_RUN_ITERS = 2
FAST_DEV_RUN_EVAL_IMAGES = 2


def apply_fast_dev_run(cfg) -> None:
    """Shrink the run to a few iterations, one checkpoint and an evaluation on a couple of images."""
    if not cfg.train.get("fast_dev_run", False):
        return
    cfg.train.max_iter = FAST_DEV_RUN_ITERS
    cfg.train.eval_period = FAST_DEV_RUN_ITERS
    cfg.train.checkpointer.period = FAST_DEV_RUN_ITERS
    cfg.train.log_period = 1
    cfg.dataloader.test.dataset.max_images = FAST_DEV_RUN_EVAL_IMAGES


def share_cpu_threads(cfg) -> None:
    """Several CPU training processes on one machine split its cores instead of each taking all of them."""
    if torch.device(cfg.train.device).type == "cpu" and comm.get_local_size() > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))


def prepare_model(cfg) -> torch.nn.Module:
    model = instantiate(cfg.model)
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and comm.get_world_size() > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device)


def do_test(cfg, model, ema: ModelEMA | None = None) -> dict:
    """Evaluate ``model`` (or its EMA copy when EMA is on) with the config's evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    eval_model = ema.model if ema is not None else model
    if not cfg.dataloader.evaluator.get("output_dir"):
        cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    test_loader = instantiate(cfg.dataloader.test)  # first: loading a generated dataset creates its json
    results = inference_on_dataset(eval_model, test_loader, instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def _trainer_hooks(cfg, model, trainer, checkpointer, ema, resume: bool = False) -> list:
    """Hooks in detectron2's order: timer, EMA, LR, checkpoint, eval, writers (main process only)."""
    hook_list = [hooks.IterationTimer(), ModelIterationHook(model)]  # the iteration the RoI warm-up reads
    if ema is not None:
        hook_list.append(EMAHook(ema))
    hook_list.append(hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)))
    if comm.is_main_process():
        hook_list.append(hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer))
    hook_list.append(hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema)))
    best = cfg.train.get("best_checkpointer", {"enabled": True})
    if comm.is_main_process() and best.get("enabled", True):
        metric, mode = best.get("metric", "bbox/AP"), best.get("mode", "max")
        hook_list.append(BestCheckpointer(cfg.train.eval_period, checkpointer, metric, mode, resume=resume))
    if comm.is_main_process():
        writers = default_writers(cfg.train.output_dir, cfg.train.max_iter)
        hook_list.append(hooks.PeriodicWriter(writers, period=cfg.train.log_period))
    return hook_list


def do_train(args, cfg) -> None:
    amp_dtype = resolve_amp(cfg.train.amp.enabled, cfg.train.amp.get("dtype", "float16"), cfg.train.device)
    model = prepare_model(cfg)
    logger.info("Model:\n%s", model)
    frozen = freeze_for_config(model, cfg.train.get("trainable"))
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    ddp_kwargs = dict(cfg.train.ddp)
    if torch.device(cfg.train.device).type == "cpu":
        ddp_kwargs["device_ids"] = None
    model = create_ddp_model(model, **ddp_kwargs)
    ema = ModelEMA(model, cfg.train.ema.decay) if cfg.train.ema.enabled else None

    trainer = trainer_from_config(cfg, model, instantiate(cfg.dataloader.train), optimizer, amp_dtype, frozen)
    extra = {"ema": ema} if ema is not None else {}
    checkpointer = AtomicDetectionCheckpointer(
        model,
        cfg.train.output_dir,
        metadata=training_metadata(cfg, args.config_file),
        allow_new_classes=True,  # train.init_checkpoint may hold other classes (fine-tuning); resuming never does
        trainer=trainer,
        **extra,
    )
    trainer.register_hooks(_trainer_hooks(cfg, model, trainer, checkpointer, ema, resume=args.resume))

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if start_iter and not resume_has_work(start_iter, cfg.train.max_iter, checkpointer.get_checkpoint_file()):
        return
    if start_iter and comm.is_main_process():
        trim_metrics(cfg.train.output_dir, start_iter)  # the rows this resume is about to log again
    trainer.train(start_iter, cfg.train.max_iter)


def load_ema_for_eval(cfg, model, extra_state: dict) -> ModelEMA | None:
    """The checkpoint's EMA weights when train.ema.enabled; without them, evaluate the plain weights."""
    if not cfg.train.ema.enabled:
        return None
    if "ema" not in extra_state:
        logger.warning(
            "train.ema.enabled but %s holds no EMA weights; evaluating its model weights.", cfg.train.init_checkpoint
        )
        return None
    ema = ModelEMA(model, cfg.train.ema.decay)
    ema.load_state_dict(extra_state["ema"])
    return ema


def main(args) -> None:
    with held_records("salience_detr") as early_records:  # logged before log.txt exists: replayed below
        cfg = load_config(args.config_file, args.opts)
        check_device(cfg.train.device)
        weights = eval_weights(cfg.train.init_checkpoint) if args.eval_only else None
        claim_output_dir(cfg, resume=args.resume, eval_only=args.eval_only, is_main=comm.is_main_process())
        splits = ("test",) if args.eval_only else ("train", "test")  # evaluation reads no training image
        names = [name for split in splits for name in config_dataset_names(cfg, split)]
        check_images_on_each_machine(cfg.train.get("check_images", 0), names)  # bad files named now, not hours in
    apply_fast_dev_run(cfg)
    default_setup(cfg, args)
    share_cpu_threads(cfg)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="salience_detr")
    replay(early_records)
    logger.info("Running with train.device=%s, world size %d", cfg.train.device, comm.get_world_size())

    if args.eval_only:
        model = prepare_model(cfg)
        extra_state = AtomicDetectionCheckpointer(model).load(weights)
        ema = load_ema_for_eval(cfg, model, extra_state)
        # the model never trains here: on a CPU, the inference levers (benchmarks/speed.md) unless opted out
        changed = None if args.no_cpu_speedups else optimize_on_cpu((ema.model if ema is not None else model).eval())
        if changed:
            logger.info("CPU inference levers (modules changed): %s", changed)
        do_test(cfg, create_ddp_model(model), ema)
    else:
        do_train(args, cfg)


def main_refusing_bad_input(args) -> None:
    """``main`` as the command runs it: a wrong input (a typo in an override, a checkpoint of another model, an
    output folder in use) ends with its one-line message and exit status 2, not a traceback."""
    with exit_on_user_error("train_net.py"):
        main(args)


def parse_args(argv: list[str] | None = None):
    parser = default_argument_parser()
    parser.add_argument(
        "--no-cpu-speedups",
        action="store_true",
        help="--eval-only on a CPU: evaluate the plain model, without the levers of modeling.cpu_inference",
    )
    return parser.parse_args(argv)


def launch_device(args) -> str | None:
    """``train.device``, read before the processes start so that they join with its backend (GLOO for the CPU even
    where CUDA is present); None for a single process, which needs no process group."""
    if args.num_gpus * args.num_machines <= 1:
        return None
    return load_raw_config(args.config_file, args.opts).train.device


if __name__ == "__main__":
    args = parse_args()
    launch(
        main_refusing_bad_input,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=launch_device(args),
    )
