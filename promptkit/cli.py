"""The ``promptkit`` command: train, eval, score, extract, compare, info.

Exit codes: 0 success, 1 a user or data error (one line on stderr, no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from promptkit.data.atomic import atomic_write

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, RuntimeError, FloatingPointError)


def _add_model_args(parser: argparse.ArgumentParser, default_model: str | None = "promptkit-tiny") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="open_clip model name (default: the embedded promptkit-tiny)")
    group.add_argument("--pretrained", default=None,
                       help="pretrained tag (e.g. openai, needs the weights in the local cache) or a weights "
                            "file (.safetensors/.bin/.pt)")
    group.add_argument("--quick-gelu", choices=["auto", "yes", "no"], default="auto",
                       help="QuickGELU activations (OpenAI weights need them; auto detects)")


def _add_data_args(parser: argparse.ArgumentParser, with_train: bool = True) -> None:
    group = parser.add_argument_group("data (none given: the embedded default)")
    if with_train:
        group.add_argument("--pool", help="LAPT: retrieval pool for its training images (image folder, list file, "
                                          "embedded:<split> or a .safetensors feature file; default: the embedded "
                                          "training images, labels ignored)")
        group.add_argument("--train", help="ID training images: an image folder (one subfolder per class) or a "
                                            "list file of `path label` lines")
    group.add_argument("--id", help="ID test images: folder or list file")
    group.add_argument("--ood", action="append", default=[], metavar="NAME=DIR",
                       help="an OOD test set (repeat for several)")
    group.add_argument("--benchmark", help="a standard protocol: imagenet1k, imagenet100, imagenet10, imagenet20")
    group.add_argument("--data-root", help="folder with the benchmark's data (see promptkit.data.specs)")
    group.add_argument("--classes", help="ID class names in label order: a text file (one per line) or a shipped "
                                         "list (imagenet1k, imagenet100, imagenet10, imagenet20)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    group.add_argument("--backend", default="auto", help="op backend: auto, torch, cpp, triton, cuda")
    group.add_argument("--cache-dir", default=None, help="feature cache (default $PROMPTKIT_CACHE or "
                                                          "~/.cache/promptkit/features)")
    group.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    group.add_argument("--shard-size", type=int, default=4096,
                       help="images per feature-cache shard: the unit a torchrun rank encodes and a rerun resumes")
    group.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip",
                       help="unreadable images: skip with a warning and a count (default), or fail naming the file")
    group.add_argument("--fpr-positive", choices=["id", "ood"], default="id",
                       help="FPR95 convention: id (MCM/LSN/NegPrompt tables) or ood (OpenOOD/LAPT)")
    group.add_argument("--keep-id", type=float, default=0.95,
                       help="share of held-out ID images the saved decision threshold keeps as ID (default 0.95)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--plots", action="store_true", help="also write score histograms and ROC curves")


def build_parser() -> argparse.ArgumentParser:
    from promptkit.methods import METHODS

    parser = argparse.ArgumentParser(prog="promptkit", description="Prompt learning for OOD detection with CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="learn prompts (or set up a zero-shot method), evaluate, save")
    train.add_argument("--method", required=True, choices=sorted(METHODS))
    train.add_argument("--shots", type=int, default=16, help="training images per class (0: all)")
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--output", help="folder for prompts and metrics (default promptkit_runs/METHOD-seedS)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a method setting, e.g. --set epochs=10 (see the method's Config)")
    _add_model_args(train)
    _add_data_args(train)
    _add_run_args(train)

    evaluate = sub.add_parser("eval", help="evaluate saved prompts on ID and OOD sets")
    evaluate.add_argument("--prompts", required=True, help="folder written by `promptkit train`")
    evaluate.add_argument("--output", help="folder for metrics.json (default: the prompts folder)")
    _add_model_args(evaluate, default_model=None)
    _add_data_args(evaluate, with_train=False)
    _add_run_args(evaluate)

    score = sub.add_parser("score", help="score images with saved prompts and write a CSV with ID/OOD decisions")
    score.add_argument("--prompts", required=True)
    score.add_argument("--images", required=True, help="image folder or list file")
    score.add_argument("--output", help="CSV file (default: scores.csv in the prompts folder)")
    _add_model_args(score, default_model=None)
    _add_run_args(score)

    extract = sub.add_parser("extract", help="fill the feature cache for a set of images")
    extract.add_argument("--images", required=True, help="image folder, list file or embedded:<split>")
    _add_model_args(extract)
    _add_run_args(extract)

    compare = sub.add_parser("compare", help="train and evaluate several methods over several seeds")
    compare.add_argument("--methods", required=True, help="comma-separated, e.g. mcm,coop")
    compare.add_argument("--seeds", default="1,2,3")
    compare.add_argument("--shots", type=int, default=16)
    compare.add_argument("--output", default="promptkit_runs/compare")
    compare.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                         help="override a setting of one method, e.g. --set coop.epochs=10")
    _add_model_args(compare)
    _add_data_args(compare)
    _add_run_args(compare)

    collect = sub.add_parser("collect", help="collect training images for the ID and mined negative labels (LAPT)")
    collect.add_argument("--output", required=True, help="folder for collection.txt, classnames.txt, "
                                                         "features.safetensors and negatives.txt")
    collect.add_argument("--negatives", type=int, default=1000, help="M negative labels to mine (default 1000)")
    collect.add_argument("--vocabulary", help="word list file (default: the shipped WordNet list)")
    collect.add_argument("--per-label", type=int, default=16, help="images per label (retrieval top-k, generation)")
    collect.add_argument("--pool", help="retrieve from this pool (image folder, list file, embedded:<split> or "
                                        ".safetensors features; default: embedded:train)")
    collect.add_argument("--folders", help="also take images from FOLDER/<label>/ subfolders")
    collect.add_argument("--generate", metavar="MODEL", help="also generate images with this diffusers model "
                                                               "(needs diffusers and a GPU)")
    _add_model_args(collect)
    _add_data_args(collect, with_train=False)
    _add_run_args(collect)

    sub.add_parser("info", help="versions, built backends, and why any backend is missing")
    return parser


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> {KEY: python value} (numbers, None, booleans and lists parsed; else str)."""
    settings = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            settings[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            settings[key] = raw
    return settings


def _options(args):
    from promptkit.pipeline import RunOptions

    return RunOptions(device=args.device, backend=args.backend, cache_dir=args.cache_dir,
                      batch_size=args.batch_size, on_bad_image=args.on_bad_image, keep_id=args.keep_id,
                      progress=not args.no_progress and sys.stderr.isatty(), positive=args.fpr_positive,
                      shard_size=args.shard_size)


def is_main() -> bool:
    """True on the rank that prints and writes results (every plain single-process run)."""
    from promptkit.distributed import is_main as main_rank

    return main_rank()


def _start_distributed(args) -> None:
    """Join torchrun's process group (a no-op without torchrun) and give this rank its own GPU."""
    from promptkit.distributed import init_distributed, local_device

    if init_distributed() and hasattr(args, "device"):
        args.device = local_device(args.device)


def _quick_gelu(args) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.quick_gelu]


