"""Validation before work (issue 11): method settings typed and range-checked, every flag checked before a model is
loaded, and only promptkit's own user errors (plus OS errors about the user's files) become one line."""

from __future__ import annotations

import dataclasses
import errno
import shutil
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from promptkit import cli
from promptkit.cli import main
from promptkit.data.errors import DataError
from promptkit.errors import ConfigError
from promptkit.methods import METHODS
from promptkit.methods.config import apply_settings, parse_pairs

from .cli_helpers import image_folder


@dataclass
class DemoConfig:
    mode: Literal["a", "b"] = "a"
    level: int = field(default=0, metadata={"min": 0, "max": 3})
    kind: str = field(default="x", metadata={"choices": ("x", "y")})
    ratio: float | None = None
    flag: bool = False
    name_template: str = "{}"
    epochs: int = 1
    warmup_epochs: int = 0
    seed: int = 0
    lr: float = 0.1

    def __post_init__(self) -> None:
        if self.flag and self.mode == "b":
            raise ValueError("demo: flag needs mode a")


# -- the config module ------------------------------------------------------------------------------------

def test_command_line_strings_become_the_declared_types():
    config = apply_settings(DemoConfig, {"mode": "b", "level": "3", "kind": "y", "ratio": "0.5", "flag": "no",
                                         "name_template": "a {} b {{x}}", "epochs": "7", "lr": "1e-3"})
    assert (config.mode, config.level, config.kind, config.ratio, config.flag) == ("b", 3, "y", 0.5, False)
    assert (config.name_template, config.epochs, config.lr) == ("a {} b {{x}}", 7, 1e-3)
    assert apply_settings(DemoConfig, {"ratio": "None", "flag": "Yes"}).ratio is None
    assert apply_settings(DemoConfig, {"ratio": None, "epochs": 2, "lr": 1}).lr == 1.0  # Python values pass


@pytest.mark.parametrize("settings, fragments", [
    ({"epochs": "ten"}, ["--set epochs=ten", "DemoConfig's epochs takes a whole number", "'ten'"]),
    ({"epochs": "1.5"}, ["takes a whole number"]),
    ({"epochs": True}, ["takes a whole number"]),
    ({"epochs": "0"}, ["epochs must be >= 1, got 0"]),
    ({"warmup_epochs": "-1"}, ["warmup_epochs must be >= 0"]),
    ({"seed": "-1"}, ["seed must be >= 0"]),
    ({"lr": "0"}, ["lr must be > 0"]),
    ({"lr": "nan"}, ["lr must be > 0, got nan"]),
    ({"lr": "abc"}, ["lr takes a number, got 'abc'"]),
    ({"level": "4"}, ["level must be >= 0 and <= 3, got 4"]),
    ({"mode": "c"}, ["mode must be one of a, b, got 'c'"]),
    ({"kind": "z"}, ["kind must be one of x, y"]),
    ({"flag": "maybe"}, ["flag takes true or false"]),
    ({"epochs": None}, ["epochs cannot be None"]),
    ({"epochs": "None"}, ["epochs takes a whole number, got 'None'"]),
    ({"name_template": "a {0} {1}"}, ["exactly one '{}'"]),
    ({"name_template": "no slot"}, ["exactly one '{}'"]),
    ({"name_template": "a {"}, ["malformed"]),
    ({"nope": "1"}, ["DemoConfig has no setting 'nope'; its settings: mode, level, kind"]),
    ({"flag": "true", "mode": "b"}, ["--set flag=true --set mode=b: demo: flag needs mode a"]),
])
def test_bad_settings_name_flag_key_value_and_what_is_allowed(settings, fragments):
    with pytest.raises(ConfigError) as error:
        apply_settings(DemoConfig, settings)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_compare_spelling_names_the_method():
    with pytest.raises(ConfigError, match=r"^--set coop\.epochs=ten: coop's epochs takes a whole number"):
        apply_settings(METHODS["coop"].Config, {"epochs": "ten"}, method="coop", prefix="coop.")


def test_every_method_default_passes_its_own_rules():
    """The generic rules must accept every paper default (new fields included) given back as a string."""
    for name, cls in METHODS.items():
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            if f.default is dataclasses.MISSING or hints[f.name] not in (int, float, bool, str, int | None,
                                                                          float | None, str | None):
                continue
            apply_settings(cls.Config, {f.name: str(f.default)}, method=name)


