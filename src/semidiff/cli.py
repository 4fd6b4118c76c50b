"""The ``semidiff`` command: plan | train | eval | predict | demo | data inspect | data synth | list.

Every user-facing error (bad config key, missing or corrupt file, bad label values) is printed
as one line naming the file or key, with exit code 2; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from semidiff.errors import ConfigError, SemidiffError, exit_code


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted config overrides, e.g. train.max_steps=2000 data.labeled=7")


def _add_plan_options(p: argparse.ArgumentParser, dataset_only: bool = False) -> None:
    only = " (with a dataset folder)" if dataset_only else ""
    p.add_argument("--method", default=None,
                   help=f"method{only} (default: mean_teacher with unlabeled images, else supervised)")
    p.add_argument("--budget", default=None, choices=["reduced", "full"],
                   help=f"reduced [default]: 2 CPU cores; full: the literature's GPU budget{only}")
    p.add_argument("--colour-to-grey", action="store_true",
                   help=f"a dataset declaring one channel: convert colour images to grey instead of refusing them{only}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semidiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="measure an nnU-Net-layout dataset and write a complete, commented config")
    p.add_argument("dataset", help="dataset folder (dataset.json, imagesTr/, labelsTr/, imagesUnlabeled/)")
    _add_plan_options(p)
    p.add_argument("-o", "--output", default=None,
                   help="config file to write (default: <dataset>_<method>_<budget>.yaml here)")

    p = sub.add_parser("train", help="train a run from a YAML config, a dataset folder (planned on the fly) "
                                     "or continue a run folder")
    p.add_argument("config", help="YAML config, an nnU-Net-layout dataset folder, or a run folder to continue")
    _add_overrides(p)
    _add_plan_options(p, dataset_only=True)
    p.add_argument("--resume", "--c", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start again")

    p = sub.add_parser("eval", help="evaluate a run folder or checkpoint on a split")
    p.add_argument("target", help="run folder or .ckpt file")
    p.add_argument("--split", default=None, help="split to evaluate (default: the config's val_split)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last", "final"],
                   help="which checkpoint of a run folder (default: best on validation)")
    p.add_argument("--out", default=None,
                   help="output folder (default: RUN/eval_<split>_<checkpoint>[_<output>])")
    p.add_argument("--output", default=None, metavar="NAME",
                   help="which output of the method to evaluate, e.g. diffcl's cs | ds | mean "
                        "(default: the method's configured one)")
    _add_overrides(p)

    p = sub.add_parser("predict", help="predict label maps for an image file or a folder of images")
    p.add_argument("checkpoint", help="a .ckpt file, a run folder (uses its best checkpoint), or a model "
                                      "exported by `semidiff export` (.pt TorchScript or .onnx)")
    p.add_argument("input", help="image file (NIfTI/NRRD/MHA/PNG/TIFF/h5) or folder")
    p.add_argument("output", help="output file (single input) or folder: .nii.gz/.nii/.nrrd/.mha, .png/.tif, or .h5")
    p.add_argument("--device", default="cpu")
    p.add_argument("--intensity", default="auto", choices=["auto", "raw", "stored"],
                   help="raw: a scan as acquired, normalised as the dataset's stored files were made (LA: z-score "
                        "of the whole scan); stored: a file that already carries that normalisation (written from "
                        "the dataset's h5); auto [default]: h5 files are stored ones, every other format is raw")

    p = sub.add_parser("demo", help="few labels + unlabeled images against labels alone on built-in synthetic "
                                    "data: train supervised, BCP, ProtoDiff -> table and figure, in minutes")
    p.add_argument("--out", default="demo_output", help="folder for the data, runs, table and figure")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo's budget)")
    p.add_argument("--seed", type=int, default=0, help="training seed (the data are the same for every seed)")

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("inspect", help="validate a dataset folder and summarise what it holds")
    q.add_argument("root")
    q.add_argument("--reader", default="auto",
                   help="auto (guess from the folder) or a reader name (`semidiff list` prints them)")
    q.add_argument("--num-classes", type=int, default=None)
    q.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a reader option as in a config's data.reader_options, e.g. treat_as_ignore=[7] "
                        "(value read as YAML); repeatable")
    q = dsub.add_parser("prepare", help="convert a raw public download to the layout its reader reads "
                                        "(deterministic, with a sha256 manifest)")
    q.add_argument("dataset", choices=["la", "acdc"])
    q.add_argument("raw", help="raw download folder (LA: <case>/lgemri.nrrd + laendo.nrrd; "
                               "ACDC: patientXXX/patientXXX_frameYY.nii.gz + _gt)")
    q.add_argument("out", help="output folder")
    q.add_argument("--test-list", default=None, help="file of case (LA) or patient (ACDC) ids for test.list")
    q.add_argument("--val-list", default=None, help="ACDC: file of patient ids for val.list")
    q.add_argument("--margin", type=int, default=15, help="LA: voxels kept around the atrium in x and y")
    q = dsub.add_parser("synth", help="write a synthetic dataset (2D or 3D) in the h5 case-list layout")
    q.add_argument("out")
    q.add_argument("--dims", type=int, default=2, choices=[2, 3])
    q.add_argument("--cases", type=int, default=24)
    q.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("bench", help="run a grid of methods x labeled counts x seeds (x noise levels); "
                                     "resumable; rebuilds the report after every cell")
    p.add_argument("config", help="bench YAML (a top-level 'bench' section)")
    p.add_argument("overrides", nargs="*", metavar="bench.key=value", help="override bench keys, e.g. bench.workers=2")
    p.add_argument("--cells", nargs="+", metavar="GLOB", default=None,
                   help="run only the cells whose names match, in this order (e.g. 'diffcl_*' 'protodiff_l6_s1'): "
                        "a grid that spans sessions runs its longest cells first")
    p.add_argument("--list", action="store_true", help="list the (selected) cells, finished or to run, and the time "
                                                       "left; train nothing")
    p = sub.add_parser("report", help="rebuild tables and figures from finished runs, without training")
    p.add_argument("target", help="bench folder, run folder, a folder of run folders, or a bench config "
                                  "(its finished cells and records, in its bench folder)")
    p.add_argument("overrides", nargs="*", metavar="bench.key=value", help="with a bench config: override bench keys")

    p = sub.add_parser("export", help="export the single network of a checkpoint to TorchScript and/or ONNX "
                                      "(verified against PyTorch; predict accepts the result)")
    p.add_argument("checkpoint", help="a .ckpt file or a run folder (uses its best checkpoint)")
    p.add_argument("--format", default="both", choices=["torchscript", "onnx", "both"])
    p.add_argument("--out", default=None,
                   help="output file (one format) or path stem (both); default RUN/export/<checkpoint>.pt|.onnx")

    sub.add_parser("list", help="list the registered methods and networks")
    return parser


def _resolve_checkpoint(target: str, which: str = "best") -> Path:
    path = Path(target)
    if path.is_dir():
        ckpt_dir = path / "checkpoints"
        for name in (which, "final", "last") if which == "best" else (which,):
            cand = ckpt_dir / f"{name}.ckpt"
            if cand.is_file():
                return cand
        raise SemidiffError(f"{path}: no {which} checkpoint in {ckpt_dir}")
    return path


def _is_dataset(path: Path) -> bool:
    return (path / "dataset.json").is_file() and (path / "imagesTr").is_dir()


def cmd_plan(args) -> int:
    from semidiff.config import config_from_dict
    from semidiff.engine.train import check_method_options
    from semidiff.plan import plan_dataset, render_config

    root = Path(args.dataset)
    if not _is_dataset(root):
        raise SemidiffError(f"{root}: not an nnU-Net-layout dataset (needs dataset.json and imagesTr/)")
    plan = plan_dataset(root, args.method, args.budget or "reduced", args.colour_to_grey)
    # What is written always loads and trains.
    check_method_options(config_from_dict(plan.tree, "planned config"), "planned config")
    out = Path(args.output or f"{plan.tree['experiment']['name']}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_config(plan))
    print(plan.format())
    print(f"wrote {out}; train with: semidiff train {out}")
    return 0


def cmd_train(args) -> int:
    from semidiff.config import apply_overrides, config_from_dict, load_config
    from semidiff.engine.train import check_method_options, train

    target = Path(args.config)
    resume = args.resume
    planned = target.is_dir() and not (target / "config.yaml").is_file() and _is_dataset(target)
    if not planned and (args.method or args.budget or args.colour_to_grey):
        raise SemidiffError(f"{target}: --method, --budget and --colour-to-grey apply to a dataset folder; "
                            "in a config set method.name=... instead")
    if planned:
        from semidiff.plan import plan_dataset, render_config

        # One command from folder to model: the plan is printed and kept in the run folder.
        plan = plan_dataset(target, args.method, args.budget or "reduced", args.colour_to_grey)
        print(plan.format())
        source = f"plan of {target} + overrides"
        cfg = config_from_dict(apply_overrides(plan.tree, args.overrides), source)
        check_method_options(cfg, source)
        train(cfg, resume=resume, overwrite=args.overwrite, extra_files={"plan.yaml": render_config(plan)})
        return 0
    if target.is_dir():
        if not (target / "config.yaml").is_file():
            raise SemidiffError(f"{target}: not a run folder (no config.yaml) nor a dataset (dataset.json, imagesTr/)")
        target, resume = target / "config.yaml", True
    cfg = load_config(target, args.overrides)
    check_method_options(cfg, str(target))  # a bad method option fails here, before the run folder is made
    train(cfg, resume=resume, overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    import torch

    from semidiff.config import apply_overrides, config_from_dict
    from semidiff.data.preprocessing import preprocessing_from_config
    from semidiff.engine.data import build_reader, build_splits
    from semidiff.engine.module import load_module
    from semidiff.engine.train import check_method_options
    from semidiff.evaluation.evaluate import evaluate

    ckpt = _resolve_checkpoint(args.target, args.checkpoint)
    module = load_module(str(ckpt))
    cfg = module.cfg
    if args.overrides:
        cfg = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), args.overrides), "checkpoint + overrides")
        check_method_options(cfg, "checkpoint + overrides")
        module.method.override_eval_options(cfg.method.options)  # e.g. DDIM steps; weights stay as trained
    # Eval feeds the model through the reader: it must still make the input the checkpoint recorded.
    now = preprocessing_from_config(cfg)
    if not now.same_transform(module.preprocessing):
        raise SemidiffError(f"{ckpt}: the reader now makes model inputs differently from training "
                            f"(recorded: {module.preprocessing.describe()}; now: {now.describe()}); "
                            "leave data.reader_options, data.normalize and data.resample_factor as trained")
    reader = build_reader(cfg)
    split = args.split or cfg.data.val_split or "holdout"
    if split == "holdout" or (cfg.data.holdout_val is not None and split == cfg.data.val_split):
        refs = build_splits(cfg, reader).val
    else:
        refs = reader.cases(split)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    module.method.predictor(args.output)  # an unknown output name fails here, before any case is read
    suffix = f"_{args.output}" if args.output else ""
    out = Path(args.out) if args.out else run_dir / f"eval_{split}_{ckpt.stem}{suffix}"
    print(f"evaluating {ckpt} on {len(refs)} {split} cases -> {out}")
    res = evaluate(module.method, cfg, reader, refs, out, split=split, checkpoint=f"{ckpt.stem} (step {module.checkpoint_step})",
                   device=torch.device("cpu"), output=args.output)
    print(res["table"])
    print(f"per-case metrics: {out / 'per_case.csv'}; summary: {out / 'summary.json'}")
    return 0


def cmd_predict(args) -> int:
    from semidiff.data.image_io import (
        SUPPORTED,
        check_output,
        output_geometry,
        output_kind,
        suffix_of,
        write_prediction,
    )
    from semidiff.data.preprocessing import read_model_input
    from semidiff.engine.module import load_module
    from semidiff.evaluation.evaluate import labels_from_probs, predict_image
    from semidiff.export import is_exported_file, load_exported

    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and suffix_of(p) in SUPPORTED)
        if not files:
            raise SemidiffError(f"{src}: no image files ({', '.join(SUPPORTED)})")
        pairs = [(f, dst / (f.name if suffix_of(f) not in (".jpg", ".jpeg") else f.stem + ".png")) for f in files]
    else:
        pairs = [(src, dst)]
    for _, out in pairs:
        output_kind(out)  # a format no prediction can be written to is refused before anything runs
    if is_exported_file(args.checkpoint):
        exported = load_exported(args.checkpoint, device=args.device)
        predict_fn, cfg, prep = exported.predict, exported.cfg, exported.preprocessing
    else:
        module = load_module(str(_resolve_checkpoint(args.checkpoint)), map_location=args.device)
        predict_fn, cfg, prep = module.method.predict, module.cfg, module.preprocessing
    if src.is_dir() and pairs and all(_NNUNET_NAME.match(f.name) for f, _ in pairs):
        # nnU-Net naming: <case>_0000.<ext> is the case (its other channel files, if any, are read
        # with it; an RGB file holds all three), and the prediction is <case>.<ext>.
        pairs = [(f, o.with_name(o.name.replace("_0000", "", 1))) for f, o in pairs if "_0000." in f.name]
    palette = _dataset_palette(cfg) if any(suffix_of(o) == ".png" for _, o in pairs) else None
    written: list[Path] = []
    try:
        for inp, out in pairs:
            # The one file-to-input transform training used, recorded in the checkpoint.
            img, image, applied = read_model_input(inp, prep, args.intensity)
            check_output(out, image.shape[1:])  # before predicting: a 3D volume cannot become a PNG
            print(f"{inp}: {applied}")
            probs = predict_image(predict_fn, cfg, image, args.device)
            label = labels_from_probs(cfg, probs)
            written.append(out)  # before writing: a half-written file is removed too
            write_prediction(label, img, out, prep.volume_axes, palette=palette)
            counts = {int(c): int((label == c).sum()) for c in range(cfg.model.num_classes)}
            where = output_geometry(img, out)
            print(f"{inp} -> {out}  shape {label.shape}  voxels per class {counts}" + (f"; {where}" if where else ""))
    except BaseException:
        # All or nothing: a bad input (or Ctrl-C) leaves no prediction of this call behind.
        for path in written:
            path.unlink(missing_ok=True)
            path.with_name(f".tmp-{path.name}").unlink(missing_ok=True)  # write_prediction's temporary
        raise
    return 0


_NNUNET_NAME = re.compile(r"^.+_\d{4}\.")


def _dataset_palette(cfg) -> list[int] | None:
    """The palette of the training dataset's masks (MOSXAV), so that 2D predictions are written
    as the dataset's own labels are; None for datasets whose masks hold plain class ids."""
    from semidiff.data import READERS, create_reader

    try:
        reader = create_reader(cfg.data.reader, cfg.data.root, **cfg.data.reader_options)
        return getattr(reader, "palette", None)
    except SemidiffError:
        # The data folder is not on this machine: fall back to the format's documented palette.
        return getattr(READERS.get(cfg.data.reader), "default_palette", None)