def _clip(args, meta: dict | None = None):
    from promptkit.clip import load_clip

    name, pretrained = args.model, args.pretrained
    if name is None:  # eval/score: the model the prompts were learned on, unless the user names one
        name = meta["model"]["name"] if meta else "promptkit-tiny"
        pretrained = pretrained or (meta["model"]["pretrained"] if meta else None)
    return load_clip(name, pretrained, device=args.device, quick_gelu=_quick_gelu(args))


def _data(args, with_train: bool = True):
    from promptkit.pipeline import resolve_datasets

    data = resolve_datasets(getattr(args, "train", None) if with_train else None, args.id, args.ood,
                            args.benchmark, args.data_root, args.classes)
    data.pool = getattr(args, "pool", None)
    return data


def _write_reports(directory: Path, metrics: dict, scores: dict | None, plots: bool) -> str:
    from promptkit.eval.report import markdown_table, plot_histograms, plot_roc, write_json

    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "metrics.json", metrics)
    table = markdown_table(metrics)
    with atomic_write(directory / "metrics.md") as tmp:
        tmp.write_text(table + "\n")
    if plots and scores:
        ood = {k: v for k, v in scores.items() if k != "id"}
        plot_histograms(scores["id"], ood, directory / "score_histograms.png")
        plot_roc(scores["id"], ood, directory / "roc.png")
    return table


