"""Recipes: the one configuration surface of a pruning run.

A recipe is YAML (or a dict) with the same words as :func:`obs_compress.prune_weight`::

    method: obs_blockwise        # magnitude | obd | obs_exact | obs_blockwise
    sparsity: 0.5                # fraction pruned, in [0, 1); N:M patterns fix it at 1 - N/M
    pattern: unstructured        # unstructured | N:M (at most N nonzeros in every M inputs)
    allocation: layer            # layer | row (how an unstructured count spreads over rows)
    block_size: 128              # columns solved at once by obs_blockwise
    dampening_frac: 0.01         # lambda = dampening_frac * mean(diag H)
    max_dampening_frac: 1.0      # cap of the automatic raise when Cholesky fails (equal: none)
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

The schema is typed pydantic dataclasses, each field declared once: :class:`PruneSettings`
(how one layer is pruned), :class:`Recipe` (those fields recipe-wide, plus what to prune and
with which data), :class:`Override` (derived from :class:`PruneSettings`: ``targets`` and any
of its fields) and the sections :class:`BlockSparsitySettings` and
:class:`CalibrationSettings`. Dataclasses rather than ``BaseModel`` so that
``dataclasses.replace`` and ``asdict`` work on them, and validate. :func:`recipe_json_schema`
is their JSON Schema (``recipes/recipe.schema.json``, ``obs-compress recipe --schema``), which
editors use to complete and check recipe files.

Only layers inside the model's block stack are ever candidates, so ``lm_head``, embeddings
and norms are never pruned whatever the regexes say. Unknown keys and bad values raise
:class:`~obs_compress.errors.RecipeError` naming the field, the value, what is allowed and
the file; a misspelt key is answered with the closest allowed one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, get_args

import yaml
from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Field, FiniteFloat, Strict,
                      TypeAdapter, ValidationError, ValidationInfo, model_validator)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs, PydanticCustomError

from .algorithms import METHODS
from .errors import InvalidArgument, RecipeError
from .math.masks import ALLOCATIONS, parse_pattern
from .math.structured import SCORES as STRUCTURED_SCORES

INVERSES = ("cholesky", "recursive")
BLOCK_SPARSITY_METHODS = ("uniform", "owl")
CURVATURE_KINDS = ("hessian", "kronecker")
CURVATURE_LOSSES = ("block_reconstruction", "next_token", "next_token_sampled")
STRUCTURED_HEADS = ("none", "per_group", "whole_group")
STRUCTURED_REFERENCES = ("dense", "pruned")
# calibration.source of a recipe that needs no data (magnitude only): no forward runs at
# all, and the report has no reconstruction loss to give.
NO_CALIBRATION = "none"


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


# --------------------------------------------------------------------------- field types

# Strict: YAML's true is not the number 1, nor 1 a flag, nor 12.5 a block size.
_Number = Annotated[FiniteFloat, Strict()]
_Integer = Annotated[int, Strict()]
_Flag = Annotated[bool, Strict()]
_Text = Annotated[str, Strict()]

# Validation errors of our own: "recipe_value" (a value not allowed; ctx may carry the
# "field", "value" and "expected" to report) and "recipe_rule" (fields that disagree).
_VALUE, _RULE = "recipe_value", "recipe_rule"


def _value_error(value: Any, expected: str | None = None, *, field: str | None = None
                 ) -> PydanticCustomError:
    context = {"value": value, "expected": expected, "field": field}
    return PydanticCustomError(_VALUE, "not allowed", {k: v for k, v in context.items()
                                                       if v is not None})


def _rule_error(message: str, *, label: str = "") -> PydanticCustomError:
    return PydanticCustomError(_RULE, "{message}", {"message": message, "label": label})


def _field(default: Any = dataclasses.MISSING, *, description: str, expected: str,
           default_factory: Any = None, schema_extra: Mapping[str, Any] | None = None,
           **constraints: Any) -> Any:
    """A field with its editor tooltip (``description``) and what an error message says is
    allowed (``expected``, kept in the JSON schema as well)."""
    if default_factory is not None:
        constraints["default_factory"] = default_factory
    elif default is not dataclasses.MISSING:
        constraints["default"] = default
    return Field(description=description,
                 json_schema_extra={"expected": expected, **(schema_extra or {})},
                 **constraints)


def _one_of(values: Iterable[str]) -> str:
    return f"one of {', '.join(values)}"


def _normalized_pattern(value: str) -> str:
    return str(parse_pattern(value))  # InvalidArgument: reported with the field's expected text


def _regex_list(value: Any) -> Any:
    """One regex or a list of them; each must compile (the error names the bad one)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise _value_error(value)
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _value_error(pattern, f"a valid regular expression ({exc})") from None
    return value