def _auto_reader(root: Path) -> str:
    from semidiff.data.inspect import detect_reader

    return detect_reader(root)


def cmd_data(args) -> int:
    from semidiff.data import create_reader
    from semidiff.data.inspect import inspect_dataset
    from semidiff.data.synthetic import make_synthetic_dataset

    if args.data_command == "prepare":
        from semidiff.data.prepare import MANIFEST_NAME, prepare_acdc, prepare_la

        if args.dataset == "la":
            splits = prepare_la(args.raw, args.out, margin=args.margin, test_list=args.test_list)
        else:
            splits = prepare_acdc(args.raw, args.out, val_list=args.val_list, test_list=args.test_list)
        counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items() if v)
        print(f"wrote {args.dataset} to {args.out} ({counts}); checksums in {Path(args.out) / MANIFEST_NAME}")
        return 0
    if args.data_command == "synth":
        size = (96, 96) if args.dims == 2 else (48, 48, 48)
        root = make_synthetic_dataset(args.out, spatial_dims=args.dims, num_cases=args.cases, size=size, seed=args.seed)
        print(f"wrote a synthetic {args.dims}D dataset to {root}")
        return 0
    root = Path(args.root)
    if not root.is_dir():
        raise SemidiffError(f"{root}: dataset folder not found")
    name = _auto_reader(root) if args.reader == "auto" else args.reader
    kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SemidiffError(f"--option {item!r}: expected KEY=VALUE, e.g. treat_as_ignore=[7]")
        import yaml

        kwargs[key.strip()] = yaml.safe_load(value)
    report = inspect_dataset(create_reader(name, root, **kwargs))
    print(f"reader: {name}")
    print(report.format())
    return 0 if report.ok else 1


