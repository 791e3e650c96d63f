"""``sact detect``: Faster R-CNN with an adaptive ResNet backbone on COCO-format data.

Sub-commands:

* ``make-data`` -- write a multi-object Cluttered Fashion-MNIST set in COCO format;
* ``train`` -- train (``torchrun`` ready), evaluate on the val split, save the detector;
* ``eval`` -- COCO box AP, backbone FLOPs and speed of a saved detector, or the AP of a
  ready-made detections json (``--detections``).

Data layout (``--data DIR``): ``DIR/images/<split>/`` and
``DIR/annotations/instances_<split>.json`` (what ``make-data`` writes, COCO's own layout
with ``images/`` in front); ``--train-images/--train-ann`` etc. override it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import InputError
from ..fileio import dumps_json


def register(subparsers) -> None:
    p = subparsers.add_parser("detect", help="object detection (Faster R-CNN + FPN) with an SACT backbone",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="detect_command", metavar="{make-data,train,eval}")

    m = sub.add_parser("make-data", help="write multi-object Cluttered Fashion-MNIST in COCO format")
    m.add_argument("--out", required=True, type=Path, help="output folder")
    m.add_argument("--num-train", type=int, default=2000)
    m.add_argument("--num-val", type=int, default=500)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--canvas-size", type=int, default=None, help="canvas side (default: the data module's, 96)")
    m.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST folder (default: auto)")
    m.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    m.set_defaults(func=run, detect_func="make_data")

    t = sub.add_parser("train", help="train a detector")
    _data_args(t, train=True)
    t.add_argument("--model", default="resnet20_cifar", help="registered backbone (sact models)")
    t.add_argument("--mode", default="sact", choices=("vanilla", "act", "sact"))
    t.add_argument("--tau", type=float, default=0.01, help="ponder cost weight")
    t.add_argument("--in-chans", type=int, default=1, choices=(1, 3))
    t.add_argument("--width", type=int, default=None, help="base_channels (cifar) / base_width (imagenet)")
    t.add_argument("--init", type=Path, default=None, help="torchvision .pth or sact checkpoint to warm-start from")
    t.add_argument("--return-stages", nargs="+", default=None, help="stages feeding the FPN (default: stride >= 2)")
    t.add_argument("--trainable-layers", type=int, default=None, help="trainable stages from the top (default: all)")
    t.add_argument("--frozen-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="FrozenBatchNorm2d (default: on with --init, off from scratch)")
    t.add_argument("--fpn-channels", type=int, default=64)
    t.add_argument("--representation-size", type=int, default=256, help="box head width")
    t.add_argument("--anchor-sizes", type=int, nargs="+", default=None, help="one per FPN level (default 8*stride)")
    t.add_argument("--min-size", type=int, default=None, help="transform resize (default: the image size)")
    t.add_argument("--max-size", type=int, default=None)
    t.add_argument("--rpn-proposals", type=int, nargs=2, default=(600, 300), metavar=("TRAIN", "TEST"),
                   help="RPN proposals kept after NMS (torchvision: 2000 1000; fewer suit small images)")
    t.add_argument("--detections-per-img", type=int, default=50)
    t.add_argument("--box-batch-size", type=int, default=128, help="RoIs sampled per image for the box head")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--batch-size", type=int, default=8, help="per process")
    t.add_argument("--lr", type=float, default=0.02)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--hflip", type=float, default=0.5, help="flip probability in training")
    t.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    t.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, required=True, help="run folder: detector.*, metrics.json, tb/")
    t.add_argument("--overwrite", action="store_true", help="replace a detector run already in --out")
    t.set_defaults(func=run, detect_func="train")

    e = sub.add_parser("eval", help="evaluate a detector (or a detections json) with pycocotools")
    _data_args(e, train=False)
    e.add_argument("--checkpoint", type=Path, default=None, help="detector saved by `sact detect train`")
    e.add_argument("--detections", type=Path, default=None, help="COCO results json to score instead of a model")
    e.add_argument("--use-sparse", action="store_true", help="run the backbone through sact.sparse")
    e.add_argument("--max-batches", type=int, default=None)
    e.add_argument("--out", type=Path, default=None, help="folder for metrics.json and detections.json")
    e.add_argument("--overwrite", action="store_true", help="replace metrics.json / detections.json in --out")
    e.set_defaults(func=run, detect_func="eval")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _data_args(p, *, train: bool) -> None:
    p.add_argument("--data", type=Path, default=None, help="root with images/<split>/ and annotations/")
    if train:
        p.add_argument("--train-split", default="train")
        p.add_argument("--train-images", type=Path, default=None)
        p.add_argument("--train-ann", type=Path, default=None)
    p.add_argument("--val-split", default="test")
    p.add_argument("--val-images", type=Path, default=None)
    p.add_argument("--val-ann", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    if not train:
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--in-chans", type=int, default=None, choices=(1, 3), help="default: the checkpoint's")


def _split_paths(args, split_key: str) -> tuple[Path, Path]:
    split = getattr(args, f"{split_key}_split")
    images, ann = getattr(args, f"{split_key}_images"), getattr(args, f"{split_key}_ann")
    if args.data is not None:
        images = images or args.data / "images" / split
        ann = ann or args.data / "annotations" / f"instances_{split}.json"
    if images is None or ann is None:
        raise InputError(f"give --data or both --{split_key}-images and --{split_key}-ann")
    return images, ann


def _check_outputs(folder: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Before any work: ``folder`` can be a folder, and none of ``names`` in it is replaced
    without ``--overwrite``."""
    from ..fileio import check_output_file, check_output_folder, remove_stale_temp_files

    check_output_folder(folder)
    for name in names:
        check_output_file(folder / name, overwrite=overwrite, what="--out file")
    remove_stale_temp_files(folder)