def _none_as_empty(value: Any) -> Any:
    return () if value is None else value  # ``ignore:`` or ``overrides:`` left blank


_Pattern = Annotated[_Text, AfterValidator(_normalized_pattern)]
# The forms parse_pattern reads, for editors (JSON Schema regexes have no ignore-case flag).
_PATTERN_REGEX = r"^\s*(%s|\d+\s*:\s*\d+)\s*$" % "".join(f"[{c}{c.upper()}]"
                                                       for c in "unstructured")
_Regexes = Annotated[tuple[str, ...], BeforeValidator(_regex_list)]
_TargetRegexes = Annotated[tuple[str, ...], Field(min_length=1), BeforeValidator(_regex_list)]
_REGEXES_EXPECTED = (r"a list of regular expressions over module names "
                     r"(e.g. ['\.mlp\.', 'self_attn'])")


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _imply_nm_sparsity(changes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``changes``, where an N:M pattern implies its sparsity, 1 - N/M.

    The one place of this rule, for every way settings are made: a recipe (``base`` empty,
    i.e. the defaults), an override applied to the recipe-wide settings (``settings_for``)
    and ``--set`` (``with_updates``). A sparsity given in ``changes`` must agree with the
    pattern; one only inherited from ``base`` gives way to it, so ``--set pattern=2:4``
    alone means 2:4 (0.5) whatever sparsity the recipe had.
    """
    merged = {**base, **changes}
    try:
        pattern = parse_pattern(merged.get("pattern", "unstructured"))
    except InvalidArgument:
        return merged  # reported with the field named when the pattern is validated
    given = changes.get("sparsity")
    if not pattern.is_nm or ("sparsity" in changes and not _is_number(given)):
        return merged  # a sparsity that is no number is reported with the field named
    if "sparsity" in changes and abs(given - pattern.sparsity) > 1e-9:
        raise _rule_error(
            f"pattern {pattern} prunes exactly {pattern.sparsity:g} of the weights, but "
            f"sparsity is {given:g}; set sparsity: {pattern.sparsity:g} (or leave it out) or "
            "use pattern: unstructured")
    merged["sparsity"] = pattern.sparsity
    return merged


# --------------------------------------------------------------------------- the schema

_schema = dataclass(frozen=True, config=ConfigDict(extra="forbid"))


@_schema
class PruneSettings:
    """How one layer is pruned: the keyword arguments of ``prune_weight`` plus ``inverse``."""

    method: Literal[METHODS] = _field(
        "obs_blockwise", expected=_one_of(METHODS),
        description="How weights are chosen and updated: magnitude (|w|, no data needed) | "
                    "obd (diagonal Hessian) | obs_exact (row-wise Optimal Brain Surgeon) | "
                    "obs_blockwise (OBS a block of columns at a time, as SparseGPT)")
    sparsity: _Number = _field(
        0.5, ge=0.0, lt=1.0,
        expected="a number in [0, 1), the fraction of weights pruned (e.g. 0.5)",
        description="Fraction of each target layer's weights set to zero; an N:M pattern "
                    "fixes it at 1 - N/M (leave it out, or give exactly that)")
    pattern: _Pattern = _field(
        "unstructured", expected="'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4')",
        schema_extra={"pattern": _PATTERN_REGEX},
        description="unstructured, or N:M: at most N nonzeros in every M consecutive inputs "
                    "(e.g. '2:4' for NVIDIA sparse tensor cores)")
    allocation: Literal[ALLOCATIONS] = _field(
        "layer", expected=_one_of(ALLOCATIONS),
        description="How an unstructured count spreads over rows: layer (one count per "
                    "layer, rows differ by predicted loss) | row (the same count in every "
                    "row); N:M patterns do not use it")
    block_size: _Integer = _field(
        128, ge=1, expected="a positive integer (e.g. 128)",
        description="Columns solved together by obs_blockwise (a multiple of M for N:M)")
    dampening_frac: _Number = _field(
        0.01, ge=0.0, expected="a finite number >= 0 (e.g. 0.01)",
        description="lambda = dampening_frac * mean(diag H), added to diag(H) before "
                    "inverting")
    max_dampening_frac: _Number = _field(
        1.0, ge=0.0,
        expected="a finite number >= dampening_frac (e.g. 1.0; equal to dampening_frac: "
                 "never raise it)",
        description="Cap of the automatic raise of dampening_frac (through 1e-4, 1e-3, "
                    "1e-2, 0.1, 1) when the Cholesky factorization fails; equal to "
                    "dampening_frac: fail instead of raising it")
    refit: _Flag = _field(
        False, expected="true or false",
        description="Re-solve the kept weights exactly for the final mask")
    inverse: Literal[INVERSES] = _field(
        "cholesky", expected=_one_of(INVERSES),
        description="Which accumulator builds the curvature: cholesky (accumulate H, then "
                    "factorize) | recursive (OBS recursive H^-1, Hassibi & Stork 1992 eq. 17)")

    @model_validator(mode="before")
    @classmethod
    def _pattern_implies_sparsity(cls, data: Any, info: ValidationInfo) -> Any:
        # ``base``: the settings that changes apply to (with_changes); none for a recipe.
        base = (info.context or {}).get("base", {})
        if isinstance(data, ArgsKwargs):  # called as a class, or by dataclasses.replace
            return ArgsKwargs(data.args, _imply_nm_sparsity(data.kwargs or {}, base))
        if isinstance(data, Mapping):
            return _imply_nm_sparsity(data, base)
        return data

    @model_validator(mode="after")
    def _fields_agree(self) -> PruneSettings:
        pattern = parse_pattern(self.pattern)
        if pattern.is_nm and self.method == "obs_blockwise" and self.block_size % pattern.m:
            raise _rule_error(
                f"block_size {self.block_size} must be a multiple of M={pattern.m} for "
                f"pattern {pattern} (no N:M group may straddle two blocks)")
        if self.inverse == "recursive" and self.dampening_frac <= 0:
            raise _rule_error("inverse: recursive starts from (alpha I)^-1 and needs "
                              "dampening_frac > 0 (e.g. 0.01)")
        if self.max_dampening_frac < self.dampening_frac:
            raise _rule_error(
                f"max_dampening_frac {self.max_dampening_frac:g} is below dampening_frac "
                f"{self.dampening_frac:g}; set it >= dampening_frac (equal: never raise the "
                "dampening)")
        return self

    def prune_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``prune_weight`` (everything but ``inverse``)."""
        return {name: getattr(self, name) for name in PRUNE_FIELDS if name != "inverse"}

    def with_changes(self, **changes: Any) -> PruneSettings:
        """A validated copy with ``changes``; a new N:M pattern brings its sparsity along.

        What ``dataclasses.replace`` does, plus that rule (replace treats every field as
        given, so it refuses an N:M pattern whose sparsity it would have to change).
        """
        return _validate(type(self), changes, "", base=_shallow_dict(self))


PRUNE_FIELDS = tuple(field.name for field in dataclasses.fields(PruneSettings))


class _OverrideMethods:
    """What an override entry does beyond holding its fields (``Override`` is derived)."""

    @property
    def changes(self) -> tuple[tuple[str, Any], ...]:
        """(field, value) pairs of the per-layer fields the entry sets."""
        return tuple((name, getattr(self, name)) for name in PRUNE_FIELDS
                     if getattr(self, name) is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"targets": list(self.targets), **dict(self.changes)}


def _changes_something(self: Any) -> Any:
    if not self.changes:
        raise _rule_error(f"the override changes nothing; give at least one of "
                          f"{', '.join(PRUNE_FIELDS)}")
    return self


def _override_namespace() -> dict[str, Any]:
    """The body of class ``Override``: ``targets``, then every field of
    :class:`PruneSettings` with its type, checks and texts but ``None`` (unchanged) as
    default."""
    namespace: dict[str, Any] = {
        "__doc__": "Prune settings changed for the layers whose names match one of "
                   "``targets``; the fields left out (None) keep their values.",
        "__module__": __name__,
        "__annotations__": {"targets": _TargetRegexes},
        "targets": _field(expected=f"at least one regular expression; {_REGEXES_EXPECTED}",
                          description="Regexes (re.search) of the target layers this entry "
                                      "changes"),
        "_changes_something": model_validator(mode="after")(_changes_something)}
    for name, info in PruneSettings.__pydantic_fields__.items():
        namespace["__annotations__"][name] = (Annotated[(info.annotation, *info.metadata)]
                                              if info.metadata else info.annotation)
        namespace[name] = Field(None, description=info.description,
                                json_schema_extra=info.json_schema_extra)
    return namespace


Override = _schema(type("Override", (_OverrideMethods,), _override_namespace()))


@_schema
class BlockSparsitySettings:
    """How the unstructured sparsity of the target layers spreads over the blocks.

    ``uniform``: every layer gets its own recipe sparsity. ``owl``: each block's layers move
    by one offset, from the block's outlier fraction (``obs_compress.math.block_sparsity``),
    with the total number of pruned weights unchanged. N:M layers are never moved.
    """

    method: Literal[BLOCK_SPARSITY_METHODS] = _field(
        "uniform", expected=_one_of(BLOCK_SPARSITY_METHODS),
        description="uniform: every layer its own sparsity | owl: outlier-weighed layerwise "
                    "sparsity (OWL, Yin et al. 2024), the same total")
    spread: _Number = _field(
        0.08, ge=0.0, lt=0.5,
        expected="a number >= 0 and below 0.5 (block sparsities span 2 x spread; 0.08 is "
                 "OWL's)",
        description="owl: block sparsities span 2 x spread (OWL's lambda)")
    outlier_threshold: _Number = _field(
        5.0, gt=0.0, expected="a finite number > 0 (e.g. 5.0)",
        description="owl: a score |W_ij| ||X_j|| above this multiple of the block mean is "
                    "an outlier (OWL's M)")
    n_samples: _Integer = _field(
        32, ge=1, expected="an integer >= 1",
        description="owl: the first calibration samples, for the statistics")


@_schema
class CurvatureSettings:
    """Which curvature the second-order methods read (docs/ALGORITHMS.md, "Kronecker").

    ``hessian``: the layer-wise ``H = 2 X^T X / n`` of each layer's inputs. ``kronecker``:
    ``G (x) H`` with ``G = E[g g^T]`` over the gradients of ``loss`` with respect to the
    layer's outputs (``obs_compress.curvature``); each row is still compensated within itself
    over ``H``, so ``G`` moves how layer allocation spreads a layer's count over its rows
    (``allocation: row`` and N:M are unchanged by it).
    """

    kind: Literal[CURVATURE_KINDS] = _field(
        "hessian", expected=_one_of(CURVATURE_KINDS),
        description="hessian: layer-wise H | kronecker: G (x) H, G from output gradients")
    loss: Literal[CURVATURE_LOSSES] = _field(
        "block_reconstruction", expected=_one_of(CURVATURE_LOSSES),
        description="kronecker: the loss whose output gradients give G: block_reconstruction "
                    "(Gaussian probes of the block output, its Gauss-Newton matrix) | "
                    "next_token (the text's cross-entropy: empirical Fisher) | "
                    "next_token_sampled (labels drawn from the model: true Fisher)")
    dampening_frac_g: _Number = _field(
        0.01, ge=0.0, expected="a number >= 0",
        description="kronecker: G + dampening_frac_g * mean(diag G) * I before inverting")
    n_probes: _Integer = _field(
        1, ge=1, expected="an integer >= 1",
        description="kronecker, block_reconstruction: Gaussian probes per calibration batch")
    seed: _Integer = _field(0, ge=0, expected="an integer >= 0",
                            description="kronecker: seeds the probes and sampled labels")


@_schema
class StructuredSettings:
    """Structured removal: whole MLP channels and attention heads out of every block, for a
    smaller dense model (docs/ALGORITHMS.md, "Structured OBS"; ``obs_compress.structured``).

    Every block loses the same numbers (the config has one width for all blocks), chosen by
    ``score`` inside each block. ``obs`` compensates the kept columns of ``down_proj`` /
    ``o_proj`` with the group OBS update over their input Hessian (``curvature.kind
    kronecker``: the saliency weighed by ``G`` of the block-output loss); ``activation`` and
    ``weight_norm`` remove without compensation (the baselines).
    """

    mlp_fraction: _Number = _field(
        0.0, ge=0.0, lt=1.0, expected="a number in [0, 1) (e.g. 0.2)",
        description="Fraction of each block's MLP channels removed (rounded to a count)")
    heads: Literal[STRUCTURED_HEADS] = _field(
        "none", expected=_one_of(STRUCTURED_HEADS),
        description="none | per_group: the same number of query heads from every key/value "
                    "group | whole_group: whole key/value groups with all their query heads")
    heads_removed: _Integer = _field(
        0, ge=0, expected="an integer >= 0 (query heads removed per block)",
        description="Query heads removed per block (per_group: a multiple of "
                    "num_key_value_heads; whole_group: a multiple of the group size)")
    score: Literal[STRUCTURED_SCORES] = _field(
        "obs", expected=_one_of(STRUCTURED_SCORES),
        description="obs: group OBS saliency and compensation | activation: ||W_:,j|| ||X_j||, "
                    "no compensation | weight_norm: ||W_:,Q||, no compensation")
    shots: _Integer = _field(
        1, ge=1, expected="an integer >= 1",
        description="Remove in this many steps per block, re-estimating the curvature and "
                    "the scores between them")
    reference: Literal[STRUCTURED_REFERENCES] = _field(
        "pruned", expected=_one_of(STRUCTURED_REFERENCES),
        description="obs: the outputs the compensated layer matches: pruned (the layer's own "
                    "outputs before the removal; measured better on SmolLM2, "
                    "docs/benchmarks.md) | dense (the dense model's residual stream after it, "
                    "so the error of earlier blocks is corrected too)")

    @model_validator(mode="after")
    def _heads_agree(self) -> StructuredSettings:
        if (self.heads == "none") != (self.heads_removed == 0):
            raise _rule_error(f"heads {self.heads} with heads_removed {self.heads_removed}: set "
                              "both (heads per_group or whole_group and a count > 0) or neither",
                              label="structured")
        return self

    @property
    def active(self) -> bool:
        return self.mlp_fraction > 0 or self.heads != "none"


@_schema
class CalibrationSettings:
    """Which text calibrates the Hessians (see ``../shared/data/README.md`` for the protocol)."""

    source: _Text = _field(
        "c4", min_length=1,
        expected=f"c4, wikitext2, hub:c4, hub:wikitext2, self, {NO_CALIBRATION} or the path "
                 "of a .txt/.json/.jsonl/.parquet file",
        description="c4 | wikitext2 (files of the data folder: --data-dir or "
                    "$OBS_COMPRESS_DATA_DIR) | hub:c4 | hub:wikitext2 (the same data from the "
                    f"Hugging Face hub) | self (text the model generates) | {NO_CALIBRATION} "
                    "(no data: magnitude only) | a local .txt/.json/.jsonl/.parquet file")
    n_samples: _Integer = _field(128, ge=1, expected="an integer >= 1",
                                 description="Sequences of seq_len tokens")
    seq_len: _Integer = _field(512, ge=2, expected="an integer >= 2",
                               description="Tokens per calibration sequence")
    seed: _Integer = _field(0, ge=0, expected="an integer >= 0",
                            description="Seeds random.Random for the draws")
    start: _Integer = _field(0, ge=0, expected="an integer >= 0",
                             description="First document of the source used ([start, stop))")
    stop: _Integer | None = _field(
        1000, expected="an integer > start, or null for the end of the source",
        description="End (exclusive) of the documents used; null: to the end of the source")

    @model_validator(mode="after")
    def _stop_after_start(self) -> CalibrationSettings:
        if self.stop is not None and self.stop <= self.start:
            raise _value_error(self.stop, f"an integer > start ({self.start}), or null for "
                               "the end of the source", field="stop")
        return self


CALIBRATION_FIELDS = tuple(field.name for field in dataclasses.fields(CalibrationSettings))
BLOCK_SPARSITY_FIELDS = tuple(field.name for field in dataclasses.fields(BlockSparsitySettings))
# Nested sections of a recipe and the names of their fields (``--set section.field=value``).
CURVATURE_FIELDS = tuple(field.name for field in dataclasses.fields(CurvatureSettings))
STRUCTURED_FIELDS = tuple(field.name for field in dataclasses.fields(StructuredSettings))
SECTIONS = {"block_sparsity": BLOCK_SPARSITY_FIELDS, "calibration": CALIBRATION_FIELDS,
            "curvature": CURVATURE_FIELDS, "structured": STRUCTURED_FIELDS}


def _section(cls: type, description: str) -> Any:
    names = ", ".join(field.name for field in dataclasses.fields(cls))
    return _field(default_factory=cls, description=description,
                  expected=f"a mapping with fields {names}")


@_schema
class Recipe(PruneSettings):
    """A validated recipe: the recipe-wide prune settings (the fields of PruneSettings),
    which layers to prune, per-layer overrides, and the calibration data. Build it with
    load_recipe() or Recipe.from_dict()."""

    targets: _TargetRegexes = _field(
        (".*",), expected=f"at least one regular expression; {_REGEXES_EXPECTED}",
        description="Regexes (re.search) over the names of the Linear layers inside the "
                    "block stack: the layers pruned")
    ignore: Annotated[_Regexes, BeforeValidator(_none_as_empty)] = _field(
        (), expected=f"{_REGEXES_EXPECTED}, possibly empty",
        description="Regexes of layers left dense (ignore wins over targets)")
    overrides: Annotated[tuple[Override, ...], BeforeValidator(_none_as_empty)] = _field(
        (), expected="a list of {targets: [...], <prune field>: value}",
        description="Per-layer changes, later entries win: [{targets: [regex], <field>: "
                    "value}]; the fields left out keep the values above")
    sequential: _Flag = _field(
        False, expected="true or false",
        description="true: prune a block's layers in order, each from inputs recomputed "
                    "after the ones before it were pruned")
    block_sparsity: BlockSparsitySettings = _section(
        BlockSparsitySettings, "How unstructured sparsity spreads over the blocks")
    calibration: CalibrationSettings = _section(
        CalibrationSettings, "Which text calibrates the Hessians")
    curvature: CurvatureSettings = _section(
        CurvatureSettings, "Which curvature the second-order methods read: hessian or kronecker")
    structured: StructuredSettings = _section(
        StructuredSettings, "Structured removal of MLP channels and attention heads (a "
        "smaller dense model)")

    @model_validator(mode="after")
    def _overrides_and_data_agree(self) -> Recipe:
        settings = _shallow_dict(self.settings)
        for index, override in enumerate(self.overrides):
            try:
                _adapter(PruneSettings).validate_python(dict(override.changes),
                                                        context={"base": settings})
            except ValidationError as error:
                problem = error.errors()[0]
                raise _rule_error((problem.get("ctx") or {}).get("message", problem["msg"]),
                                  label=f"overrides[{index}]") from None
        if self.curvature.kind == "kronecker" and self.method == "magnitude":
            raise _rule_error("curvature.kind kronecker weighs the second-order methods' "
                              "losses, and method magnitude reads the weights alone; use obd, "
                              "obs_exact or obs_blockwise", label="curvature")
        if self.structured.active:
            self._check_structured()
        needs = self.data_needs_text() if self.calibration.source == NO_CALIBRATION else ""
        if needs:
            raise _rule_error(
                f"calibration.source {NO_CALIBRATION!r} (no calibration data) fits only "
                f"magnitude pruning, but {needs} the Hessian of calibration inputs; set "
                "calibration.source (e.g. c4)")
        return self

    def _check_structured(self) -> None:
        if self.sparsity != 0 or self.overrides:
            raise _rule_error(
                "structured removal runs on its own: set sparsity: 0 and no overrides "
                f"(this recipe has sparsity {self.sparsity:g}"
                f"{f' and {len(self.overrides)} overrides' if self.overrides else ''}); prune "
                "the smaller model unstructured in a second run", label="structured")
        if self.curvature.kind == "kronecker":
            if self.structured.score != "obs":
                raise _rule_error(f"curvature.kind kronecker weighs the obs saliency, and "
                                  f"structured.score is {self.structured.score}",
                                  label="structured")
            if self.curvature.loss != "block_reconstruction":
                raise _rule_error(f"structured removal takes G of the block-output loss; "
                                  f"curvature.loss {self.curvature.loss} is for the "
                                  "unstructured methods", label="structured")
        if self.block_sparsity.method != "uniform":
            raise _rule_error("block_sparsity spreads unstructured sparsity; structured removal "
                              "takes the same numbers from every block", label="structured")

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
            (f"overrides[{index}].", self.settings.with_changes(**dict(override.changes)))
            for index, override in enumerate(self.overrides)]
        for label, settings in labelled if not self.structured.active else ():
            if settings.method != "magnitude":
                reasons.append(f"{label}method {settings.method}")
            if settings.refit:
                reasons.append(f"{label}refit true")
        if self.block_sparsity.method != "uniform":
            reasons.append(f"block_sparsity.method {self.block_sparsity.method}")
        if self.curvature.kind != "hessian":
            reasons.append(f"curvature.kind {self.curvature.kind}")
        if self.structured.active:
            reasons.append(f"structured.score {self.structured.score}")
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
                settings = _validate(PruneSettings, dict(override.changes),
                                     f"the overrides of layer {name}",
                                     base=_shallow_dict(settings))
        return settings

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "") -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError(f"recipe{_where(origin)} must be a mapping of fields, got "
                              f"{type(data).__name__}")
        return _validate(cls, data, origin)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` turns back into an equal recipe."""
        return {field.name: _plain(getattr(self, field.name))
                for field in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def with_updates(self, assignments: Iterable[str]) -> Recipe:
        """A copy with ``field=value`` assignments applied (the CLI's ``--set``).

        Values are read as YAML (``sparsity=0.7``, ``refit=true``, ``targets=['mlp']``);
        ``calibration.n_samples=16`` reaches into a section (``calibration``,
        ``block_sparsity``). ``pattern=2:4`` alone brings sparsity 0.5 along.
        """
        changes: dict[str, Any] = {}
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
                current = changes.get(section, dataclasses.asdict(getattr(self, section)))
                changes[section] = {**(current if isinstance(current, Mapping) else {}),
                                    sub: value}
            else:
                changes[key] = value
        return _validate(Recipe, changes, "command-line overrides", base=_shallow_dict(self))


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of recipe files (``recipes/recipe.schema.json``)."""
    schema = _adapter(Recipe).json_schema()
    for prop in schema["$defs"]["Override"]["properties"].values():
        prop.pop("default", None)  # None there means "unchanged", not a value to write
    return schema


def load_recipe(recipe: "str | Path | Mapping[str, Any] | Recipe | None") -> Recipe:
    """A :class:`Recipe` from a YAML file, a mapping, a recipe, or ``None`` (the defaults)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist (or is not a file); "
                          "see recipes/*.yaml for examples")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path}: not valid YAML: {exc}") from None
    return Recipe.from_dict({} if data is None else data, origin=str(path))


# --------------------------------------------------------------------------- validation


@lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _shallow_dict(instance: Any) -> dict[str, Any]:
    """Field values by name, nested sections left as they are (``asdict`` would unpack)."""
    return {field.name: getattr(instance, field.name) for field in dataclasses.fields(instance)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, _OverrideMethods):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def _validate(cls: type, data: Mapping[str, Any], origin: str, *,
              base: Mapping[str, Any] | None = None) -> Any:
    """``cls`` from ``data`` (changes to ``base`` when given), or a :class:`RecipeError`."""
    try:
        return _adapter(cls).validate_python(data, context={"base": base or {}})
    except ValidationError as error:
        raise _recipe_error(error, origin) from None


def _where(origin: str) -> str:
    return f" in {origin}" if origin else ""


def _unknown(label: str, key: str, allowed: Iterable[str], origin: str) -> RecipeError:
    allowed = tuple(allowed)
    hint = difflib.get_close_matches(key, allowed, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return RecipeError(f"unknown recipe field {label!r}{_where(origin)}{suggestion}; "
                       f"allowed fields: {', '.join(allowed)}")


def _schema_in(annotation: Any) -> type | None:
    """The schema dataclass inside a field's type (``tuple[Override, ...]`` -> Override)."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    for argument in get_args(annotation):
        found = _schema_in(argument)
        if found is not None:
            return found
    return None


def _locate(loc: Iterable[Any]) -> tuple[str, type, str | None]:
    """The label of an error location (``overrides[0].sparsity``), the schema class of its
    last part, and that part's field name (None for a key that is no field of it)."""
    label, schema, owner, name = "", Recipe, Recipe, None
    for part in loc:
        if isinstance(part, int):
            label += f"[{part}]"
            continue
        label = f"{label}.{part}" if label else str(part)
        fields = getattr(schema, "__pydantic_fields__", {})
        if part not in fields:
            return label, schema, None
        owner, name = schema, part
        schema = _schema_in(fields[part].annotation)
    return label, owner, name


def _recipe_error(error: ValidationError, origin: str) -> RecipeError:
    """One pydantic error (an unknown key first, as it often explains the rest) in words:
    the field's dotted label, the value given, what is allowed and the file."""
    problems = error.errors()
    unknown = [p for p in problems if p["type"] in ("unexpected_keyword_argument",
                                                    "extra_forbidden", "invalid_key")]
    problem = (unknown or problems)[0]
    context = problem.get("ctx") or {}
    loc = tuple(problem["loc"]) + ((context["field"],) if "field" in context else ())
    if problem["type"] == "invalid_key":  # a key that is no string, e.g. YAML's ``1: x``
        loc = loc[:-1] + (str(loc[-1]),)
    label, owner, name = _locate(loc)
    if unknown:
        allowed = [field.name for field in dataclasses.fields(owner)]
        return _unknown(label, str(loc[-1]), allowed, origin)
    if problem["type"] == _RULE:
        label = context.get("label") or label
        return RecipeError(f"recipe{_where(origin)}{f' ({label})' if label else ''}: "
                           f"{context['message']}")
    extra = owner.__pydantic_fields__[name].json_schema_extra if name else None
    expected = context.get("expected") or (extra or {}).get("expected") or problem["msg"]
    if problem["type"] == "missing":
        parent = label.rpartition(".")[0] or "recipe"
        return RecipeError(f"recipe field {parent!r}{_where(origin)} needs {name!r}: "
                           f"{expected}")
    value = context.get("value", problem["input"])
    return RecipeError(f"recipe field {label!r}{_where(origin)}: {value!r} is not allowed; "
                       f"expected {expected}")


__all__ = ["BLOCK_SPARSITY_FIELDS", "BLOCK_SPARSITY_METHODS", "BlockSparsitySettings",
           "CALIBRATION_FIELDS", "CalibrationSettings", "INVERSES", "NO_CALIBRATION", "Override",
           "PRUNE_FIELDS", "PruneSettings", "Recipe", "load_recipe", "recipe_json_schema"]
