"""The ``promptkit`` command: train, eval, score, extract, compare, info.

Exit codes: 0 success, 1 a user or data error (one line on stderr, no traceback), 2 bad usage (argparse), 130
interrupted. Every flag is checked before any model is loaded or image encoded. A ``promptkit.errors.UserError``
or an OS error about the user's files is one line; anything else is a bug and keeps its traceback, as does
everything with ``--debug`` or ``PROMPTKIT_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from promptkit.errors import ConfigError, UserError

# OS errors that are about the user's files or disk, not about promptkit: one line naming the path.
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
PATH_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
DEBUG_HELP = "show the traceback of any error (also PROMPTKIT_DEBUG=1)"


def _count(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expects a whole number >= {low}, got {text!r}")
        return value

    return parse


def _share(text: str) -> float:
    """An argparse type: a share in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expects a share in (0, 1], got {text!r}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, default_model: str | None = "promptkit-tiny") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="open_clip model name or the path of an open_clip model config JSON (default: the embedded "
                            "promptkit-tiny)")
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
    from promptkit.ops import BACKENDS
    from promptkit.pipeline import RunOptions as defaults  # the class's field defaults are the flags' defaults

    group = parser.add_argument_group("run")
    group.add_argument("--device", default=defaults.device, help=f"cpu, cuda or cuda:N (default {defaults.device})")
    group.add_argument("--backend", default=defaults.backend, choices=("auto", *BACKENDS),
                       help=f"op backend (default {defaults.backend})")
    group.add_argument("--cache-dir", default=None, help="feature cache (default $PROMPTKIT_CACHE or "
                                                          "~/.cache/promptkit/features)")
    group.add_argument("--batch-size", type=_count(1), default=defaults.batch_size, help="images per encoder batch")
    group.add_argument("--shard-size", type=_count(1), default=defaults.shard_size,
                       help="images per feature-cache shard: the unit a torchrun rank encodes and a rerun resumes")
    group.add_argument("--on-bad-image", choices=["skip", "fail"], default=defaults.on_bad_image,
                       help="unreadable images: skip with a warning and a count (default), or fail naming the file")
    group.add_argument("--fpr-positive", choices=["id", "ood"], default=defaults.fpr_positive,
                       help="FPR95 convention: id (MCM/LSN/NegPrompt tables) or ood (OpenOOD/LAPT)")
    group.add_argument("--keep-id", type=_share, default=defaults.keep_id,
                       help="share of held-out ID images the saved decision threshold keeps as ID "
                            f"(default {defaults.keep_id})")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--plots", action="store_true", help="also write score histograms and ROC curves")


def _add_learning_args(parser: argparse.ArgumentParser, output_help: str, output_default: str | None,
                       set_metavar: str, set_help: str) -> None:
    """The flags of the commands that train: shots, output folder, method settings, model, data and run."""
    parser.add_argument("--shots", type=_count(0), default=None,
                        help="training images per class (0: all; default: the method's paper protocol, its "
                             "default_shots)")
    parser.add_argument("--output", default=output_default, help=output_help)
    parser.add_argument("--set", action="append", default=[], metavar=set_metavar, help=set_help)
    _add_model_args(parser)
    _add_data_args(parser)
    _add_run_args(parser)


