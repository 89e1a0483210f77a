"""The ``edgefm`` command line: one subcommand per stage, reading the same configs as the book."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgefm.config import DATA_ENV, DEVICES, PROFILES, load_profile
from edgefm.tools.arm64 import ARM_CPUS


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


def _cmd_plan(args: argparse.Namespace) -> None:
    from edgefm.plan import a_cost, stages

    profile = load_profile(args.profile)
    cost = a_cost(profile, args.device)
    where = cost["device"].upper() if cost["device"] != "cuda" else "GPU"
    print(f"profile {profile.name}: model A has {cost['params'] / 1e6:.1f} M parameters and "
          f"{cost['flops_per_image'] / 1e9:.2f} GFLOPs per image; one trained image of A takes "
          f"{cost['seconds_per_image']:.3g} s on this machine's {where} (measured)")
    print("stage          trained images   at most (A's cost)   settings")
    for stage in stages(profile):
        flops = 3 * cost["flops_per_image"] * stage.train_images
        hours = cost["seconds_per_image"] * stage.train_images / 3600
        budget = f"{flops / 1e15:7.2f} PFLOP, {hours:6.1f} {where} h" if stage.train_images else " " * 24
        print(f"{stage.name:<14} {stage.train_images:>14,d}   {budget}   {stage.what}; {stage.settings}")


def _cmd_validate(args: argparse.Namespace) -> None:
    from edgefm.data import validate_coco
    from edgefm.data.scenes import coco_summary
    from edgefm.errors import InputError

    if not args.images.is_dir():
        raise InputError(f"{args.images}: no such image folder")
    validate_coco(args.annotations, args.images, read_images=args.read_images)
    summary = coco_summary(args.annotations)
    print(f"{args.annotations}: valid, {summary['images']} images, {summary['objects']} objects")
    print(json.dumps({"per_class": summary["per_class"], "per_size": summary["per_size"]}, indent=2))


def _cmd_pennfudan(args: argparse.Namespace) -> None:
    from edgefm.data import pennfudan

    root = pennfudan.download(args.root.parent) if args.download else args.root
    for name, split in pennfudan.convert(root, args.out, args.eval_count, args.val_count).items():
        print(f"{name}: {split.annotations} (images in {split.images})")


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from edgefm.stages.pretrain import ensure_pretrained, export_pretrained

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


def _finetune_overrides(args: argparse.Namespace) -> dict:
    """``--set FIELD=VALUE`` pairs as typed :class:`~edgefm.config.FinetuneConfig` overrides."""
    from dataclasses import fields

    from edgefm.config import FinetuneConfig
    from edgefm.errors import InputError

    types = {f.name: type(getattr(FinetuneConfig(), f.name)) for f in fields(FinetuneConfig)}
    overrides = {}
    for pair in args.set or ():
        name, _, value = pair.partition("=")
        if name not in types or types[name] not in (int, float, str) or name in ("init", "label_fraction"):
            settable = ", ".join(n for n, t in types.items() if t in (int, float, str)
                                 and n not in ("init", "label_fraction"))
            raise InputError(f"--set {pair}: not a settable fine-tuning field; settable: {settable}")
        try:
            overrides[name] = types[name](value)
        except ValueError:
            raise InputError(f"--set {pair}: {value!r} is not a {types[name].__name__}") from None
    return overrides


def _trained(args: argparse.Namespace, profile=None):
    from edgefm.stages.finetune import ensure_finetuned

    return ensure_finetuned(profile or load_profile(args.profile), args.init, args.fraction,
                            device=getattr(args, "device", "auto"), workers=getattr(args, "workers", None),
                            **_finetune_overrides(args))


def _cmd_train(args: argparse.Namespace) -> None:
    # everything the end of a run needs is imported before it starts: a run of hours must not meet,
    # at its end, library files changed under it since (its record was once lost that way)
    from edgefm.artifacts import atomic_write_json
    from edgefm.stages.feasibility import run_record
    from edgefm.stages.finetune import export_finetuned

    profile = load_profile(args.profile)
    trained = _trained(args, profile)
    print(f"detector: {trained.path}{' (shipped)' if trained.shipped else ''}")
    for record in trained.state.evals:
        print(f"  step {record['step']:>6}: val mAP {record['map']:.3f}, mAP@.5 {record['map50']:.3f}")
    if args.export is not None:
        given = sys.argv[1:]
        if "--profile" in given:  # said once, in front
            at = given.index("--profile")
            given = given[:at] + given[at + 2:]
        command = " ".join(["edgefm", "--profile", profile.name, *given])
        print(f"exported to {export_finetuned(trained, args.export, command, args.device)}")
    if args.record is not None:
        atomic_write_json(args.record, run_record(profile, trained, args.bootstrap))
        print(f"record: {args.record}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from edgefm.data import ensure_dataset
    from edgefm.stages.feasibility import evaluate_finetuned

    profile = load_profile(args.profile)
    metrics = evaluate_finetuned(_trained(args, profile), ensure_dataset(profile).eval, args.bootstrap)
    print(json.dumps(metrics, indent=2))
    low, high = metrics["map_ci"]
    print(f"mAP {metrics['map']:.4f} (95 % bootstrap interval over eval images: {low:.4f} to {high:.4f})")


def _cmd_long_runs(args: argparse.Namespace) -> None:
    from edgefm.stages.feasibility import run_long_runs

    profile = load_profile(args.profile)
    for line in run_long_runs(profile, args.out, args.device, args.parallel, args.workers, args.only):
        print(line)


def _profile_model(args: argparse.Namespace):
    """The profile's trained detector (PyTorch, or the ``--onnx`` file made from it) and its spec."""
    from edgefm.runtime import BundleSpec, onnx_runner, open_session
    from edgefm.stages.finetune import load_detector
    from edgefm.tools.evaluate import torch_runner

    if args.onnx:
        open_session(args.onnx)  # a missing or corrupt file fails now, before A is loaded or trained
    trained = _trained(args)
    model, cfg = load_detector(trained), trained.config.detector
    run = onnx_runner(open_session(args.onnx, threads=args.threads)) if args.onnx else torch_runner(model)
    spec = BundleSpec(model=str(args.onnx or trained.path), class_names=trained.class_names,
                      image_size=cfg.image_size, stride=model.stride, max_detections=cfg.max_detections)
    return run, spec


