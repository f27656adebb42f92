"""YAML recipes -> validated `Recipe` objects, with errors that name the line and the field."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecipeError
from .registry import PassConfig, PassInfo, get_pass

RECIPE_VERSION = 1
DATA_SOURCES = ("digits", "mnist", "imagefolder", "synthetic", "callable")


class DataSource(BaseModel):
    """One data stream of a recipe (`calibration`, `train` or `eval`)."""
    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="digits | mnist | imagefolder | synthetic | callable")
    root: str | None = Field(None, description="folder of the dataset (mnist, imagefolder)")
    split: Literal["train", "test", "all"] = Field(
        "train", description="digits/mnist: which part of the deterministic 80/20 split")
    samples: int | None = Field(None, gt=0, description="use at most this many samples")
    batch_size: int = Field(64, gt=0)
    shuffle: bool = False
    callable: str | None = Field(None, description="package.module:function returning an iterable of batches")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for `callable`")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in DATA_SOURCES:
            close = difflib.get_close_matches(value, DATA_SOURCES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown data source '{value}'{hint}; choose one of {', '.join(DATA_SOURCES)}")
        return value


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    calibration: DataSource | None = None
    train: DataSource | None = None
    eval: DataSource | None = None


class RecipeHeader(BaseModel):
    """Everything in a recipe except the pass list, which is validated against the pass registry."""
    model_config = ConfigDict(extra="forbid")
    fxcompress: Literal[1] = Field(description="recipe format version")
    model: str | None = Field(None, description="torchvision:NAME, package.module:factory, or a built-in name")
    model_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model factory")
    weights: str | None = Field(None, description="state_dict file loaded into the model before tracing")
    input_shape: list[int] | None = Field(None, description="shape of one example input, batch first")
    leaf_modules: list[str] = Field(default_factory=list, description="class names or name globs kept opaque")
    seed: int = 0
    verify: bool = Field(False, description="check every exact pass preserves outputs (float64)")
    data: DataSection = Field(default_factory=DataSection)
    passes: list[Any] = Field(min_length=1)

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, value):
        if value is not None and (not value or any(d <= 0 for d in value)):
            raise ValueError(f"input_shape must be a non-empty list of positive sizes, got {value}")
        return value


@dataclass
class PassStep:
    """One validated entry of a recipe's pass list."""
    name: str
    config: PassConfig
    info: PassInfo
    index: int
    line: int | None = None

    @property
    def field(self) -> str:
        return f"passes[{self.index}].{self.name}"


