"""Recipes: the one configuration surface of a pruning run.

A recipe is YAML (or a dict) with the same words as :func:`obs_compress.prune_weight`::

    method: obs_blockwise        # magnitude | obd | obs_exact | obs_blockwise
    sparsity: 0.5                # fraction pruned, in [0, 1); N:M patterns fix it at 1 - N/M
    pattern: unstructured        # unstructured | N:M (at most N nonzeros in every M inputs)
    allocation: layer            # layer | row (how an unstructured count spreads over rows)
    block_size: 128              # columns solved at once by obs_blockwise
    dampening_frac: 0.01         # lambda = dampening_frac * mean(diag H)
    refit: false                 # re-solve the kept weights for the final mask
    inverse: cholesky            # cholesky | recursive: which Hessian accumulator runs
    targets: ['.*']              # regexes (re.search) over the names of the Linear layers
    ignore: []                   #   inside the block stack; ignore wins over targets
    overrides:                   # per-layer changes, later entries win
      - targets: ['\\.mlp\\.']
        pattern: '2:4'
    sequential: false            # prune a block's sub-layers in order from recomputed inputs
    block_sparsity:              # how unstructured sparsity spreads over the blocks
      method: uniform            # uniform | owl (outlier-weighed, same total; Yin et al. 2024)
      spread: 0.08               # owl: block sparsities span 2 x spread (OWL's lambda)
      outlier_threshold: 5.0     # owl: an outlier score exceeds this multiple of the mean (M)
      n_samples: 32              # owl: calibration samples (the first ones) for the statistics
    calibration: {source: c4, n_samples: 128, seq_len: 512, seed: 0, start: 0, stop: 1000}

Only layers inside the model's block stack are ever candidates, so ``lm_head``, embeddings
and norms are never pruned whatever the regexes say. Unknown keys and bad values raise
:class:`~obs_compress.errors.RecipeError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .algorithms import METHODS
from .errors import InvalidArgument, RecipeError
from .math.masks import ALLOCATIONS, parse_pattern

INVERSES = ("cholesky", "recursive")


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers, so ``pattern: 2:4`` is the string '2:4', not 124."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


@dataclass(frozen=True)
class PruneSettings:
    """How one layer is pruned; the keyword arguments of ``prune_weight`` plus ``inverse``."""

    method: str = "obs_blockwise"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "layer"
    block_size: int = 128
    dampening_frac: float = 0.01
    refit: bool = False
    inverse: str = "cholesky"  # which accumulator builds the curvature

    def prune_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``prune_weight`` (everything but ``inverse``)."""
        kwargs = asdict(self)
        del kwargs["inverse"]
        return kwargs


PRUNE_FIELDS = tuple(f.name for f in fields(PruneSettings))


@dataclass(frozen=True)
class Override:
    """Prune settings changed for the layers whose names match one of ``targets``."""

    targets: tuple[str, ...]
    changes: tuple[tuple[str, Any], ...]  # (field, value) pairs, in the order given

    def to_dict(self) -> dict[str, Any]:
        return {"targets": list(self.targets), **dict(self.changes)}


@dataclass(frozen=True)
class CalibrationSettings:
    """Which text calibrates the Hessians (see ``../shared/data/README.md`` for the protocol)."""

    source: str = "c4"  # c4 | wikitext2 | self | none | a local .txt/.json/.jsonl/.parquet file
    n_samples: int = 128  # sequences of seq_len tokens
    seq_len: int = 512
    seed: int = 0
    start: int = 0  # document range [start, stop) of the source
    stop: int | None = 1000


CALIBRATION_FIELDS = tuple(f.name for f in fields(CalibrationSettings))
# calibration.source of a recipe that needs no data (magnitude only): no forward runs at
# all, and the report has no reconstruction loss to give.
NO_CALIBRATION = "none"

BLOCK_SPARSITY_METHODS = ("uniform", "owl")