def build_parser() -> argparse.ArgumentParser:
    from promptkit.methods import METHODS, TrainingData

    parser = argparse.ArgumentParser(prog="promptkit", description="Prompt learning for OOD detection with CLIP.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="learn prompts (or set up a zero-shot method), evaluate, save")
    train.add_argument("--method", required=True, choices=sorted(METHODS))
    train.add_argument("--seed", type=_count(0), default=1)
    _add_learning_args(train, "folder for prompts and metrics (default promptkit_runs/METHOD-seedS)", None,
                       "KEY=VALUE", "override a method setting, e.g. --set epochs=10 (see the method's Config)")

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
    _add_learning_args(compare, "folder for compare.json and compare.md", "promptkit_runs/compare",
                       "METHOD.KEY=VALUE", "override a setting of one method, e.g. --set coop.epochs=10")

    label_driven = sorted(name for name, cls in METHODS.items() if cls.training_data is TrainingData.LABEL_IMAGES)
    collect = sub.add_parser("collect", help="collect the training images of a label-driven method (LAPT): its "
                                             "ID and mined negative labels")
    collect.add_argument("--method", choices=label_driven, default=label_driven[0])
    collect.add_argument("--output", required=True, help="folder for collection.txt, classnames.txt, "
                                                         "features.safetensors and negatives.txt")
    collect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a method setting, e.g. --set train_negatives=1000 --set images_per_label=16 "
                              "--set vocabulary=FILE")
    collect.add_argument("--seed", type=_count(0), default=1)
    collect.add_argument("--pool", help="retrieve from this pool (image folder, list file, embedded:<split> or "
                                        ".safetensors features; default: the embedded training images)")
    collect.add_argument("--folders", help="also take images from FOLDER/<label>/ subfolders")
    collect.add_argument("--generate", metavar="MODEL", help="also generate images with this diffusers model "
                                                               "(needs diffusers and a GPU)")
    collect.add_argument("--id", help="ID images whose class subfolders name the classes")
    collect.add_argument("--classes", help="ID class names in label order: a text file or a shipped list")
    _add_model_args(collect)
    _add_run_args(collect)

    reproduce = sub.add_parser(
        "reproduce", help="run a paper's protocol and compare with its published table",
        description="Run a method under its paper's protocol (backbone, shots, seeds, classes, OOD sets, FPR "
                    "convention) and print the paper's number, ours and the difference per OOD set. Data layout "
                    "under --data-root: see promptkit/reproduce.py and promptkit/data/specs.py.")
    reproduce.add_argument("protocol", nargs="?", help="protocol name (--list shows them)")
    reproduce.add_argument("--list", action="store_true", help="list the protocols and their sources")
    reproduce.add_argument("--seeds", help="comma-separated seeds instead of the protocol's")
    reproduce.add_argument("--pool", help="LAPT: retrieval pool instead of DATA_ROOT/pool")
    reproduce.add_argument("--output", help="folder for reproduce.json and reproduce.md "
                                            "(default promptkit_runs/reproduce-PROTOCOL)")
    reproduce.add_argument("--data-root", help="folder with the protocol's data")
    _add_model_args(reproduce, default_model=None)
    _add_run_args(reproduce)

    sub.add_parser("info", help="versions, built backends, and why any backend is missing")
    for command in sub.choices.values():  # also after the command; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _comma_list(text: str, flag: str) -> list[str]:
    """The items of a comma-separated flag value; refuses an empty list and an item given twice."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{flag} expects a comma-separated list, got {text!r}")
    twice = next((item for item in items if items.count(item) > 1), None)
    if twice is not None:
        raise ConfigError(f"{flag} {text}: {twice} is given twice")
    return items


def _method_names(text: str) -> list[str]:
    """``--methods`` as a list of known method names."""
    from promptkit.methods import METHODS

    names = _comma_list(text, "--methods")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ConfigError(f"--methods {text}: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return names


def _seed_list(text: str, flag: str = "--seeds") -> list[int]:
    """A comma-separated list of seeds (whole numbers >= 0)."""
    seeds = _comma_list(text, flag)
    bad = [seed for seed in seeds if not seed.isdigit()]
    if bad:
        raise ConfigError(f"{flag} {text}: seeds are whole numbers >= 0, got {bad[0]!r}")
    return [int(seed) for seed in seeds]


def _method_settings(args, methods: list[str]) -> dict[str, dict[str, str]]:
    """Each method's ``--set`` values (strings), checked against its config now, before any work.

    ``train`` takes ``KEY=VALUE`` for its one method, ``compare`` ``METHOD.KEY=VALUE``."""
    from promptkit.methods import METHODS
    from promptkit.methods.config import apply_settings, parse_pairs

    per_method: dict[str, dict[str, str]] = {method: {} for method in methods}
    if args.command != "compare":
        per_method[args.method] = parse_pairs(args.set, "--set", empty_values=True)
    else:
        for key, value in parse_pairs(args.set, "--set", "METHOD.KEY=VALUE", empty_values=True).items():
            method, dot, setting = key.partition(".")
            if not dot or method not in per_method:
                raise ConfigError(f"--set {key}={value}: compare expects METHOD.KEY=VALUE with METHOD one of "
                                  f"--methods ({', '.join(methods)})")
            per_method[method][setting] = value
    for method, settings in per_method.items():
        apply_settings(METHODS[method].Config, settings, method=method,
                       prefix="" if args.command != "compare" else f"{method}.")
    return per_method


def _check_output(path: Path, flag: str, is_file: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder goes or the other way
    round, a file on the way to it, or a folder without write permission."""
    if path.exists():
        if is_file and path.is_dir():
            raise ConfigError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'scores.csv'}")
        if not is_file and not path.is_dir():
            raise ConfigError(f"{flag} {path}: is a file, not a folder")
    folder = path.parent if is_file else path
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists is written into
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {folder} is not writable")