def test_method_configs_read_the_command_line_like_the_paper_means():
    coop = apply_settings(METHODS["coop"].Config, {"ctx_init": "123", "class_specific": "true"})
    assert coop.ctx_init == "123" and coop.class_specific is True  # text, not the number 123
    assert apply_settings(METHODS["coop"].Config, {"ctx_init": "None"}).ctx_init is None
    with pytest.raises(ConfigError, match="coop's epochs must be >= 1, got -3"):
        apply_settings(METHODS["coop"].Config, {"epochs": "-3"}, method="coop")
    with pytest.raises(ConfigError, match="temperature takes a number, got 'hot'"):
        apply_settings(METHODS["mcm"].Config, {"temperature": "hot"}, method="mcm")
    with pytest.raises(ConfigError, match="template must hold exactly one"):
        apply_settings(METHODS["mcm"].Config, {"template": "a {0} {1}"}, method="mcm")
    with pytest.raises(ConfigError, match="lapt's vocabulary must name an existing file"):
        apply_settings(METHODS["lapt"].Config, {"vocabulary": "/no/such/words.txt"}, method="lapt")


def test_parse_pairs_refuses_what_would_be_lost():
    assert parse_pairs(["a=1", "b=x=y", "c="], "--set", empty_values=True) == {"a": "1", "b": "x=y", "c": ""}
    for pairs, message in ((["a"], "expects NAME=DIR"), (["=x"], "expects NAME=DIR"), (["a="], "expects NAME=DIR"),
                           (["a=x", "a=y"], r"--ood a= is given twice \('x' and 'y'\)")):
        with pytest.raises(ConfigError, match=message):
            parse_pairs(pairs, "--ood", "NAME=DIR")


# -- the pipeline ------------------------------------------------------------------------------------------

def test_resolve_datasets_refuses_ambiguous_or_degenerate_data(tmp_path, monkeypatch):
    from promptkit import pipeline

    two = str(image_folder(tmp_path / "two", per_class=3))
    with pytest.raises(ConfigError, match="--ood x= is given twice"):
        pipeline.resolve_datasets(id=two, ood=["x=embedded:digits", "x=embedded:textures"])
    with pytest.raises(ConfigError, match="'id' is reserved"):
        pipeline.resolve_datasets(id=two, ood=["id=embedded:digits"])
    one = image_folder(tmp_path / "one", classes=("a",), per_class=3)
    with pytest.raises(DataError, match="fewer than two ID classes"):
        pipeline.resolve_datasets(id=str(one), ood=["x=embedded:digits"])
    with pytest.raises(ConfigError, match="only read with --benchmark"):
        pipeline.resolve_datasets(data_root=str(tmp_path))
    monkeypatch.setattr(pipeline, "resolve_benchmark", lambda name, root: (pipeline.open_source(two),
                                                                           {"SUN": pipeline.open_source(two)}))
    with pytest.raises(ConfigError, match="imagenet10 already has an OOD set named SUN"):
        pipeline.resolve_datasets(benchmark="imagenet10", data_root=str(tmp_path), ood=[f"SUN={two}"])


def test_threshold_metadata_says_where_it_came_from(tmp_path, monkeypatch):
    from promptkit.clip import load_clip
    from promptkit.pipeline import Datasets, RunOptions, open_source, train_and_evaluate

    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path / "cache"))
    images = str(image_folder(tmp_path / "images", per_class=3))
    data = Datasets(["a", "b"], open_source(images), {"digits": open_source("embedded:digits")}, open_source(images))
    clip, options = load_clip(), RunOptions(progress=False, backend="torch")  # the split, not the kernels
    every = train_and_evaluate("coop", clip, data, 0, 1, {"epochs": "1", "batch_size": "2"}, options)
    assert every.method.info["train"]["threshold_from"] == "the ID training images it was trained on (none held out)"
    few = train_and_evaluate("coop", clip, data, 1, 1, {"epochs": 1}, options)
    assert few.method.info["train"]["threshold_from"] == "held-out ID training images"
    zero_shot = train_and_evaluate("mcm", clip, data, 0, 1, {}, options)
    assert zero_shot.method.info["train"]["threshold_from"].startswith("ID training images (not trained on")