@dataclass
class Recipe:
    """A validated recipe. `text` is the YAML it came from (for copying next to the outputs)."""
    header: RecipeHeader
    passes: list[PassStep]
    source: str | None = None
    text: str | None = None
    lines: dict = field(default_factory=dict, repr=False)

    def __getattr__(self, name):
        if name in RecipeHeader.model_fields:
            return getattr(self.header, name)
        raise AttributeError(name)

    def line_of(self, *path) -> int | None:
        return _closest_line(self.lines, tuple(path))

    def error(self, message: str, *path) -> RecipeError:
        """A RecipeError located at `path` (e.g. `("passes", 2, "low_rank", "targets", 0)`)."""
        return RecipeError(message, field=_dotted(path), line=self.line_of(*path), source=self.source)

    def to_yaml(self) -> str:
        if self.text is not None:
            return self.text
        data = self.header.model_dump(exclude_none=True, exclude={"passes"})
        data["passes"] = [{s.name: s.config.model_dump(exclude_unset=True, mode="json")} for s in self.passes]
        return yaml.safe_dump(data, sort_keys=False)


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_map(text: str) -> dict[tuple, int]:
    """Map every key/item path of a YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = path + (key.value,)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        lines[()] = root.start_mark.line + 1
        walk(root, ())
    return lines


def _closest_line(lines: dict, path: tuple) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def _validation_error(exc: ValidationError, prefix: tuple, lines: dict, source: str | None,
                      model: type[BaseModel]) -> RecipeError:
    err = exc.errors()[0]
    path = prefix + tuple(err["loc"])
    if err["type"] == "missing":
        message = "missing required field"
    elif err["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields) if len(err["loc"]) == 1 else ""
        message = f"unknown field '{err['loc'][-1]}'" + (f"; known fields: {known}" if known else "")
    else:
        got = err.get("input")
        message = err["msg"].removeprefix("Value error, ") + (
            f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else "")
    return RecipeError(message, field=_dotted(path), line=_closest_line(lines, path), source=source)


def _parse_pass(entry: Any, index: int, lines: dict, source: str | None) -> PassStep:
    path = ("passes", index)
    line = _closest_line(lines, path)
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, options = next(iter(entry.items()))
        options = {} if options is None else options
    else:
        raise RecipeError("each pass is a name (`- fold_batchnorm`) or a one-key mapping "
                          "(`- low_rank: {rank: 8}`)", field=_dotted(path), line=line, source=source)
    if not isinstance(name, str):
        raise RecipeError(f"pass name must be a string, got {name!r}", field=_dotted(path), line=line, source=source)
    try:
        info = get_pass(name)
    except RecipeError as exc:
        raise RecipeError(exc.message, field=_dotted(path), line=line, source=source) from None
    if not isinstance(options, dict):
        raise RecipeError(f"options of pass '{name}' must be a mapping, got {options!r}",
                          field=_dotted(path + (name,)), line=line, source=source)
    try:
        config = info.config.model_validate(options)
    except ValidationError as exc:
        raise _validation_error(exc, path + (name,), lines, source, info.config) from None
    return PassStep(name=name, config=config, info=info, index=index, line=line)


def _read_source(spec) -> tuple[Any, str | None, str | None]:
    """(data, text, source name) from a dict, a path, a shipped recipe name, or YAML text."""
    if isinstance(spec, dict):
        return spec, None, None
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and "\n" not in spec and
                                          (spec.endswith((".yaml", ".yml")) or os.path.exists(spec))):
        path = Path(spec)
        if not path.is_file():
            shipped = shipped_recipe(path.stem) if path.suffix in ("", ".yaml", ".yml") else None
            if shipped is None:
                raise RecipeError(f"recipe file '{spec}' does not exist; give a path, YAML text, or the name "
                                  f"of a shipped recipe ({', '.join(shipped_recipes())})")
            path = shipped
        return None, path.read_text(), str(spec)
    if isinstance(spec, str):
        shipped = shipped_recipe(spec) if spec.isidentifier() else None
        if shipped is not None:
            return None, shipped.read_text(), str(shipped)
        return None, spec, None
    raise RecipeError(f"a recipe is a path, YAML text or a dict, got {type(spec).__name__}")


def shipped_recipes() -> list[str]:
    folder = resources.files("fxcompress.recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def shipped_recipe(name: str):
    candidate = resources.files("fxcompress.recipes") / f"{name}.yaml"
    return candidate if candidate.is_file() else None


def load_recipe(spec) -> Recipe:
    """Parse and validate a recipe from a path, YAML text, a shipped recipe's name, or a dict.

    Every error is a RecipeError naming the line (for YAML input) and the field. Only `yaml.safe_load`
    is used.
    """
    if isinstance(spec, Recipe):
        return spec
    data, text, source = _read_source(spec)
    lines: dict = {}
    if text is not None:
        try:
            data = yaml.safe_load(text)
            lines = _line_map(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise RecipeError(f"not valid YAML: {getattr(exc, 'problem', exc)}",
                              line=mark.line + 1 if mark else None, source=source) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping with at least `fxcompress: 1` and `passes:`", source=source)
    try:
        header = RecipeHeader.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, (), lines, source, RecipeHeader) from None
    passes = [_parse_pass(entry, i, lines, source) for i, entry in enumerate(header.passes)]
    return Recipe(header=header, passes=passes, source=source, text=text, lines=lines)