def _check_images(paths: list[Path]) -> None:
    """Before any model is loaded or trained: every image argument names a file."""
    from edgefm.errors import ImageError

    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ImageError(f"no such image file: {', '.join(missing)}")


def _drawing_names(paths: list[Path]) -> list[str]:
    """A distinct file name for each input's drawing: its stem, numbered when stems repeat."""
    names, used = [], set()
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name in used:
            n += 1
            name = f"{path.stem}-{n}.png"
        used.add(name)
        names.append(name)
    return names


def _cmd_predict(args: argparse.Namespace) -> int:
    from edgefm.artifacts import atomic_path, atomic_write_json
    from edgefm.errors import InputError
    from edgefm.runtime import EdgeDetector, detect
    from edgefm.runtime.images import draw_detections, read_image

    _check_images(args.images)
    if args.json is not None and not args.json.parent.is_dir():
        raise InputError(f"{args.json}: its folder {args.json.parent} does not exist")
    if args.model is not None:  # the deployed path: ONNX Runtime, NumPy and Pillow, no PyTorch
        detector = EdgeDetector(args.model, threads=args.threads, use_ort_format=args.ort)
        run, spec = detector.run, detector.spec
    else:
        run, spec = _profile_model(args)
    records, failures = [], []
    drawings = dict(zip(args.images, _drawing_names(args.images), strict=True))
    for start in range(0, len(args.images), args.batch_size):
        batch = []
        for path in args.images[start:start + args.batch_size]:
            try:
                batch.append((path, read_image(path)))
            except InputError as error:  # one bad image costs only itself
                failures.append({"image": str(path), "error": str(error)})
                print(f"{path}: FAILED: {error}", file=sys.stderr)
        if not batch:
            continue
        found_all = detect(run, [image for _, image in batch], spec, args.threshold)
        for (path, image), found in zip(batch, found_all, strict=True):
            records.append({"image": str(path), "detections": [
                {"name": name, "label": int(label), "score": round(float(score), 4),
                 "box": [round(float(v), 2) for v in box]}
                for name, label, score, box in zip(found["names"], found["labels"], found["scores"],
                                                   found["boxes"], strict=True)]})
            line = f"{path}: {len(found['boxes'])} detections"
            if args.out is not None:
                drawn = args.out / drawings[path]
                with atomic_path(drawn) as tmp:  # a drawing appears whole or not at all
                    draw_detections(image, found, spec.class_names).save(tmp, format="PNG")
                line += f" -> {drawn}"
            print(line)
    if args.json is not None:
        atomic_write_json(args.json, {"images": records, "failed": failures})
        print(f"detections: {args.json}")
    if failures:
        print(f"{len(failures)} of {len(args.images)} images failed", file=sys.stderr)
        return 1
    return 0