def run(args) -> int:
    return {"make_data": _make_data, "train": _train, "eval": _eval}[args.detect_func](args)


def _make_data(args) -> int:
    from ..data import write_coco

    for split, n in (("train", args.num_train), ("test", args.num_val)):
        if n < 1:
            raise InputError(f"--num-{'train' if split == 'train' else 'val'} must be >= 1, got {n}")
    _check_outputs(args.out, ("annotations/instances_train.json", "annotations/instances_test.json"), args.overwrite)
    for split, n in (("train", args.num_train), ("test", args.num_val)):
        path = write_coco(args.out, split=split, num_images=n, seed=args.seed, canvas_size=args.canvas_size,
                          data_dir=args.data_dir)
        print(f"{split}: {n} images -> {path}")
    return 0


def _dist_setup(device_name: str):
    """Device and process group under torchrun (the same setup as ``sact train``)."""
    from ..engine.distributed import resolve_device, setup_distributed

    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    info = setup_distributed(device)
    return device, info


def _loader(dataset, batch_size: int, *, shuffle: bool, workers: int, world: int, seed: int = 0):
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from ..detection import collate

    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if world > 1 else None
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, generator=gen)


def _train(args) -> int:
    import torch

    from .. import create_model
    from ..checkpoint import atomic_write_bytes
    from ..tb import summary_writer
    from ..detection import CocoDetection, build_detector, evaluate, load_backbone_weights, save_detector, train_one_epoch

    from ..engine.distributed import cleanup_distributed

    if int(os.environ.get("RANK", "0")) == 0:
        _check_outputs(args.out, ("detector.safetensors", "detector.json", "metrics.json"), args.overwrite)
    device, info = _dist_setup(args.device)
    rank, world = info.rank, info.world_size
    torch.manual_seed(args.seed + rank)
    train_images, train_ann = _split_paths(args, "train")
    val_images, val_ann = _split_paths(args, "val")
    train_set = CocoDetection(train_images, train_ann, in_chans=args.in_chans, skip_empty=True, hflip=args.hflip)
    val_set = CocoDetection(val_images, val_ann, in_chans=args.in_chans)
    if len(train_set) == 0:
        raise InputError(f"no annotated images in {train_ann}")
    size = max(train_set.coco.imgs[train_set.ids[0]]["height"], train_set.coco.imgs[train_set.ids[0]]["width"])

    kwargs = {"in_chans": args.in_chans}
    if args.width is not None:
        kwargs["base_channels" if args.model.endswith("_cifar") else "base_width"] = args.width
    model = create_model(args.model, mode=args.mode, **kwargs)
    if args.init is not None:
        load_backbone_weights(model, args.init)
    frozen_bn = args.init is not None if args.frozen_bn is None else args.frozen_bn
    detector = build_detector(
        model, num_classes=train_set.num_classes, return_stages=args.return_stages,
        trainable_layers=args.trainable_layers, frozen_bn=frozen_bn, out_channels=args.fpn_channels,
        anchor_sizes=args.anchor_sizes, min_size=args.min_size or size, max_size=args.max_size or args.min_size or size,
        representation_size=args.representation_size, box_batch_size_per_image=args.box_batch_size,
        rpn_pre_nms_top_n_train=2 * args.rpn_proposals[0], rpn_post_nms_top_n_train=args.rpn_proposals[0],
        rpn_pre_nms_top_n_test=2 * args.rpn_proposals[1], rpn_post_nms_top_n_test=args.rpn_proposals[1],
        box_detections_per_img=args.detections_per_img,
    ).to(device)
    ddp = detector
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(detector, device_ids=[device] if device.type == "cuda" else None)
    train_loader = _loader(train_set, args.batch_size, shuffle=True, workers=args.workers, world=world, seed=args.seed)
    val_loader = _loader(val_set, args.batch_size, shuffle=False, workers=args.workers, world=world)
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    steps_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    total = max(1, args.epochs * steps_per_epoch)
    warm = min(args.warmup_steps, total // 4)
    # linear warm-up then cosine decay, per step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warm + 1) if s < warm else
                                                  0.5 * (1 + torch.cos(torch.tensor((s - warm) / max(1, total - warm) * torch.pi)).item()))
    writer = summary_writer(args.out / "tb") if rank == 0 else None
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func",)}
    meta = {"tau": args.tau, "classes": train_set.class_names, "label_to_category": train_set.label_to_category,
            "config": config}
    history = []
    for epoch in range(args.epochs):
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        base = epoch * steps_per_epoch

        def log(step, logs, base=base):
            if writer is not None:
                for k, v in logs.items():
                    writer.add_scalar(f"train/{k}", v, base + step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], base + step)

        train_logs = train_one_epoch(ddp, train_loader, optimizer, tau=args.tau, device=device, scheduler=scheduler,
                                     max_steps=args.max_steps, on_step=log, progress=rank == 0)
        if (epoch + 1) % args.eval_every and epoch + 1 < args.epochs:
            history.append({"epoch": epoch + 1, "train": train_logs})
            continue
        metrics, results = evaluate(ddp, val_loader, val_set, device=device, progress=rank == 0)
        history.append({"epoch": epoch + 1, "train": train_logs, "val": metrics})
        if rank == 0:
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, epoch + 1)
            _log_ponder_image(writer, detector, val_set, device, epoch + 1)
            print(f"epoch {epoch + 1}/{args.epochs}: loss {train_logs['loss']:.3f} ponder {train_logs['ponder_cost']:.2f} "
                  f"| AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f} backbone GFLOPs {metrics['backbone_gflops_mean']:.4f}"
                  f" ({metrics['images_per_s']:.1f} img/s)", flush=True)
            save_detector(detector, args.out / "detector", meta={**meta, "metrics": metrics, "epoch": epoch + 1})
            doc = {"metrics": metrics, "history": history, "tau": args.tau, "model": model.sact_config,
                   "detector": detector.detector_config, "world_size": world, "checkpoint": str(args.out / "detector")}
            atomic_write_bytes(args.out / "metrics.json", dumps_json(doc, indent=2).encode())
    if writer is not None:
        writer.close()
    cleanup_distributed(info)
    return 0