def cmd_list(args) -> int:
    from semidiff.data import list_readers
    from semidiff.methods import list_methods
    from semidiff.nets import list_nets

    print("methods:", ", ".join(list_methods()))
    print("networks:", ", ".join(list_nets()))
    print("readers:", ", ".join(list_readers()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow the options (`eval RUN --output ds method.options.x=1`).
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    def dispatch() -> int:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "demo":
            from semidiff.demo import run_demo

            if args.steps is not None and args.steps < 1:
                raise ConfigError(f"--steps must be at least 1, got {args.steps}")
            run_demo(args.out, steps=args.steps, seed=args.seed)
            return 0
        if args.command == "data":
            return cmd_data(args)
        if args.command == "export":
            from semidiff.export import export_checkpoint

            export_checkpoint(_resolve_checkpoint(args.checkpoint), args.format, args.out)
            return 0
        if args.command == "list":
            return cmd_list(args)
        if args.command == "bench":
            from semidiff.bench.runner import run_bench

            return 1 if run_bench(args.config, args.overrides, cells_wanted=args.cells, list_only=args.list) else 0
        if args.command == "report":
            from semidiff.bench.runner import report_from_config
            from semidiff.report.build import write_report

            if Path(args.target).is_file():
                report_from_config(args.target, args.overrides)
            elif args.overrides:
                raise SemidiffError("report: overrides apply to a bench config only, not to a folder")
            else:
                write_report(args.target)
            return 0
        return 1

    return exit_code(dispatch)


if __name__ == "__main__":
    sys.exit(main())