def test_a_binary_list_or_class_file_names_the_file_and_line(tmp_path):
    from promptkit.data.classnames import class_list
    from promptkit.data.sources import open_source

    binary = tmp_path / "list.txt"
    binary.write_bytes(b"a/0.png 0\n\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(DataError, match=r"list\.txt:2: not UTF-8 text \(a list file holds"):
        open_source(binary)
    with pytest.raises(DataError, match=r"list\.txt:2: not UTF-8 text \(a class-name file"):
        class_list(binary)


# -- the command line, in process: every check comes before any model is loaded ---------------------------------

@pytest.fixture(scope="module")
def saved_prompts(tmp_path_factory):
    """Real MCM prompts for the classes a and b (nothing learned, so nothing to train)."""
    from promptkit.clip import load_clip

    return METHODS["mcm"](load_clip(), ["a", "b"]).save(tmp_path_factory.mktemp("saved") / "prompts")


@pytest.fixture
def no_work(monkeypatch, tmp_path, saved_prompts):
    """Fail if a command loads a model or encodes an image; run in an empty folder with a fresh cache."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr("promptkit.clip.load_clip", forbidden)
    monkeypatch.setattr("promptkit.pipeline.extract_features", forbidden)
    monkeypatch.setenv("PROMPTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PROMPTKIT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    image_folder(tmp_path / "one", classes=("a",), per_class=3)
    shutil.copytree(saved_prompts, tmp_path / "prompts")
    return tmp_path


def _refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and lines, lines
    assert lines[-1].startswith(f"promptkit {argv[0]}: error: "), lines
    return lines[-1]


DATA = ["--id", "embedded:test", "--ood", "digits=embedded:digits"]
REFUSED = [
    (["train", "--method", "coop", "--set", "epochs=ten"], "--set epochs=ten: coop's epochs takes a whole number"),
    (["train", "--method", "coop", "--set", "epochs=1.5"], "--set epochs=1.5"),
    (["train", "--method", "coop", "--set", "lr=abc"], "coop's lr takes a number"),
    (["train", "--method", "coop", "--set", "batch_size=2.5"], "coop's batch_size takes a whole number"),
    (["train", "--method", "mcm", "--set", "temperature=hot"], "mcm's temperature takes a number"),
    (["train", "--method", "mcm", "--set", "template=a {0} {1}"], "exactly one '{}'"),
    (["train", "--method", "coop", "--set", "epochs=-3"], "coop's epochs must be >= 1, got -3"),
    (["train", "--method", "coop", "--set", "batch_size=0"], "coop's batch_size must be >= 1, got 0"),
    (["train", "--method", "coop", "--set", "wat=1"], "coop has no setting 'wat'; its settings: n_ctx, ctx_init"),
    (["train", "--method", "lsn", "--set", "compat=nope"], "lsn's compat must be one of paper, official-code"),
    (["compare", "--methods", "mcm,coop", "--set", "coop.epochs=ten"], "--set coop.epochs=ten: coop's epochs"),
    (["compare", "--methods", "mcm", "--set", "coop.epochs=1"], "METHOD one of --methods (mcm)"),
    (["compare", "--methods", "mcm,nope"], "unknown method 'nope'"),
    (["compare", "--methods", "mcm", "--seeds", "1,x"], "seeds are whole numbers >= 0, got 'x'"),
    (["train", "--method", "mcm", "--output", "afile"], "--output afile: is a file, not a folder"),
    (["train", "--method", "mcm", "--output", "afile/run"], "--output afile/run: afile is a file, not a folder"),
    (["compare", "--methods", "mcm", "--output", "afile/run"], "afile is a file"),
    (["train", "--method", "mcm", "--cache-dir", "afile/cache"], "--cache-dir afile/cache: afile is a file"),
    (["score", "--prompts", "prompts", "--images", "embedded:digits", "--output", "adir"],
     "--output adir: is a folder; give a file name, e.g. adir/scores.csv"),
    (["eval", "--prompts", "prompts", "--output", "afile"], "--output afile: is a file"),
    (["eval", "--prompts", "prompts"], "differ from the prompts' classes"),
    (["train", "--method", "mcm", "--id", "embedded:test", "--ood", "x=embedded:digits", "--ood",
      "x=embedded:textures"], "--ood x= is given twice"),
    (["train", "--method", "mcm", "--id", "one", "--ood", "x=embedded:digits"], "one: fewer than two ID classes"),
    (["train", "--method", "coop", *DATA], "coop learns prompts: give --train"),
    (["train", "--method", "mcm", "--train", "nowhere", *DATA], "nowhere"),
    (["train", "--method", "mcm", "--data-root", "adir"], "--data-root adir is only read with --benchmark"),
    (["train", "--method", "mcm", "--benchmark", "imagenet10", "--data-root", "adir", "--id", "one"],
     "drop --id one"),
    (["train", "--method", "mcm", "--benchmark", "imagenet99", "--data-root", "adir"], "unknown benchmark"),
    (["train", "--method", "lapt", "--pool", "nowhere"], "--pool nowhere: no such image folder"),
    (["train", "--method", "lapt", "--set", "vocabulary=nowhere.txt"], "vocabulary must name an existing file"),
    (["train", "--method", "mcm", "--device", "gpu0"], "--device gpu0: invalid device"),
    (["collect", "--output", "afile"], "--output afile: is a file"),
    (["collect", "--output", "out", "--set", "train_negatives=0"], "--set train_negatives=0: lapt's train_negatives"),
]
if not torch.cuda.is_available():
    REFUSED += [(["train", "--method", "mcm", "--backend", "cuda"], "--backend cuda: backend 'cuda' is unavailable"),
                (["train", "--method", "mcm", "--device", "cuda"], "no CUDA GPU is available"),
                (["collect", "--output", "out", "--generate", "sdxl"], "--generate sdxl: image generation is")]


@pytest.mark.parametrize("argv, fragment", REFUSED, ids=[" ".join(argv) for argv, _ in REFUSED])
def test_bad_flags_are_one_line_before_any_work(no_work, capsys, argv, fragment):
    line = _refused(capsys, argv)
    assert fragment in line, line
    assert not (no_work / "promptkit_runs").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--method", "coop", "--shots", "-1"],
    ["train", "--method", "coop", "--seed", "-1"],
    ["train", "--method", "mcm", "--keep-id", "1.5"],
    ["train", "--method", "mcm", "--keep-id", "0"],
    ["extract", "--images", "embedded:test", "--batch-size", "0"],
    ["collect", "--output", "out", "--seed", "-1"],
    ["train", "--method", "mcm", "--backend", "fortran"],
])
def test_bad_flag_values_are_usage_errors(no_work, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "expects" in err or "invalid choice" in err, err


# -- what becomes one line, and what keeps its traceback ---------------------------------------------------------

def _info_raises(monkeypatch, error: BaseException) -> None:
    def command(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "info", command)
    monkeypatch.delenv("PROMPTKIT_DEBUG", raising=False)


@pytest.mark.parametrize("error, line", [
    (ConfigError("bad flag"), "bad flag"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/m.json"), "/out/m.json: No space left on device"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x.png"), "/x.png: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/data"), "/data: Permission denied"),
])
def test_user_and_path_errors_are_one_line(monkeypatch, capsys, error, line):
    _info_raises(monkeypatch, error)
    assert main(["info"]) == 1
    assert capsys.readouterr().err == f"promptkit info: error: {line}\n"


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), TypeError("a bug"),
                                   OSError(errno.EIO, "Input/output error")])
def test_anything_else_keeps_its_traceback(monkeypatch, error):
    _info_raises(monkeypatch, error)
    with pytest.raises(type(error)):
        main(["info"])


def test_debug_shows_the_traceback_of_user_errors(monkeypatch):
    _info_raises(monkeypatch, ConfigError("bad flag"))
    for argv in (["--debug", "info"], ["info", "--debug"]):
        with pytest.raises(ConfigError):
            main(argv)
    monkeypatch.setenv("PROMPTKIT_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["info"])


def test_interrupt_exits_130(monkeypatch, capsys):
    _info_raises(monkeypatch, KeyboardInterrupt())
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "promptkit info: interrupted\n"


def test_warnings_are_one_clean_line(monkeypatch, capsys):
    def command(args):
        warnings.warn("skipped 2 of 9 unreadable images (first: x.png)", stacklevel=1)

    monkeypatch.setitem(cli.COMMANDS, "info", command)
    assert main(["info"]) == 0
    assert capsys.readouterr().err == "promptkit: warning: skipped 2 of 9 unreadable images (first: x.png)\n"
