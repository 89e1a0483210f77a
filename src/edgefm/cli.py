"""The ``edgefm`` command line: one subcommand per stage, reading the same configs as the book."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgefm.config import PROFILES, UnknownProfileError, load_profile


def _cmd_data(args: argparse.Namespace) -> None:
    from edgefm.data import dataset_metrics, ensure_dataset

    dataset = ensure_dataset(load_profile(args.profile))
    metrics = dataset_metrics(dataset)
    print(f"dataset: {dataset.root}")
    for name in ("train", "val", "eval"):
        if (split := getattr(dataset, name)) is not None:
            print(f"  {name:5s} {metrics[f'{name}_images']:>6} images  {split.annotations}")
    if dataset.pool is not None:
        print(f"  pool  {metrics['pool_images']:>6} images  {dataset.pool}")


def _cmd_validate(args: argparse.Namespace) -> None:
    from edgefm.data import validate_coco
    from edgefm.data.coco import read_image
    from edgefm.data.scenes import coco_summary

    coco = validate_coco(args.annotations, args.images)
    if args.read_images:
        for image in coco["images"]:
            read_image(args.images / image["file_name"])
    summary = coco_summary(args.annotations)
    print(f"{args.annotations}: valid, {summary['images']} images, {summary['objects']} objects")
    print(json.dumps({"per_class": summary["per_class"], "per_size": summary["per_size"]}, indent=2))


def _cmd_pennfudan(args: argparse.Namespace) -> None:
    from edgefm.data import pennfudan

    root = pennfudan.download(args.root.parent) if args.download else args.root
    for name, split in pennfudan.convert(root, args.out, eval_count=args.eval_count).items():
        print(f"{name}: {split.annotations} (images in {split.images})")


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from edgefm.pretrain import ensure_pretrained

    result = ensure_pretrained(load_profile(args.profile))
    m = result.metrics
    print(f"MAE weights: {result.source}")
    if m["steps"]:
        print(f"  {m['steps']} steps, {m['images_seen']} images in {m['seconds']:.0f} s; "
              f"loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefm",
        description="Foundation models at the edge: build the data, train, compress and measure "
        "detectors. Every stage caches its result under artifacts/<profile>/.",
    )
    parser.add_argument("--profile", default=None,
                        help=f"scale of every stage: {', '.join(PROFILES)} "
                        "(default: $EDGEFM_PROFILE, else 'default')")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="build (or find) the profile's dataset and print its splits")
    data.set_defaults(run=_cmd_data)

    pretrain = commands.add_parser(
        "pretrain", help="pretrain the profile's MAE on the unlabeled pool (resumes if interrupted)"
    )
    pretrain.set_defaults(run=_cmd_pretrain)

    validate = commands.add_parser("validate", help="check a COCO-format dataset for errors")
    validate.add_argument("annotations", type=Path, help="the instances.json file")
    validate.add_argument("images", type=Path, help="the folder its file_name entries are relative to")
    validate.add_argument("--read-images", action="store_true", help="also open every image")
    validate.set_defaults(run=_cmd_validate)

    fudan = commands.add_parser("pennfudan", help="convert the Penn-Fudan pedestrians to COCO format")
    fudan.add_argument("root", type=Path, help="the unpacked PennFudanPed folder")
    fudan.add_argument("--out", type=Path, required=True, help="where to write {train,eval}/instances.json")
    fudan.add_argument("--eval-count", type=int, default=50, help="images held out for eval (the last ones)")
    fudan.add_argument("--download", action="store_true", help="download Penn-Fudan first (needs a network)")
    fudan.set_defaults(run=_cmd_pennfudan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    from edgefm.data.coco import DatasetError
    from edgefm.data.fashion_mnist import FashionMNISTNotFound
    from edgefm.training import CheckpointError

    try:
        run(args)
    except (UnknownProfileError, DatasetError, FashionMNISTNotFound, CheckpointError) as error:
        print(f"edgefm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
