"""End-to-end runs shared by the CLI and the Python API: data -> features -> fit -> calibrate -> evaluate."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from promptkit.collect import Collection, collect_images, save_collection
from promptkit.data.atomic import atomic_dir
from promptkit.data.cache import DEFAULT_SHARD_SIZE, Features, extract_features
from promptkit.data.classnames import class_list
from promptkit.data.errors import DataError
from promptkit.data.fewshot import few_shot_indices
from promptkit.data.sources import EmbeddedSource, ImageSource, Subset, embedded_splits, open_source
from promptkit.data.specs import resolve as resolve_benchmark
from promptkit.errors import ConfigError
from promptkit.eval.metrics import accuracy, calibrate_threshold
from promptkit.eval.report import compare_table, summarize, write_json_and_table, write_reports
from promptkit.methods import METHODS, LabelImages, Method, TrainingData
from promptkit.methods.config import apply_settings, parse_pairs
from promptkit.version import __version__


@dataclass
class Datasets:
    """What one run trains and evaluates on."""

    class_names: list[str]
    id: ImageSource
    ood: dict[str, ImageSource]
    train: ImageSource | None = None
    description: str = ""
    pool: str | ImageSource | None = None  # retrieval pool of label-driven methods (LAPT); None: embedded train


@dataclass
class RunOptions:
    """How features are computed, progress is shown and metrics are counted (the CLI's defaults are these)."""

    device: str = "cpu"
    backend: str = "auto"
    cache_dir: str | None = None
    batch_size: int = 256
    on_bad_image: str = "skip"
    progress: bool = True
    fpr_positive: str = "id"  # which side FPR95 counts as positive: "id" (MCM/LSN/NegPrompt) or "ood" (OpenOOD)
    keep_id: float = 0.95  # share of held-out ID images above the saved decision threshold
    shard_size: int = DEFAULT_SHARD_SIZE  # images per feature-cache shard (the unit of work of each rank)

    def extract_options(self) -> dict[str, Any]:
        """The keyword arguments of ``extract_features``: cache, batch and shard sizes, bad images, progress."""
        return dict(batch_size=self.batch_size, cache_dir=self.cache_dir, on_error=self.on_bad_image,
                    progress=self.progress, shard_size=self.shard_size)


def embedded_datasets() -> Datasets:
    """The embedded default: tiny Fashion-MNIST ID classes vs held-out classes, digits and textures."""
    splits = embedded_splits()
    train, test = EmbeddedSource("train"), EmbeddedSource("test")
    ood = {name: EmbeddedSource(name) for name in splits if name not in ("train", "test")}
    return Datasets(test.class_names, test, ood, train, "embedded default (promptkit/assets)")


def resolve_datasets(train: str | None = None, id: str | None = None, ood: list[str] | None = None,
                     benchmark: str | None = None, data_root: str | None = None,
                     classes: str | None = None) -> Datasets:
    """Open the run's data: the embedded default when nothing is given, else the user's folders/list files.

    The flags are checked before any folder is read: ``--ood`` names must be unique (and not ``id``, the ID
    test set's key in the scores), and a run needs at least two ID classes (every OOD score compares an image
    across the ID classes).
    """
    if data_root and not benchmark:
        raise ConfigError(f"--data-root {data_root} is only read with --benchmark NAME")
    if not any([train, id, ood, benchmark]):
        return embedded_datasets()
    if benchmark and id:
        raise ConfigError(f"--benchmark {benchmark} sets the ID test set; drop --id {id}")
    if benchmark and not data_root:
        raise ConfigError(f"--benchmark {benchmark} needs --data-root DIR")
    if not benchmark and not id:
        raise ConfigError("--id DIR|LIST is required when --train or --ood is given")
    ood_paths = parse_pairs(ood or [], "--ood", "NAME=DIR")
    if not benchmark and not ood_paths:
        raise ConfigError("give at least one OOD set with --ood NAME=DIR")
    if "id" in ood_paths:
        raise ConfigError(f"--ood id={ood_paths['id']}: the name 'id' is reserved for the ID test set; choose another")
    train_source = open_source(train) if train else None
    id_source, ood_sources = resolve_benchmark(benchmark, data_root) if benchmark else (open_source(id), {})
    clash = sorted(set(ood_paths) & set(ood_sources))
    if clash:
        raise ConfigError(f"--ood {clash[0]}={ood_paths[clash[0]]}: {benchmark} already has an OOD set named "
                          f"{clash[0]}; choose another name")
    ood_sources.update({name: open_source(path) for name, path in ood_paths.items()})
    names = class_list(classes) if classes else id_source.class_names
    if not names:
        raise DataError(f"{id}: no class names (use class subfolders, a classnames.txt, or --classes FILE)")
    if len(names) < 2:
        raise DataError(f"{classes or id or benchmark}: fewer than two ID classes ({names[0]!r} only); the OOD "
                        "scores compare an image across the ID classes, so give at least two")
    if train_source is not None and train_source.class_names and len(train_source.class_names) != len(names):
        raise DataError(f"--train has {len(train_source.class_names)} classes but the ID set has {len(names)}")
    return Datasets(names, id_source, ood_sources, train_source, benchmark or str(id))


HELDOUT_LIMIT = 10_000  # held-out ID training images that calibrate the decision threshold, at most


def split_training(labels: Tensor, shots: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices [M] of the seeded few-shot training images (all labelled ones when shots is 0) and sorted indices of
    up to ``HELDOUT_LIMIT`` other labelled images, drawn with the same seed, for threshold calibration."""
    labels = labels.cpu()
    labelled = labels >= 0
    chosen = few_shot_indices(labels, shots, seed) if shots > 0 else torch.nonzero(labelled).flatten()
    if len(chosen) == 0:
        raise DataError("the training set has no labelled images")
    rest_mask = labelled.clone()
    rest_mask[chosen] = False
    rest = torch.nonzero(rest_mask).flatten()
    if len(rest) > HELDOUT_LIMIT:
        order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))
        rest = rest[order[:HELDOUT_LIMIT]].sort().values
    return chosen, rest


def extract(clip, source: ImageSource, options: RunOptions) -> Features:
    """The features of every readable image of ``source``, through the feature cache, with the run's settings."""
    return extract_features(clip, source, device=clip.device, **options.extract_options())


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; a ``ConfigError`` naming the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def check_run(method_name: str, data: Datasets) -> None:
    """Refuse, before any model is loaded, a run that cannot work: an unknown method, or one that learns from
    ID training images without them."""
    if method_class(method_name).training_data is TrainingData.ID_IMAGES and data.train is None:
        raise ConfigError(f"{method_name} learns prompts: give --train DIR|LIST (few-shot ID training images)")


def make_method(name: str, clip, class_names: list[str], overrides: dict[str, Any], seed: int,
                backend: str) -> Method:
    """Instantiate method ``name`` with its paper defaults, the user's overrides and the run's seed.

    ``overrides`` are typed and range-checked by ``apply_settings``: command-line strings or Python values."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    config = apply_settings(cls.Config, overrides, method=name)
    if "seed" in fields and "seed" not in overrides:
        config.seed = seed
    return cls(clip, class_names, config, backend=backend)


def evaluate(method: Method, clip, data: Datasets, options: RunOptions) -> dict[str, Any]:
    """Scores and metrics of a fitted method on the ID test set and each OOD set: ID accuracy, per-OOD-set and
    mean AUROC/FPR95/AUPR, the unreadable images left out of each set under "skipped_images" ({set: {"count",
    "first"}}), and the raw scores under "scores"."""
    skipped: dict[str, dict[str, Any]] = {}

    def features(name: str, source: ImageSource) -> tuple[Tensor, Tensor]:
        result = extract(clip, source, options)
        skipped[name] = {"count": len(result.skipped), "first": result.skipped[0] if result.skipped else None}
        return result.features.to(options.device), result.labels.to(options.device)

    id_features, id_labels = features("id", data.id)
    id_scores, predicted = method.score(id_features)
    ood_scores = {name: method.score(features(name, source)[0])[0] for name, source in data.ood.items()}
    results = summarize(id_scores, ood_scores, positive=options.fpr_positive)
    labelled = id_labels >= 0
    results["id_accuracy"] = accuracy(predicted[labelled], id_labels[labelled]) if labelled.any() else None
    results["skipped_images"] = skipped
    results["scores"] = {"id": id_scores, **ood_scores}
    return results


@dataclass
class RunResult:
    method: Method
    metrics: dict[str, Any]
    scores: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TrainingSet:
    """What a run fits on and calibrates with: features [N, E] and labels [N] for ``fit`` (None when the method
    learns nothing), held-out ID features [M, E] for the threshold (None: the ID test scores) and what the
    metadata records about them."""

    features: Tensor | None
    labels: Tensor | None
    heldout: Tensor | None
    info: dict[str, Any]


def collected_training_set(wanted: LabelImages, num_id: int, clip, data: Datasets, options: RunOptions
                           ) -> TrainingSet:
    """Features and labels in [0, len(wanted.labels)) of pool images retrieved for ``wanted``'s labels, whose
    first ``num_id`` are the ID classes. The pool is ``data.pool``, else the embedded training images with their
    labels ignored."""
    collection, info = collect_images(clip, wanted.labels, wanted.per_label, data.pool, num_id=num_id,
                                      **options.extract_options())
    return TrainingSet(collection.features.to(options.device), collection.labels.to(options.device), None,
                       {**info, "threshold_from": "ID test images"})


def id_training_set(method: Method, clip, data: Datasets, shots: int, seed: int, options: RunOptions
                    ) -> TrainingSet:
    """The seeded few-shot ID training images and up to ``HELDOUT_LIMIT`` others held out for the threshold.

    Only the sampled images are encoded (few-shot runs on ImageNet must not extract 1.28M features); a
    zero-shot method uses the training images only as held-out ones.
    """
    learns = method.training_data is not TrainingData.NONE
    chosen, rest = split_training(data.train.labels, shots, seed)
    info: dict[str, Any] = {"train_images": len(chosen), "heldout_images": len(rest)}
    features = labels = None
    if learns or not len(rest):
        # The whole training set keeps its own cache entry (e.g. one `promptkit extract` made).
        everything = torch.equal(chosen, torch.arange(len(data.train)))
        result = extract(clip, data.train if everything else Subset(data.train, chosen), options)
        features, labels = result.features.to(options.device), result.labels.to(options.device)
    heldout = extract(clip, Subset(data.train, rest), options).features.to(options.device) if len(rest) \
        else features
    if len(rest):
        info["threshold_from"] = "held-out ID training images"
    elif learns:  # --shots 0, or classes with no more images than shots: nothing was held out
        info["threshold_from"] = "the ID training images it was trained on (none held out)"
    else:
        info["threshold_from"] = "ID training images (not trained on: a zero-shot method)"
    return TrainingSet(features if learns else None, labels if learns else None, heldout, info)


def training_set(method: Method, clip, data: Datasets, shots: int, seed: int, options: RunOptions) -> TrainingSet:
    """What ``method`` declares it learns from (``Method.training_data``), read or collected for this run."""
    if method.training_data is TrainingData.LABEL_IMAGES:
        return collected_training_set(method.label_images(), len(method.class_names), clip, data, options)
    if data.train is not None:
        return id_training_set(method, clip, data, shots, seed, options)
    return TrainingSet(None, None, None, {"threshold_from": "ID test images"})


def collect_training_images(method: Method, clip, output: str | os.PathLike[str], options: RunOptions,
                            pool: str | None = None, folders: str | None = None, generate: str | None = None
                            ) -> tuple[Collection, Path]:
    """Collect, and save into ``output``, the images a ``TrainingData.LABEL_IMAGES`` method asks for: from
    ``pool`` (default the embedded training images, labels ignored), ``folders``/<label>/ and images generated
    with the diffusers model ``generate``. Returns the collection and the folder it was saved in."""
    if method.training_data is not TrainingData.LABEL_IMAGES:
        raise ConfigError(f"{method.name} does not learn from images collected per label; nothing to collect")
    method.prepare(options.cache_dir, options.progress)
    wanted = method.label_images()
    collection, _ = collect_images(clip, wanted.labels, wanted.per_label, pool, folders=folders,
                                   generate_model=generate, generated_dir=Path(output) / "generated",
                                   num_id=len(method.class_names), **options.extract_options())
    return collection, save_collection(collection, output, negatives=wanted.negatives)


def train_and_evaluate(method_name: str, clip, data: Datasets, shots: int | None, seed: int,
                       overrides: dict[str, Any], options: RunOptions) -> RunResult:
    """Fit ``method_name`` on its training data, calibrate its threshold and evaluate it.

    ``shots`` None takes the method's paper protocol (``Method.default_shots``); the metadata says which.
    """
    start = time.time()
    check_run(method_name, data)
    method = make_method(method_name, clip, data.class_names, overrides, seed, options.backend)
    shots_from = "--shots" if shots is not None else "the method's paper protocol (Method.default_shots)"
    shots = shots if shots is not None else method.default_shots
    method.prepare(options.cache_dir, options.progress)  # e.g. mined negative labels, in the run's cache
    train = training_set(method, clip, data, shots, seed, options)
    if train.features is not None:
        method.fit(train.features, train.labels, progress=options.progress)
    metrics = evaluate(method, clip, data, options)  # the threshold below does not enter the metrics
    scores = metrics.pop("scores")
    # The decision threshold comes from ID images the method did not train on where there are any (else the
    # training images themselves, or the ID test set's scores for runs without them; the metadata says which).
    calibration = method.score(train.heldout)[0] if train.heldout is not None else scores["id"]
    method.threshold = calibrate_threshold(calibration, keep=options.keep_id)
    method.info.update(train={"shots": shots, "shots_from": shots_from, "seed": seed, **train.info})
    metrics.update(method=method_name, model=f"{clip.name} ({clip.pretrained})", seed=seed, shots=shots,
                   data=data.description, seconds=round(time.time() - start, 2),
                   versions=versions(), config=dataclasses.asdict(method.config))
    return RunResult(method, metrics, scores)


def versions() -> dict[str, str]:
    """Versions of promptkit and the libraries its numbers depend on, for the reports."""
    from promptkit.info import package_version

    return {"promptkit": __version__,
            **{name: package_version(name) for name in ("torch", "open_clip_torch", "scikit-learn")}}


def output_dir(path: str | None, method: str, seed: int) -> Path:
    return Path(path) if path else Path("promptkit_runs") / f"{method}-seed{seed}"


def save_run(directory: str | os.PathLike[str], metrics: dict[str, Any], scores: dict[str, Tensor] | None = None,
             plots: bool = False, method: Method | None = None) -> str:
    """Write a run's output folder as one step: the prompts (when ``method`` is given) and the reports.

    Everything goes into ``atomic_dir``'s staging folder first and moves into ``directory`` last, so a full disk
    or any other failure leaves no partial run, and the previous run's files in ``directory`` as they were; an
    ``OSError`` becomes an ``OutputError`` naming the file. Returns the Markdown table of the metrics.
    """
    with atomic_dir(directory) as staging:
        if method is not None:
            method.save(staging)
        return write_reports(staging, metrics, scores, plots)


def save_comparison(directory: str | os.PathLike[str], runs: list[dict[str, Any]], methods: list[str],
                    seeds: list[int]) -> str:
    """Write ``compare.json`` (every run's metrics) and ``compare.md`` (mean +- std per method) into
    ``directory``, both or neither. Returns the Markdown table."""
    table = compare_table(runs)
    write_json_and_table(directory, "compare", {"runs": runs, "methods": methods, "seeds": seeds}, table)
    return table