def _note_unused_train(args, methods: list[str]) -> None:
    from promptkit.methods import METHODS

    collecting = [m for m in methods if m in METHODS and METHODS[m].collects_training_images]
    if getattr(args, "train", None) and collecting:
        print(f"note: {', '.join(collecting)} collects its training images from --pool; --train is not used by it",
              file=sys.stderr)


def cmd_train(args) -> None:
    from promptkit.pipeline import output_dir, train_and_evaluate

    _note_unused_train(args, [args.method])
    clip = _clip(args)
    data = _data(args)
    result = train_and_evaluate(args.method, clip, data, args.shots, args.seed, parse_settings(args.set),
                                _options(args))
    if not is_main():
        return
    out = output_dir(args.output, args.method, args.seed)
    result.method.save(out)
    print(_write_reports(out, result.metrics, result.scores, args.plots))
    print(f"\nsaved prompts and metrics to {out}")


def cmd_eval(args) -> None:
    from promptkit.methods import load_method
    from promptkit.methods.base import read_metadata
    from promptkit.pipeline import evaluate, versions

    meta = read_metadata(args.prompts)
    clip = _clip(args, meta)
    method = load_method(args.prompts, clip, backend=args.backend)
    data = _data(args, with_train=False)
    if data.class_names != method.class_names:
        raise ValueError(f"the ID set's classes ({len(data.class_names)}) differ from the prompts' classes "
                         f"({len(method.class_names)}); pass --classes FILE with the training class list")
    metrics = evaluate(method, clip, data, _options(args))
    scores = metrics.pop("scores")
    if not is_main():
        return
    metrics.update(method=method.name, model=f"{clip.name} ({clip.pretrained})",
                   seed=getattr(method.config, "seed", None), data=data.description, prompts=str(args.prompts),
                   versions=versions())
    print(_write_reports(Path(args.output or args.prompts), metrics, scores, args.plots))


def cmd_score(args) -> None:
    from promptkit.data.sources import open_source
    from promptkit.methods import load_method
    from promptkit.methods.base import read_metadata
    from promptkit.pipeline import extract

    meta = read_metadata(args.prompts)
    clip = _clip(args, meta)
    method = load_method(args.prompts, clip, backend=args.backend)
    source = open_source(args.images)
    options = _options(args)
    result = extract(clip, source, options)
    scores, predicted = method.score(result.features.to(options.device))
    if not is_main():
        return
    out = Path(args.output) if args.output else Path(args.prompts) / "scores.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score", "predicted_class", "decision"])
        values = scores.tolist()
        is_id = [method.threshold is None or value >= method.threshold for value in values]
        for index, value, label, keep in zip(result.kept.tolist(), values, predicted.tolist(), is_id):
            writer.writerow([source.describe(index), f"{value:.6g}", method.class_names[label],
                             "ID" if keep else "OOD"])
    flagged = is_id.count(False)
    print(f"scored {len(result.kept)} images ({len(result.skipped)} unreadable skipped), {flagged} flagged OOD "
          f"at threshold {method.threshold}: {out}")


