"""The ``edgefm`` command line: one subcommand per stage, reading the same configs as the book."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgefm.config import PROFILES, UnknownProfileError, load_profile


def _cmd_data(args: argparse.Namespace) -> None:
    from edgefm.artifacts import read_metrics
    from edgefm.data import ensure_dataset

    profile = load_profile(args.profile)
    dataset = ensure_dataset(profile)
    metrics = read_metrics(profile.name, "data")
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
    from dataclasses import replace

    from edgefm.pretrain import ensure_pretrained, export_pretrained

    profile = load_profile(args.profile)
    if args.steps is not None:
        profile = replace(profile, pretrain=replace(profile.pretrain, steps=args.steps))
    result = ensure_pretrained(profile)
    m = result.metrics
    print(f"MAE weights: {result.source}")
    if m["steps"]:
        print(f"  {m['steps']} steps, {m['images_seen']} images in {m['seconds']:.0f} s; "
              f"loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}")
    if args.export is not None:
        steps = f" --steps {args.steps}" if args.steps is not None else ""
        command = f"edgefm --profile {profile.name} pretrain{steps} --export {args.export}"
        print(f"exported to {export_pretrained(result, profile, args.export, command)}")


def _cmd_train(args: argparse.Namespace) -> None:
    from edgefm.finetune import ensure_finetuned

    trained = ensure_finetuned(load_profile(args.profile), args.init, args.fraction)
    print(f"detector: {trained.path}")
    for record in trained.state.evals:
        print(f"  step {record['step']:>6}: val mAP {record['map']:.3f}, mAP@.5 {record['map50']:.3f}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from edgefm.data import ensure_dataset
    from edgefm.feasibility import evaluate_finetuned
    from edgefm.finetune import ensure_finetuned

    profile = load_profile(args.profile)
    trained = ensure_finetuned(profile, args.init, args.fraction)
    metrics = evaluate_finetuned(trained, ensure_dataset(profile).eval)
    print(json.dumps(metrics, indent=2))


def _cmd_predict(args: argparse.Namespace) -> None:
    from matplotlib import pyplot as plt
    from torchvision.transforms.v2 import functional as F

    from edgefm.data.coco import read_image
    from edgefm.data.transforms import Letterbox
    from edgefm.finetune import ensure_finetuned, load_detector
    from edgefm.models.centernet import decode
    from edgefm.viz import draw_boxes

    profile = load_profile(args.profile)
    trained = ensure_finetuned(profile, args.init, args.fraction)
    model, names = load_detector(trained), trained.class_names
    size = trained.config.detector.image_size
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = F.pil_to_tensor(read_image(path))
        boxed, info = Letterbox(size)(image, {})
        outputs = model(F.to_dtype(boxed, scale=True)[None])
        found = decode(*(o.detach().numpy() for o in outputs), stride=model.stride,
                       score_threshold=args.threshold)[0]
        fig, ax = plt.subplots(figsize=(5, 5))
        draw_boxes(ax, image, found["boxes"] / info["scale"], found["labels"], names, found["scores"])
        out = args.out / f"{path.stem}.png"
        fig.savefig(out, bbox_inches="tight", dpi=150)
        plt.close(fig)
        print(f"{path}: {len(found['boxes'])} detections -> {out}")


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
    pretrain.add_argument("--steps", type=int, default=None, help="train this many steps instead of "
                          "the profile's (a separate cached run)")
    pretrain.add_argument("--export", type=Path, default=None, help="copy the weights, loadable like a hub "
                          "id, with their config, command and loss log to this folder")
    pretrain.set_defaults(run=_cmd_pretrain)

    def model_choice(command: argparse.ArgumentParser) -> None:
        command.add_argument("--init", choices=("mae", "random"), default=None,
                             help="backbone initialisation (default: the profile's, mae)")
        command.add_argument("--fraction", type=float, default=None,
                             help="fraction of the labelled train scenes (default: all)")

    train = commands.add_parser("train", help="fine-tune the detector (cached; resumes if interrupted)")
    model_choice(train)
    train.set_defaults(run=_cmd_train)

    evaluate = commands.add_parser("eval", help="COCO mAP of the trained detector on the eval split")
    model_choice(evaluate)
    evaluate.set_defaults(run=_cmd_eval)

    predict = commands.add_parser("predict", help="draw the detector's boxes on images")
    predict.add_argument("images", type=Path, nargs="+", help="image files")
    predict.add_argument("--out", type=Path, default=Path("predictions"), help="folder for the drawings")
    predict.add_argument("--threshold", type=float, default=0.3, help="lowest score drawn")
    model_choice(predict)
    predict.set_defaults(run=_cmd_predict)

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