@dataclass(frozen=True)
class BlockSparsitySettings:
    """How the unstructured sparsity of the target layers spreads over the blocks.

    ``uniform``: every layer gets its own recipe sparsity. ``owl``: each block's layers move
    by one offset, from the block's outlier fraction (:mod:`obs_compress.math.block_sparsity`),
    with the total number of pruned weights unchanged. N:M layers are never moved.
    """

    method: str = "uniform"
    spread: float = 0.08
    outlier_threshold: float = 5.0
    n_samples: int = 32


BLOCK_SPARSITY_FIELDS = tuple(f.name for f in fields(BlockSparsitySettings))
# Nested sections of a recipe and the names of their fields (``--set section.field=value``).
SECTIONS = {"block_sparsity": BLOCK_SPARSITY_FIELDS, "calibration": CALIBRATION_FIELDS}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build it with :func:`load_recipe` or :meth:`from_dict`."""

    method: str = "obs_blockwise"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "layer"
    block_size: int = 128
    dampening_frac: float = 0.01
    refit: bool = False
    inverse: str = "cholesky"
    targets: tuple[str, ...] = (".*",)
    ignore: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    sequential: bool = False
    block_sparsity: BlockSparsitySettings = field(default_factory=BlockSparsitySettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    @property
    def settings(self) -> PruneSettings:
        """The recipe-wide prune settings (before overrides)."""
        return PruneSettings(**{name: getattr(self, name) for name in PRUNE_FIELDS})

    def data_needs_text(self) -> str:
        """:meth:`data_needs` as the subject of a sentence (``"method obd needs"``), or ``""``
        when the recipe needs no calibration data."""
        reasons = self.data_needs()
        if not reasons:
            return ""
        return f"{', '.join(reasons)} {'needs' if len(reasons) == 1 else 'need'}"

    def data_needs(self) -> list[str]:
        """Why this recipe needs calibration data (empty when it needs none): every method
        but ``magnitude`` reads the Hessian, so do ``refit`` and OWL's block sparsities."""
        reasons = []
        labelled = [("", self.settings)] + [
            (f"overrides[{index}].", _apply_changes(self.settings, dict(override.changes)))
            for index, override in enumerate(self.overrides)]
        for label, settings in labelled:
            if settings.method != "magnitude":
                reasons.append(f"{label}method {settings.method}")
            if settings.refit:
                reasons.append(f"{label}refit true")
        if self.block_sparsity.method != "uniform":
            reasons.append(f"block_sparsity.method {self.block_sparsity.method}")
        return reasons

    def is_target(self, name: str) -> bool:
        """Whether the layer called ``name`` (inside the block stack) is pruned."""
        return (any(re.search(p, name) for p in self.targets)
                and not any(re.search(p, name) for p in self.ignore))

    def settings_for(self, name: str) -> PruneSettings:
        """The prune settings of layer ``name``: recipe-wide, then every matching override."""
        settings = self.settings
        for override in self.overrides:
            if any(re.search(p, name) for p in override.targets):
                settings = _apply_changes(settings, dict(override.changes))
        return settings

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "") -> "Recipe":
        return _recipe_from_dict(data, origin)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` turns back into an equal recipe."""
        data: dict[str, Any] = {name: getattr(self, name) for name in PRUNE_FIELDS}
        data["targets"] = list(self.targets)
        data["ignore"] = list(self.ignore)
        data["overrides"] = [override.to_dict() for override in self.overrides]
        data["sequential"] = self.sequential
        for section in SECTIONS:
            data[section] = asdict(getattr(self, section))
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def with_updates(self, assignments: Iterable[str]) -> "Recipe":
        """A copy with ``field=value`` assignments applied (the CLI's ``--set``).

        Values are read as YAML (``sparsity=0.7``, ``refit=true``, ``targets=['mlp']``);
        ``calibration.n_samples=16`` reaches into a section (``calibration``,
        ``block_sparsity``).
        """
        data = self.to_dict()
        explicit_sparsity = False
        pattern_changed = False
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            key = key.strip()
            if not sep or not key:
                raise RecipeError(f"override {assignment!r} must look like field=value "
                                  "(e.g. sparsity=0.7 or calibration.n_samples=16)")
            try:
                value = _yaml_load(text) if text.strip() else None
            except yaml.YAMLError as exc:
                raise RecipeError(f"override {assignment!r}: the value is not valid YAML ({exc})")
            section, dot, sub = key.partition(".")
            if dot and section in SECTIONS:
                if sub not in SECTIONS[section]:
                    _unknown(section, sub, SECTIONS[section], "")
                data[section][sub] = value
                continue
            if key not in data:
                allowed = tuple(data) + tuple(f"{part}.{name}" for part, names
                                              in SECTIONS.items() for name in names)
                _unknown("", key, allowed, "")
            data[key] = value
            explicit_sparsity |= key == "sparsity"
            pattern_changed |= key == "pattern"
        if pattern_changed and not explicit_sparsity and _is_nm(data["pattern"]):
            # ``--set pattern=2:4`` alone means 2:4; the sparsity follows from the pattern.
            data.pop("sparsity")
        return _recipe_from_dict(data, "command-line overrides")


def load_recipe(recipe: "str | Path | Mapping[str, Any] | Recipe | None") -> Recipe:
    """A :class:`Recipe` from a YAML file, a mapping, a recipe, or ``None`` (the defaults)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return _recipe_from_dict(recipe, "")
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist (or is not a file); "
                          "see recipes/*.yaml for examples")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    return _recipe_from_dict(data, str(path))


# --------------------------------------------------------------------------- validation


def _where(origin: str) -> str:
    return f" in {origin}" if origin else ""


def _unknown(section: str, key: Any, allowed: Iterable[str], origin: str) -> None:
    allowed = tuple(allowed)
    label = f"{section}.{key}" if section else str(key)
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise RecipeError(f"unknown recipe field {label!r}{_where(origin)}{suggestion}; "
                      f"allowed fields: {', '.join(allowed)}")


def _bad(label: str, value: Any, allowed: str, origin: str) -> RecipeError:
    return RecipeError(f"recipe field {label!r}{_where(origin)}: {value!r} is not allowed; "
                       f"expected {allowed}")


def _is_nm(value: Any) -> bool:
    try:
        return parse_pattern(value).is_nm
    except InvalidArgument:
        return False  # reported with the field named when the recipe is validated


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prune_value(name: str, value: Any, label: str, origin: str) -> Any:
    """The validated value of prune field ``name`` (``label`` is how errors name it)."""
    if name == "method":
        if value not in METHODS:
            raise _bad(label, value, f"one of {', '.join(METHODS)}", origin)
    elif name == "sparsity":
        if not _is_number(value) or not 0.0 <= value < 1.0:
            raise _bad(label, value, "a number in [0, 1), the fraction of weights pruned "
                       "(e.g. 0.5)", origin)
        value = float(value)
    elif name == "pattern":
        try:
            value = str(parse_pattern(value))
        except InvalidArgument:
            raise _bad(label, value, "'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4')",
                       origin) from None
    elif name == "allocation":
        if value not in ALLOCATIONS:
            raise _bad(label, value, f"one of {', '.join(ALLOCATIONS)}", origin)
    elif name == "block_size":
        if not _is_int(value) or value < 1:
            raise _bad(label, value, "a positive integer (e.g. 128)", origin)
    elif name == "dampening_frac":
        if not _is_number(value) or value < 0:
            raise _bad(label, value, "a finite number >= 0 (e.g. 0.01)", origin)
        value = float(value)
    elif name == "refit":
        if not isinstance(value, bool):
            raise _bad(label, value, "true or false", origin)
    elif name == "inverse":
        if value not in INVERSES:
            raise _bad(label, value, f"one of {', '.join(INVERSES)}", origin)
    return value


def _check_consistent(settings: PruneSettings, label: str, origin: str) -> None:
    """Checks that need several fields at once."""
    pattern = parse_pattern(settings.pattern)
    if pattern.is_nm and abs(settings.sparsity - pattern.sparsity) > 1e-9:
        raise RecipeError(
            f"recipe{_where(origin)}{label}: pattern {pattern} prunes exactly "
            f"{pattern.sparsity:g} of the weights, but sparsity is {settings.sparsity:g}; "
            f"set sparsity: {pattern.sparsity:g} (or leave it out) or use pattern: unstructured")
    if pattern.is_nm and settings.method == "obs_blockwise" and settings.block_size % pattern.m:
        raise RecipeError(
            f"recipe{_where(origin)}{label}: block_size {settings.block_size} must be a multiple "
            f"of M={pattern.m} for pattern {pattern} (no N:M group may straddle two blocks)")
    if settings.inverse == "recursive" and settings.dampening_frac <= 0:
        raise RecipeError(
            f"recipe{_where(origin)}{label}: inverse: recursive starts from (alpha I)^-1 and "
            "needs dampening_frac > 0 (e.g. 0.01)")


def _apply_changes(settings: PruneSettings, changes: Mapping[str, Any]) -> PruneSettings:
    if "pattern" in changes and "sparsity" not in changes:
        pattern = parse_pattern(changes["pattern"])
        if pattern.is_nm:  # an N:M override implies its own sparsity
            changes = {**changes, "sparsity": pattern.sparsity}
    return replace(settings, **changes)


def _regex_list(label: str, value: Any, origin: str, *, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise _bad(label, value, "a list of regular expressions over module names "
                   "(e.g. ['\\.mlp\\.', 'self_attn'])", origin)
    if not value and not allow_empty:
        raise _bad(label, value, "at least one regular expression", origin)
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _bad(label, pattern, f"a valid regular expression ({exc})", origin) from None
    return tuple(value)


def _recipe_from_dict(data: Any, origin: str) -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe{_where(origin)} must be a mapping of fields, got "
                          f"{type(data).__name__}")
    allowed = tuple(f.name for f in fields(Recipe))
    for key in data:
        if key not in allowed:
            _unknown("", key, allowed, origin)

    values: dict[str, Any] = {}
    for name in PRUNE_FIELDS:
        if name in data:
            values[name] = _check_prune_value(name, data[name], name, origin)
    pattern = parse_pattern(values.get("pattern", "unstructured"))
    if pattern.is_nm and "sparsity" not in values:
        values["sparsity"] = pattern.sparsity
    if "targets" in data:
        values["targets"] = _regex_list("targets", data["targets"], origin, allow_empty=False)
    if "ignore" in data:
        values["ignore"] = _regex_list("ignore", data["ignore"] or [], origin, allow_empty=True)
    if "sequential" in data:
        if not isinstance(data["sequential"], bool):
            raise _bad("sequential", data["sequential"], "true or false", origin)
        values["sequential"] = data["sequential"]
    if "block_sparsity" in data:
        values["block_sparsity"] = _block_sparsity_from_dict(data["block_sparsity"], origin)
    if "calibration" in data:
        values["calibration"] = _calibration_from_dict(data["calibration"], origin)
    recipe = Recipe(**values)
    _check_consistent(recipe.settings, "", origin)

    overrides = data.get("overrides") or []
    if not isinstance(overrides, (list, tuple)):
        raise _bad("overrides", overrides, "a list of {targets: [...], <prune field>: value}",
                   origin)
    parsed = []
    for index, entry in enumerate(overrides):
        label = f"overrides[{index}]"
        if not isinstance(entry, Mapping):
            raise _bad(label, entry, "a mapping {targets: [...], <prune field>: value}", origin)
        for key in entry:
            if key != "targets" and key not in PRUNE_FIELDS:
                _unknown(label, key, ("targets",) + PRUNE_FIELDS, origin)
        if "targets" not in entry:
            raise RecipeError(f"recipe field {label}{_where(origin)} needs 'targets' "
                              "(regexes of the layers it applies to)")
        targets = _regex_list(f"{label}.targets", entry["targets"], origin, allow_empty=False)
        changes = tuple((key, _check_prune_value(key, value, f"{label}.{key}", origin))
                        for key, value in entry.items() if key != "targets")
        if not changes:
            raise RecipeError(f"recipe field {label}{_where(origin)} changes nothing; give at "
                              f"least one of {', '.join(PRUNE_FIELDS)}")
        override = Override(targets=targets, changes=changes)
        _check_consistent(_apply_changes(recipe.settings, dict(changes)), f" ({label})", origin)
        parsed.append(override)
    recipe = replace(recipe, overrides=tuple(parsed))
    needs = recipe.data_needs_text() if recipe.calibration.source == NO_CALIBRATION else ""
    if needs:
        raise RecipeError(
            f"recipe{_where(origin)}: calibration.source {NO_CALIBRATION!r} (no calibration "
            f"data) fits only magnitude pruning, but {needs} the Hessian of calibration "
            "inputs; set calibration.source (e.g. c4)")
    return recipe


def _section_values(section: str, data: Any, origin: str) -> dict[str, Any]:
    """The fields of nested section ``section`` as a dict; anything but a mapping of its
    known fields is refused."""
    allowed = SECTIONS[section]
    if not isinstance(data, Mapping):
        raise _bad(section, data, f"a mapping with fields {', '.join(allowed)}", origin)
    for key in data:
        if key not in allowed:
            _unknown(section, key, allowed, origin)
    return dict(data)


def _block_sparsity_from_dict(data: Any, origin: str) -> BlockSparsitySettings:
    values = _section_values("block_sparsity", data, origin)
    if "method" in values and values["method"] not in BLOCK_SPARSITY_METHODS:
        raise _bad("block_sparsity.method", values["method"],
                   f"one of {', '.join(BLOCK_SPARSITY_METHODS)}", origin)
    for name, lowest, strict in (("spread", 0.0, False), ("outlier_threshold", 0.0, True)):
        if name in values:
            value = values[name]
            if not _is_number(value) or value < lowest or (strict and value == lowest):
                raise _bad(f"block_sparsity.{name}", value,
                           f"a finite number {'>' if strict else '>='} {lowest:g}", origin)
            values[name] = float(value)
    if "spread" in values and values["spread"] >= 0.5:
        raise _bad("block_sparsity.spread", values["spread"],
                   "a number below 0.5 (block sparsities span 2 x spread; 0.08 is OWL's)", origin)
    if "n_samples" in values and (not _is_int(values["n_samples"]) or values["n_samples"] < 1):
        raise _bad("block_sparsity.n_samples", values["n_samples"], "an integer >= 1", origin)
    return BlockSparsitySettings(**values)


def _calibration_from_dict(data: Any, origin: str) -> CalibrationSettings:
    values = _section_values("calibration", data, origin)
    if "source" in values and (not isinstance(values["source"], str) or not values["source"]):
        raise _bad("calibration.source", values["source"],
                   f"c4, wikitext2, self, {NO_CALIBRATION} or the path of a "
                   ".txt/.json/.jsonl/.parquet file", origin)
    minimums = {"n_samples": 1, "seq_len": 2, "seed": 0, "start": 0}
    for name, minimum in minimums.items():
        if name in values and (not _is_int(values[name]) or values[name] < minimum):
            raise _bad(f"calibration.{name}", values[name], f"an integer >= {minimum}", origin)
    if "stop" in values and values["stop"] is not None:
        start = values.get("start", 0)
        if not _is_int(values["stop"]) or values["stop"] <= start:
            raise _bad("calibration.stop", values["stop"],
                       f"an integer > start ({start}), or null for the end of the source",
                       origin)
    return CalibrationSettings(**values)


__all__ = ["BLOCK_SPARSITY_FIELDS", "BLOCK_SPARSITY_METHODS", "BlockSparsitySettings",
           "CALIBRATION_FIELDS", "CalibrationSettings", "INVERSES", "NO_CALIBRATION", "Override",
           "PRUNE_FIELDS", "PruneSettings", "Recipe", "load_recipe"]