def cmd_extract(args) -> None:
    from promptkit.data.sources import open_source
    from promptkit.pipeline import extract

    result = extract(_clip(args), open_source(args.images), _options(args))
    if not is_main():
        return
    print(f"{len(result.kept)} image features of size {result.features.shape[1]} cached "
          f"({len(result.skipped)} unreadable skipped)")


def cmd_compare(args) -> None:
    from promptkit.eval.report import compare_table, write_json
    from promptkit.pipeline import train_and_evaluate

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    per_method: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in parse_settings(args.set).items():
        method, dot, setting = key.partition(".")
        if not dot or method not in per_method:
            raise ValueError(f"--set for compare expects METHOD.KEY=VALUE with METHOD in {methods}, got {key!r}")
        per_method[method][setting] = value
    _note_unused_train(args, methods)
    clip, data, options = _clip(args), _data(args), _options(args)
    runs = []
    for method in methods:
        for seed in seeds:
            result = train_and_evaluate(method, clip, data, args.shots, seed, per_method[method], options)
            runs.append(result.metrics)
            if is_main():
                print(f"{method} seed {seed}: mean AUROC {result.metrics['mean']['auroc']:.4f}, "
                      f"FPR95 {result.metrics['mean']['fpr95']:.4f}, ID acc {result.metrics['id_accuracy']}",
                      file=sys.stderr)
    if not is_main():
        return
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(runs)
    write_json(out / "compare.json", {"runs": runs, "methods": methods, "seeds": seeds})
    with atomic_write(out / "compare.md") as tmp:
        tmp.write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'compare.json'} and {out / 'compare.md'}")


def cmd_info(args) -> None:
    from promptkit.info import report

    print(report())


def cmd_collect(args) -> None:
    from promptkit.collect import from_folders, generate, open_pool, retrieve, save_collection
    from promptkit.data.classnames import class_list
    from promptkit.data.sources import open_source
    from promptkit.methods.negmine import load_vocabulary, mine_negative_labels
    from promptkit.pipeline import extract_settings

    if args.classes:
        names = class_list(args.classes)
    elif args.id:
        names = open_source(args.id).class_names
    else:
        from promptkit.pipeline import embedded_datasets

        names = embedded_datasets().class_names
    if not names:
        raise ValueError("no ID class names: give --classes FILE or an --id folder with class subfolders")
    clip, options = _clip(args), _options(args)
    negatives = mine_negative_labels(clip, names, load_vocabulary(args.vocabulary), count=args.negatives,
                                     cache_dir=options.cache_dir, progress=options.progress)
    labels = names + list(negatives.words)
    settings = extract_settings(options)
    pool = open_pool(args.pool or "embedded:train", clip, **settings)
    collection = retrieve(clip, pool, labels, args.per_label)
    if args.generate:
        generated = generate(labels, args.per_label, Path(args.output) / "generated", args.generate)
        collection = collection + from_folders(clip, generated, labels, **settings)
    if args.folders:
        collection = collection + from_folders(clip, args.folders, labels, **settings)
    out = save_collection(collection, args.output)
    with atomic_write(out / "negatives.txt") as tmp:
        tmp.write_text("".join(f"{p}\t{w}\n" for w, p in zip(negatives.words, negatives.pos)))
    counts = collection.counts()
    print(f"{len(collection)} images for {int((counts > 0).sum())} of {len(labels)} labels ({len(names)} ID, "
          f"{len(negatives)} negative) written to {out}")


COMMANDS = {"collect": cmd_collect, "train": cmd_train, "eval": cmd_eval, "score": cmd_score, "extract": cmd_extract,
            "compare": cmd_compare, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("PROMPTKIT_DEBUG"):
        _run(args)
        return 0
    try:
        _run(args)
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"promptkit {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("promptkit: interrupted", file=sys.stderr)
        return 130
    return 0


def _run(args) -> None:
    """One command, inside torchrun's process group when launched by torchrun."""
    from promptkit.distributed import close_distributed

    _start_distributed(args)
    try:
        COMMANDS[args.command](args)
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