def _log_ponder_image(writer, detector, dataset, device, step: int) -> None:
    import torch

    from ..viz import ponder_overlay_grid

    images = [dataset[i][0] for i in range(min(4, len(dataset)))]
    with torch.no_grad():
        detector.eval()
        out = detector([im.to(device) for im in images])
    if out.stages:
        writer.add_image("val/ponder_map", ponder_overlay_grid(torch.stack(images), out.stages), step, dataformats="HWC")


def _eval(args) -> int:
    import torch

    from ..checkpoint import atomic_write_bytes
    from ..detection import CocoDetection, coco_evaluate, evaluate, load_detector

    if (args.checkpoint is None) == (args.detections is None):
        raise InputError("give exactly one of --checkpoint and --detections")
    if args.out is not None and int(os.environ.get("RANK", "0")) == 0:
        _check_outputs(args.out, ("metrics.json", "detections.json"), args.overwrite)
    from ..engine.distributed import cleanup_distributed

    device, info = _dist_setup(args.device)
    rank, world = info.rank, info.world_size
    val_images, val_ann = _split_paths(args, "val")
    if args.detections is not None:
        dataset = CocoDetection(val_images, val_ann, in_chans=args.in_chans or 1)
        try:
            results = json.loads(Path(args.detections).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read {args.detections}: {e}") from e
        if not isinstance(results, list):
            raise InputError(f"{args.detections} must hold a list of COCO result dicts")
        try:
            metrics = coco_evaluate(dataset.coco, results, verbose=True)
        except ValueError as e:
            raise InputError(f"{args.detections}: {e}") from e
        out = {"metrics": metrics, "detections": str(args.detections), "annotations": str(val_ann)}
    else:
        detector = load_detector(args.checkpoint, map_location=device)
        in_chans = args.in_chans or detector.backbone.in_chans
        dataset = CocoDetection(val_images, val_ann, in_chans=in_chans)
        if args.use_sparse:
            detector = _sparse(detector)
        loader = _loader(dataset, args.batch_size, shuffle=False, workers=args.workers, world=world)
        with torch.no_grad():
            metrics, results = evaluate(detector, loader, dataset, device=device, progress=rank == 0,
                                        max_batches=args.max_batches)
        out = {"metrics": metrics, "checkpoint": str(args.checkpoint), "annotations": str(val_ann),
               "use_sparse": bool(args.use_sparse), "world_size": world}
    if rank == 0:
        print(dumps_json(out["metrics"], indent=2))
        if args.out is not None:
            atomic_write_bytes(args.out / "metrics.json", dumps_json(out, indent=2).encode())
            if args.checkpoint is not None:
                atomic_write_bytes(args.out / "detections.json", dumps_json(results).encode())
    cleanup_distributed(info)
    return 0


def _sparse(detector):
    from ..detection import sparse_detector

    return sparse_detector(detector)