def _check_run_args(args) -> None:
    """The run flags every command shares, checked before any work: device, backend and the feature cache."""
    from promptkit.clip.model import parse_device
    from promptkit.data.cache import default_cache_dir
    from promptkit.ops import BackendUnavailableError, resolve_backend

    try:
        device = parse_device(args.device)
    except ConfigError as error:
        raise ConfigError(f"--device {args.device}: {error}") from None
    try:
        resolve_backend(args.backend, device)
    except BackendUnavailableError as error:
        raise ConfigError(f"--backend {args.backend}: {error}") from None
    if args.cache_dir:
        _check_output(Path(args.cache_dir).expanduser(), "--cache-dir")
    else:
        _check_output(default_cache_dir(), "the feature cache ($PROMPTKIT_CACHE)")


def _check_pool(spec: str | None) -> None:
    """Refuse a ``--pool`` that names nothing now; it is opened only once the model is loaded."""
    from promptkit.data.errors import DataError
    from promptkit.data.sources import EMBEDDED_PREFIX, open_source

    if spec is not None and spec.startswith(EMBEDDED_PREFIX):
        open_source(spec)  # an unknown split is refused here
    elif spec is not None and not Path(spec).expanduser().exists():
        raise DataError(f"--pool {spec}: no such image folder, list file or feature file")