def _cmd_arm64(args: argparse.Namespace) -> int:
    import platform
    import shutil

    from edgefm.errors import InputError
    from edgefm.tools import arm64

    _check_images(args.images)
    if args.json is not None and not args.json.parent.is_dir():
        raise InputError(f"{args.json}: its folder {args.json.parent} does not exist")
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64") or shutil.which("qemu-aarch64") is None:
        raise InputError(f"no qemu-aarch64 on this {machine} machine (Debian's qemu-user on x86 has it)")
    root = args.root or arm64.default_root()
    try:
        if not arm64.root_is_ready(root) and args.prepare:
            print(f"preparing the emulated board's Python in {root} (Debian's packages, aarch64 wheels)")
            arm64.prepare_root(root)
        if not arm64.root_is_ready(root):
            raise InputError(f"no emulated Arm board in {root}: prepare one with edgefm arm64 --prepare "
                             "(or make arm64-root)")
        agreement = arm64.arm_agreement(args.bundle, args.images, tuple(args.cpu), root)
    except (RuntimeError, OSError) as error:  # apt, pip or the emulated run failed: no traceback
        raise InputError(str(error).strip()) from error
    print(arm64.describe(agreement))
    if args.json is not None:
        from edgefm.artifacts import atomic_write_json

        atomic_write_json(args.json, agreement)
    return 0 if all(record["same"] for record in agreement.values()) else 1


def _cmd_export(args: argparse.Namespace) -> None:
    from edgefm.stages.finetune import load_detector
    from edgefm.tools.export import export_onnx, onnx_files

    trained = _trained(args)
    path = export_onnx(load_detector(trained), args.out, trained.config.detector.image_size)
    print("exported: " + ", ".join(str(f) for f in onnx_files(path)))


def _print_variants(variants: list[dict], threads: Sequence[int]) -> None:
    columns = "".join(f"{f'{t}t ms':>9}{'x A':>7}" for t in threads)
    print(f"{'variant':36s}{'mAP':>7}{'mAP@.5':>8}{columns}{'MB':>7}{'x A':>6}")
    for v in variants:
        accuracy = f"{v['map']:7.3f}{v['map50']:8.3f}" if "map" in v else f"{'-':>7}{'-':>8}"
        timing = "".join(f"{v[f'latency_ms_{t}t']:9.2f}{v[f'latency_speedup_{t}t']:7.2f}" for t in threads)
        print(f"{v['name'][:36]:36s}{accuracy}{timing}{v['size_bytes'] / 1e6:7.2f}{v['size_reduction']:6.2f}")