def _options(args):
    from promptkit.pipeline import RunOptions

    return RunOptions(device=args.device, backend=args.backend, cache_dir=args.cache_dir,
                      batch_size=args.batch_size, on_bad_image=args.on_bad_image, keep_id=args.keep_id,
                      progress=not args.no_progress and sys.stderr.isatty(), fpr_positive=args.fpr_positive,
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
    """The model of the command: ``--model``, else (eval) the one the prompts record, else the embedded one."""
    from promptkit.clip import load_clip
    from promptkit.methods.saved import recorded_model

    name, pretrained, quick_gelu = args.model, args.pretrained, _quick_gelu(args)
    if meta is not None:
        name, pretrained, quick_gelu = recorded_model(meta, name, pretrained, quick_gelu)
    return load_clip(name or "promptkit-tiny", pretrained, device=args.device, quick_gelu=quick_gelu)


def _data(args, with_train: bool = True):
    """The run's datasets, opened (and so checked) before the model is loaded."""
    from promptkit.pipeline import resolve_datasets

    data = resolve_datasets(getattr(args, "train", None) if with_train else None, args.id, args.ood,
                            args.benchmark, args.data_root, args.classes)
    data.pool = getattr(args, "pool", None)
    _check_pool(data.pool)
    return data


def _note_unused_train(args, methods: list[str]) -> None:
    from promptkit.methods import METHODS, TrainingData

    collecting = [m for m in methods if m in METHODS and METHODS[m].training_data is TrainingData.LABEL_IMAGES]
    if getattr(args, "train", None) and collecting:
        print(f"note: {', '.join(collecting)} collects its training images from --pool; --train is not used by it",
              file=sys.stderr)


def cmd_train(args) -> None:
    from promptkit.pipeline import check_run, output_dir, save_run, train_and_evaluate

    settings = _method_settings(args, [args.method])[args.method]
    _check_run_args(args)
    out = output_dir(args.output, args.method, args.seed)
    _check_output(out, "--output")
    data = _data(args)
    check_run(args.method, data)
    _note_unused_train(args, [args.method])
    result = train_and_evaluate(args.method, _clip(args), data, args.shots, args.seed, settings, _options(args))
    if not is_main():
        return
    print(save_run(out, result.metrics, result.scores, args.plots, method=result.method))
    print(f"\nsaved prompts and metrics to {out}")


def cmd_eval(args) -> None:
    from promptkit.data.errors import DataError
    from promptkit.methods import load_method
    from promptkit.methods.saved import read_metadata
    from promptkit.pipeline import evaluate, save_run, versions

    meta = read_metadata(args.prompts)
    _check_run_args(args)
    _check_output(Path(args.output or args.prompts), "--output" if args.output else "--prompts")
    data = _data(args, with_train=False)
    if data.class_names != meta["class_names"]:
        raise DataError(f"the ID set's classes ({len(data.class_names)}) differ from the prompts' classes "
                        f"({len(meta['class_names'])}); pass --classes FILE with the training class list")
    clip = _clip(args, meta)
    method = load_method(args.prompts, clip, backend=args.backend)
    metrics = evaluate(method, clip, data, _options(args))
    scores = metrics.pop("scores")
    if not is_main():
        return
    metrics.update(method=method.name, model=f"{clip.name} ({clip.pretrained})",
                   seed=getattr(method.config, "seed", None), data=data.description, prompts=str(args.prompts),
                   versions=versions())
    print(save_run(Path(args.output or args.prompts), metrics, scores, args.plots))


def cmd_score(args) -> None:
    from promptkit.data.sources import open_source
    from promptkit.detector import Detector, write_predictions
    from promptkit.methods.saved import read_metadata
    from promptkit.pipeline import extract

    read_metadata(args.prompts)
    _check_run_args(args)
    out = Path(args.output) if args.output else Path(args.prompts) / "scores.csv"
    _check_output(out, "--output" if args.output else "--prompts", is_file=True)
    source = open_source(args.images)
    detector = Detector.load(args.prompts, device=args.device, model=args.model, pretrained=args.pretrained,
                             quick_gelu=_quick_gelu(args), backend=args.backend)
    # through the feature cache: torchrun shards, resumable, the --on-bad-image policy
    result = extract(detector.clip, source, _options(args))
    predictions = detector.decide(result.features, [source.describe(i) for i in result.kept.tolist()])
    if not is_main():
        return
    write_predictions(out, predictions)
    flagged = sum(not p.is_id for p in predictions)
    print(f"scored {len(result.kept)} images ({len(result.skipped)} unreadable skipped), {flagged} flagged OOD "
          f"at threshold {detector.threshold}: {out}")


def cmd_extract(args) -> None:
    from promptkit.data.sources import open_source
    from promptkit.pipeline import extract

    _check_run_args(args)
    source = open_source(args.images)
    result = extract(_clip(args), source, _options(args))
    if not is_main():
        return
    print(f"{len(result.kept)} image features of size {result.features.shape[1]} cached "
          f"({len(result.skipped)} unreadable skipped)")


def cmd_compare(args) -> None:
    from promptkit.pipeline import check_run, save_comparison, train_and_evaluate

    methods = _method_names(args.methods)
    seeds = _seed_list(args.seeds)
    per_method = _method_settings(args, methods)
    _check_run_args(args)
    _check_output(Path(args.output), "--output")
    data = _data(args)
    for method in methods:
        check_run(method, data)
    _note_unused_train(args, methods)
    clip, options = _clip(args), _options(args)
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
    print(save_comparison(out, runs, methods, seeds))
    print(f"\nwrote {out / 'compare.json'} and {out / 'compare.md'}")


def cmd_reproduce(args) -> None:
    from promptkit.reproduce import check_data, get_protocol, protocols, run_protocol, save_reproduction

    if args.list or not args.protocol:
        for name, p in sorted(protocols().items()):
            print(f"{name:28s} {p.method:10s} {p.benchmark:16s} {p.model} ({p.pretrained}): {p.source}")
        return
    protocol = get_protocol(args.protocol)
    _check_run_args(args)
    out = Path(args.output or f"promptkit_runs/reproduce-{protocol.name}")
    _check_output(out, "--output")
    check_data(protocol, args.data_root, args.pool)
    seeds = _seed_list(args.seeds) if args.seeds else None
    if args.model is None:
        args.model, args.pretrained = protocol.model, args.pretrained or protocol.pretrained
    args.fpr_positive = protocol.fpr_positive  # the paper's convention, whatever the flag says
    runs = run_protocol(protocol, _clip(args), args.data_root, _options(args), seeds, args.pool)
    if not is_main():
        return
    print(save_reproduction(out, protocol, runs))
    print(f"wrote {out / 'reproduce.json'} and {out / 'reproduce.md'}")


def cmd_info(args) -> None:
    from promptkit.info import report

    print(report())


def cmd_collect(args) -> None:
    from promptkit.collect import CollectionUnavailableError, generation_unavailable
    from promptkit.data.classnames import class_list
    from promptkit.data.errors import DataError
    from promptkit.data.sources import open_source
    from promptkit.pipeline import collect_training_images, embedded_datasets, make_method

    settings = _method_settings(args, [args.method])[args.method]
    _check_run_args(args)
    _check_output(Path(args.output), "--output")
    _check_pool(args.pool)
    if args.folders and not Path(args.folders).expanduser().is_dir():
        raise DataError(f"--folders {args.folders}: no such folder")
    unavailable = generation_unavailable() if args.generate else None
    if unavailable:
        raise CollectionUnavailableError(f"--generate {args.generate}: image generation is unavailable: {unavailable}")
    if args.classes:
        names = class_list(args.classes)
    else:
        names = open_source(args.id).class_names if args.id else embedded_datasets().class_names
    if not names:
        raise DataError("no ID class names: give --classes FILE or an --id folder with class subfolders")
    clip, options = _clip(args), _options(args)
    method = make_method(args.method, clip, names, settings, args.seed, options.backend)
    collection, out = collect_training_images(method, clip, args.output, options, args.pool, args.folders,
                                              args.generate)
    counts = collection.counts()
    print(f"{len(collection)} images for {int((counts > 0).sum())} of {len(counts)} labels ({len(names)} ID, "
          f"{len(counts) - len(names)} negative) written to {out}")


COMMANDS = {"collect": cmd_collect, "train": cmd_train, "eval": cmd_eval, "score": cmd_score, "extract": cmd_extract,
            "compare": cmd_compare, "info": cmd_info, "reproduce": cmd_reproduce}


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug or os.environ.get("PROMPTKIT_DEBUG", "") not in ("", "0"):
        _run(args)
        return 0
    try:
        with warnings.catch_warnings():  # restores Python's warning display afterwards
            warnings.showwarning = _show_warning
            _run(args)
    except UserError as error:
        return _fail(args.command, str(error) or type(error).__name__)
    except OSError as error:
        if not isinstance(error, PATH_ERRORS) and error.errno not in PATH_ERRNOS:
            raise
        return _fail(args.command, (f"{error.filename}: " if error.filename else "") + (error.strerror or str(error)))
    except KeyboardInterrupt:
        print(f"promptkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _fail(command: str, message: str) -> int:
    """Print a user error as one line and return exit code 1."""
    print(f"promptkit {command}: error: {message.splitlines()[0]}", file=sys.stderr)
    return 1


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """A warning as one line, without Python's category and source line (``--debug`` keeps those)."""
    print(f"promptkit: warning: {message}", file=file or sys.stderr)


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