def _cmd_bench(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from edgefm.data import ensure_dataset
    from edgefm.stages.finetune import load_detector
    from edgefm.tools.bench import benchmark, module_variant
    from edgefm.tools.evaluate import evaluate_split
    from edgefm.tools.export import op_counts, open_session

    profile = load_profile(args.profile)
    for path in args.models:
        open_session(path)  # a missing or corrupt file fails now, before A is loaded or trained
    trained = _trained(args, profile)
    model, cfg = load_detector(trained), trained.config.detector
    variants = [module_variant(model, cfg.image_size)]
    for path in args.models:
        precision = "int8" if any("Quantize" in op or "Integer" in op for op in op_counts(path)) else "fp32"
        variants.append(variants[0].exported(path.name, path, precision))
    settings = profile.quantize.bench
    settings = replace(settings, threads=tuple(args.threads or settings.threads),
                       runs=args.runs or settings.runs, memory=not args.no_memory)
    accuracy = None
    if not args.no_accuracy:
        split = ensure_dataset(profile).eval
        accuracy = lambda v: evaluate_split(v.runner(2), split, cfg, model.stride)  # noqa: E731
    results = benchmark(variants, cfg.image_size, settings, accuracy)
    _print_variants(results["variants"], settings.threads)
    if args.out is not None:
        from edgefm.artifacts import atomic_write_json

        atomic_write_json(args.out, results)
        print(f"results: {args.out}")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from edgefm.stages.quantization import ensure_quantization

    results = ensure_quantization(load_profile(args.profile))
    _print_variants(results["variants"], (1, 2))
    print(f"models: {results['models_folder']}")


def _cmd_smaller(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from edgefm.stages.smaller import ensure_smaller

    profile = load_profile(args.profile)
    if args.storage or args.trials:
        search = profile.smaller.search
        search = replace(search, storage=args.storage or search.storage, trials=args.trials or search.trials)
        profile = replace(profile, smaller=replace(profile.smaller, search=search))
    results = ensure_smaller(profile)
    _print_variants(results["bench"]["variants"], profile.smaller.bench.threads)
    print(f"B: trial {results['chosen_trial']} of {len(results['trials'])}; models: {results['folder']}")
    if args.ship:
        from edgefm.stages.smaller import ship_final

        for path in ship_final(profile):
            print(f"shipped: {path}")


def _cmd_peer(args: argparse.Namespace) -> None:
    from edgefm.stages.peer import ensure_peer, ship_peer

    results = ensure_peer(load_profile(args.profile))
    low, high = results["eval"]["map_ci"]
    print(f"peer (SSDlite-MobileNetV3, {results['steps']} steps): eval mAP {results['eval']['map']:.3f} "
          f"[{low:.3f}, {high:.3f}]; {results['folder']}")
    if check := results["longer_check"]:
        low, high = check["gap_ci"]
        print(f"the schedule {results['runs']['longer']['steps']} steps long: val mAP {check['gap']:+.1f} "
              f"points [{low:+.1f}, {high:+.1f}] ({check['verdict']}); deployed: the {results['run']} one")
    if args.ship:
        print(f"shipped: {ship_peer(args.profile)}")


def _cmd_compress(args: argparse.Namespace) -> None:
    from edgefm.stages.deploy import compress
    from edgefm.tools.bundle import copy_bundle

    profile = load_profile(args.profile)
    results = compress(profile)
    _print_variants(results["variants"], profile.quantize.bench.threads)
    for target in results["targets"]:
        interval = target["interval"]
        spread = f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else ""
        print(f"  {target['verdict']:<12} {target['target']} ({target['origin']}): "
              f"{target['value']:.3g}{spread}")
    bundle = copy_bundle(results, args.out) if args.out is not None else results["bundle_folder"]
    print(f"C: {results['recipe']} of B; bundle: {bundle}")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    return parse


def _fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def _score(text: str) -> float:
    """An argparse type: a score threshold in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefm",
        description="Foundation models at the edge: build the data, train, compress and measure "
        "detectors. Every stage caches its result under artifacts/<profile>/.",
    )
    parser.add_argument("--profile", default=None,
                        help=f"scale of every stage: {', '.join(PROFILES)} "
                        "(default: $EDGEFM_PROFILE, else 'default')")
    parser.add_argument("--data", default=None, metavar="FOLDER",
                        help="your own COCO data instead of the profile's dataset: a folder with "
                        "instances.json and images/ (split by the library) or with train/, val/ and "
                        f"eval/ each holding both (default: ${DATA_ENV})")
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
        command.add_argument("--fraction", type=_fraction, default=None,
                             help="fraction of the labelled train scenes (default: all)")
        command.add_argument("--set", action="append", metavar="FIELD=VALUE",
                             help="change one field of the profile's fine-tuning recipe, e.g. "
                             "--set steps=6000 --set seed=1 (a separate cached run); repeatable")

    def device_choice(command: argparse.ArgumentParser) -> None:
        command.add_argument("--device", choices=DEVICES, default="auto",
                             help="where to train and evaluate (default: auto, a GPU if there is one); "
                             "never part of a result's key")
        command.add_argument("--workers", type=_at_least(0), default=None, help="data-loading processes "
                             "(default: 0 on the CPU, up to 6 on a GPU)")

    train = commands.add_parser("train", help="fine-tune the detector (cached; resumes if interrupted)")
    model_choice(train)
    device_choice(train)
    train.add_argument("--export", type=Path, default=None, help="copy the detector as the book ships it "
                       "(weights, config, history, the command) to this folder")
    train.add_argument("--record", type=Path, default=None, help="write the run's record (config, val "
                       "curve, eval mAP with its interval) as JSON to this file")
    train.add_argument("--bootstrap", type=_at_least(0), default=1000,
                       help="resamples of the eval images for "
                       "the interval in --record (default: 1000)")
    train.set_defaults(run=_cmd_train)

    evaluate = commands.add_parser("eval", help="COCO mAP of the trained detector on the eval split, "
                                   "with a 95 %% bootstrap interval over the eval images")
    model_choice(evaluate)
    device_choice(evaluate)
    evaluate.add_argument("--bootstrap", type=_at_least(1), default=1000, help="resamples (default: 1000)")
    evaluate.set_defaults(run=_cmd_eval)

    long_runs = commands.add_parser(
        "long-runs", help="train the feasibility study's runs too long for the build (A, its random "
        "twin, more seeds, shorter schedules, label fractions) in parallel, and ship them to weights/")
    long_runs.add_argument("--device", choices=DEVICES, default="auto", help="default: auto")
    long_runs.add_argument("--parallel", type=_at_least(1), default=1, help="runs at a time (default: 1)")
    long_runs.add_argument("--workers", type=_at_least(0), default=None,
                           help="data-loading processes per run")
    long_runs.add_argument("--out", type=Path, default=None,
                           help="where the shipped folders go (default: $EDGEFM_WEIGHTS, else weights/)")
    long_runs.add_argument("--only", nargs="*", default=None, metavar="RUN",
                           help="run only these of the study's runs (by name)")
    long_runs.set_defaults(run=_cmd_long_runs)

    predict = commands.add_parser("predict", help="detect objects in images: with a deployed bundle "
                                  "(ONNX Runtime only, no PyTorch) or the profile's model A")
    predict.add_argument("images", type=Path, nargs="+", help="image files")
    predict.add_argument("--model", type=Path, default=None, help="a bundle folder written by "
                         "`edgefm compress` (default: the profile's model A in PyTorch)")
    predict.add_argument("--ort", action="store_true", help="run the bundle's .ort file (ONNX Runtime's "
                         "mobile format) instead of its .onnx file")
    predict.add_argument("--onnx", type=Path, default=None, help="without --model: run this ONNX file "
                         "made from model A (e.g. an INT8 one) instead of the PyTorch checkpoint")
    predict.add_argument("--out", type=Path, default=Path("predictions"),
                         help="folder for the drawn images (default: predictions)")
    predict.add_argument("--json", type=Path, default=None, help="also write every detection to this file")
    predict.add_argument("--threshold", type=_score, default=0.3, help="lowest score kept")
    predict.add_argument("--batch-size", type=_at_least(1), default=8, help="images per model run")
    predict.add_argument("--threads", type=_at_least(1), default=2, help="ONNX Runtime threads")
    model_choice(predict)
    predict.set_defaults(run=_cmd_predict)

    arm = commands.add_parser("arm64", help="run a bundle on emulated 64-bit Arm cores (Raspberry Pi 4, 5) "
                              "and compare its detections with this machine's (correctness only, no timing; "
                              "exit status 1 if they differ)")
    arm.add_argument("bundle", type=Path, help="a bundle folder written by `edgefm compress`")
    arm.add_argument("images", type=Path, nargs="+", help="image files")
    arm.add_argument("--cpu", nargs="+", default=list(ARM_CPUS), choices=list(ARM_CPUS),
                     help="the emulated cores (default: all)")
    arm.add_argument("--root", type=Path, default=None, help="the emulated board's Python (default: "
                     "$EDGEFM_ARM64_ROOT, else .arm64/ in the project)")
    arm.add_argument("--prepare", action="store_true", help="make the root first if it is missing "
                     "(needs apt-get and the package registries)")
    arm.add_argument("--json", type=Path, default=None, help="also write the comparison to this file")
    arm.set_defaults(run=_cmd_arm64)

    export = commands.add_parser("export", help="export the trained detector to ONNX (weights in FILE.data)")
    export.add_argument("--out", type=Path, default=Path("detector.onnx"), help="the .onnx file to write")
    model_choice(export)
    export.set_defaults(run=_cmd_export)

    bench = commands.add_parser("bench", help="measure mAP, latency, size and memory of the detector "
                                "(PyTorch, the reference) and of ONNX models, in one run")
    bench.add_argument("models", type=Path, nargs="*", help="ONNX files to compare with the detector")
    bench.add_argument("--threads", type=_at_least(1), nargs="+", default=None,
                       help="thread counts (default: 1 2)")
    bench.add_argument("--runs", type=_at_least(1), default=None,
                       help="timed runs per variant (default: the profile's)")
    bench.add_argument("--no-accuracy", action="store_true", help="skip the mAP on the eval scenes")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    bench.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    model_choice(bench)
    bench.set_defaults(run=_cmd_bench)

    quant = commands.add_parser("quantize", help="export A, quantize it to INT8 with every recipe, "
                                "benchmark all variants (cached)")
    quant.set_defaults(run=_cmd_quantize)

    smaller = commands.add_parser("smaller", help="find model B: prune A, distill students, search with "
                                  "optuna, benchmark them all (cached; resumes if interrupted)")
    smaller.add_argument("--storage", default=None, help="optuna storage URL for the search, e.g. "
                         "postgresql://host/db: processes given the same URL share the trials "
                         "(default: SQLite in artifacts/<profile>/search/model-b.db, started from studies/ "
                         "when the book ships a study)")
    smaller.add_argument("--trials", type=_at_least(1), default=None, help="finished trials the search needs "
                         "(default: the profile's)")
    smaller.add_argument("--ship", action="store_true", help="copy the study's long runs (B, its control, "
                         "the long students) to weights/students-<profile>/, where builds read, check them")
    smaller.set_defaults(run=_cmd_smaller)

    peer = commands.add_parser("peer", help="train the detector a practitioner would pick instead "
                               "(SSDlite-MobileNetV3 from scratch) and evaluate it (cached; resumes)")
    peer.add_argument("--ship", action="store_true", help="copy its runs to weights/peer-<profile>/ (the "
                      "longer one to its longer/ folder), where builds read them instead of training")
    peer.set_defaults(run=_cmd_peer)

    compress = commands.add_parser("compress", help="the whole pipeline: A -> B (smaller) -> C (B in INT8), "
                                    "the deployable bundle, one benchmark of every variant (cached)")
    compress.add_argument("--out", type=Path, default=None, help="also copy the bundle to this new folder")
    compress.set_defaults(run=_cmd_compress)

    plan = commands.add_parser("plan", help="every stage of the profile, what sizes it and what it would "
                               "cost at most (from model A's FLOPs and one timed step); downloads nothing")
    plan.add_argument("--device", choices=DEVICES, default="auto",
                      help="where a step of A is timed (default: auto, this machine's GPU if it has one)")
    plan.set_defaults(run=_cmd_plan)

    validate = commands.add_parser("validate", help="check a COCO-format dataset for errors")
    validate.add_argument("annotations", type=Path, help="the instances.json file")
    validate.add_argument("images", type=Path, help="the folder its file_name entries are relative to")
    validate.add_argument("--read-images", action="store_true", help="also open every image")
    validate.set_defaults(run=_cmd_validate)

    fudan = commands.add_parser("pennfudan", help="convert the Penn-Fudan pedestrians to COCO format")
    fudan.add_argument("root", type=Path, help="the unpacked PennFudanPed folder")
    fudan.add_argument("--out", type=Path, required=True,
                       help="where to write {train,val,eval}/instances.json")
    fudan.add_argument("--eval-count", type=_at_least(1), default=50,
                       help="images held out for eval (the last ones)")
    fudan.add_argument("--val-count", type=_at_least(0), default=20,
                       help="images held out for val, before the eval ones (0: no val split)")
    fudan.add_argument("--download", action="store_true", help="download Penn-Fudan first (needs a network)")
    fudan.set_defaults(run=_cmd_pennfudan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    if args.data:  # through the environment, so that the processes a command starts see it too
        os.environ[DATA_ENV] = str(Path(args.data).expanduser().resolve())
    run: Callable[[argparse.Namespace], int | None] = args.run
    from edgefm.errors import InputError

    try:
        status = run(args)
    except InputError as error:
        print(f"edgefm: error: {error}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
