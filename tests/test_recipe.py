"""Recipe schema: shipped recipes, defaults, overrides, and errors that name field and value."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import yaml

from obs_compress.errors import RecipeError
from obs_compress.recipe import (BLOCK_SPARSITY_FIELDS, CALIBRATION_FIELDS, CURVATURE_FIELDS,
                                 NO_CALIBRATION, PRUNE_FIELDS, STRUCTURED_FIELDS,
                                 CalibrationSettings, Override, Recipe, load_recipe,
                                 recipe_json_schema)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = ("obs-50.yaml", "obs-2of4.yaml", "obs-70.yaml", "magnitude-50.yaml",
           "structured-mlp-20.yaml", "structured-heads-33.yaml", "structured-mlp-20-heads-33.yaml")
TOP_LEVEL = set(PRUNE_FIELDS) | {"targets", "ignore", "overrides", "sequential", "block_sparsity",
                                 "calibration", "curvature", "structured"}
# A structured recipe spells out what structured removal reads (it takes no unstructured field).
STRUCTURED_TOP_LEVEL = {"sparsity", "dampening_frac", "max_dampening_frac", "structured",
                        "curvature", "calibration"}


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_load_and_spell_out_every_field(name):
    raw = yaml.safe_load((RECIPES / name).read_text())
    recipe = load_recipe(RECIPES / name)
    assert set(raw) == (STRUCTURED_TOP_LEVEL if recipe.structured.active else TOP_LEVEL)
    assert set(raw["calibration"]) == set(CALIBRATION_FIELDS)
    assert set(raw["curvature"]) == set(CURVATURE_FIELDS)
    assert set(raw["structured"]) == set(STRUCTURED_FIELDS)
    if not recipe.structured.active:
        assert set(raw["block_sparsity"]) == set(BLOCK_SPARSITY_FIELDS)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_shipped_set_is_complete():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert set(SHIPPED) <= names
    mixed = [load_recipe(RECIPES / n) for n in names - set(SHIPPED)]
    assert any(r.overrides for r in mixed), "one mixed-pattern recipe is shipped"


def test_shipped_values():
    assert load_recipe(RECIPES / "obs-50.yaml").settings.sparsity == 0.5
    assert load_recipe(RECIPES / "obs-70.yaml").settings.sparsity == 0.7
    two_four = load_recipe(RECIPES / "obs-2of4.yaml")
    assert (two_four.pattern, two_four.sparsity, two_four.method) == ("2:4", 0.5, "obs_blockwise")
    assert load_recipe(RECIPES / "magnitude-50.yaml").method == "magnitude"
    mlp = load_recipe(RECIPES / "structured-mlp-20.yaml").structured
    heads = load_recipe(RECIPES / "structured-heads-33.yaml").structured
    both = load_recipe(RECIPES / "structured-mlp-20-heads-33.yaml").structured
    assert (mlp.mlp_fraction, mlp.heads, mlp.score) == (0.2, "none", "obs")
    assert (heads.mlp_fraction, heads.heads, heads.heads_removed) == (0.0, "per_group", 3)
    assert (both.mlp_fraction, both.heads, both.heads_removed) == (0.2, "per_group", 3)
    calibration = load_recipe(RECIPES / "obs-50.yaml").calibration
    assert calibration == CalibrationSettings(source="c4", n_samples=128, seq_len=512, seed=0,
                                              start=0, stop=1000)


def test_defaults():
    recipe = load_recipe(None)
    assert recipe == Recipe() == load_recipe({})
    assert recipe.targets == (".*",) and recipe.ignore == ()
    assert recipe.is_target("model.layers.0.mlp.up_proj")


def test_nm_pattern_implies_its_sparsity():
    assert load_recipe({"pattern": "2:4"}).sparsity == 0.5
    assert load_recipe({"pattern": "1:4"}).sparsity == 0.75
    assert load_recipe({"pattern": " 2 : 4 "}).pattern == "2:4"


def test_overrides_apply_in_order_and_imply_nm_sparsity():
    recipe = load_recipe({
        "sparsity": 0.6,
        "overrides": [
            {"targets": ["mlp"], "pattern": "2:4"},
            {"targets": ["down_proj"], "method": "obd"},
        ],
    })
    assert recipe.settings_for("model.layers.0.self_attn.q_proj").sparsity == 0.6
    up = recipe.settings_for("model.layers.0.mlp.up_proj")
    assert (up.pattern, up.sparsity, up.method) == ("2:4", 0.5, "obs_blockwise")
    down = recipe.settings_for("model.layers.0.mlp.down_proj")
    assert (down.pattern, down.method) == ("2:4", "obd")


def test_ignore_wins_over_targets():
    recipe = load_recipe({"targets": ["layers"], "ignore": [r"\.0\."]})
    assert recipe.is_target("model.layers.1.mlp.up_proj")
    assert not recipe.is_target("model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("data, words", [
    ({"sparsty": 0.5}, ["'sparsty'", "did you mean 'sparsity'", "allowed fields", "method"]),
    ({"calibration": {"samples": 3}}, ["calibration.samples", "n_samples"]),
    ({"overrides": [{"targets": ["x"], "sparse": 0.3}]}, ["overrides[0].sparse", "sparsity"]),
])
def test_unknown_keys_are_rejected_naming_key_and_allowed(data, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("data, words", [
    ({"sparsity": 1.5}, ["'sparsity'", "1.5", "[0, 1)"]),
    ({"sparsity": -0.1}, ["'sparsity'", "-0.1"]),
    ({"sparsity": "half"}, ["'sparsity'", "'half'"]),
    ({"sparsity": True}, ["'sparsity'", "True"]),
    ({"method": "sparsegpt"}, ["'method'", "'sparsegpt'", "obs_blockwise", "magnitude"]),
    ({"pattern": "4:2"}, ["'pattern'", "'4:2'", "N:M"]),
    ({"pattern": "2of4"}, ["'pattern'", "'2of4'"]),
    ({"allocation": "global"}, ["'allocation'", "'global'", "row", "layer"]),
    ({"block_size": 0}, ["'block_size'", "0", "positive integer"]),
    ({"block_size": 12.5}, ["'block_size'", "12.5"]),
    ({"dampening_frac": -1}, ["'dampening_frac'", "-1"]),
    ({"refit": "yes"}, ["'refit'", "'yes'", "true or false"]),
    ({"inverse": "lu"}, ["'inverse'", "'lu'", "cholesky", "recursive"]),
    ({"sequential": 1}, ["'sequential'", "1"]),
    ({"targets": []}, ["'targets'", "at least one"]),
    ({"targets": ["mlp("]}, ["'targets'", "mlp(", "regular expression"]),
    ({"ignore": [3]}, ["'ignore'", "3"]),
    ({"calibration": {"n_samples": 0}}, ["calibration.n_samples", "0"]),
    ({"calibration": {"start": 5, "stop": 5}}, ["calibration.stop", "5"]),
    ({"calibration": {"source": ""}}, ["calibration.source"]),
    ({"block_sparsity": {"method": "global"}}, ["block_sparsity.method", "'global'", "owl"]),
    ({"block_sparsity": {"spread": 0.5}}, ["block_sparsity.spread", "0.5", "below 0.5"]),
    ({"block_sparsity": {"spread": -0.1}}, ["block_sparsity.spread", "-0.1"]),
    ({"block_sparsity": {"outlier_threshold": 0}}, ["block_sparsity.outlier_threshold", "> 0"]),
    ({"block_sparsity": {"n_samples": 0}}, ["block_sparsity.n_samples", "integer >= 1"]),
    ({"block_sparsity": "owl"}, ["'block_sparsity'", "'owl'", "mapping"]),
    ({"overrides": [{"pattern": "2:4"}]}, ["overrides[0]", "targets"]),
    ({"overrides": [{"targets": ["mlp"]}]}, ["overrides[0]", "changes nothing"]),
    ({"overrides": [{"targets": ["mlp"], "sparsity": 2}]}, ["overrides[0].sparsity", "2"]),
    ({"overrides": {"targets": ["mlp"]}}, ["'overrides'"]),
])
def test_bad_values_name_field_value_and_allowed(data, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_inconsistent_fields_are_rejected():
    with pytest.raises(RecipeError, match="pattern 2:4 prunes exactly 0.5.*sparsity is 0.7"):
        load_recipe({"pattern": "2:4", "sparsity": 0.7})
    with pytest.raises(RecipeError, match="block_size 6 must be a multiple of M=4"):
        load_recipe({"pattern": "2:4", "block_size": 6})
    with pytest.raises(RecipeError, match=r"overrides\[0\].*block_size 130"):
        load_recipe({"block_size": 130, "overrides": [{"targets": ["mlp"], "pattern": "2:4"}]})
    with pytest.raises(RecipeError, match="recursive.*dampening_frac > 0"):
        load_recipe({"inverse": "recursive", "dampening_frac": 0})


def test_no_calibration_data_fits_magnitude_only():
    magnitude = load_recipe(RECIPES / "magnitude-50.yaml")
    assert magnitude.calibration.source == NO_CALIBRATION and magnitude.data_needs() == []
    cases = [
        ({"method": "obs_blockwise"}, r"but method obs_blockwise needs the Hessian"),
        ({"method": "magnitude", "refit": True}, r"but refit true needs"),
        ({"method": "magnitude", "overrides": [{"targets": ["mlp"], "method": "obd"}]},
         r"but overrides\[0\]\.method obd needs"),
        ({"method": "magnitude", "block_sparsity": {"method": "owl"}},
         r"but block_sparsity\.method owl needs"),
    ]
    for data, message in cases:
        with pytest.raises(RecipeError, match=r"calibration\.source 'none'.*" + message):
            load_recipe({**data, "calibration": {"source": NO_CALIBRATION}})
        assert load_recipe(data).data_needs()  # with a source, the same recipe is fine
    # --set method=obd on the shipped magnitude recipe is refused, not run without data
    with pytest.raises(RecipeError, match="set calibration.source"):
        magnitude.with_updates(["method=obd"])
    assert magnitude.with_updates(["method=obd", "calibration.source=c4"]).method == "obd"


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- method: obd\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("methd: obd\n")
    with pytest.raises(RecipeError, match=f"in {typo}"):
        load_recipe(typo)


def test_empty_file_gives_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_recipe(empty) == Recipe()


def test_with_updates():
    recipe = load_recipe(RECIPES / "obs-70.yaml")
    updated = recipe.with_updates(["sparsity=0.6", "refit=true", "calibration.n_samples=16",
                                   "targets=['mlp']"])
    assert (updated.sparsity, updated.refit, updated.calibration.n_samples) == (0.6, True, 16)
    assert updated.targets == ("mlp",)
    assert recipe.sparsity == 0.7  # the original is unchanged
    # A pattern alone carries its sparsity along; with an explicit one they must agree.
    assert recipe.with_updates(["pattern=2:4"]).sparsity == 0.5
    with pytest.raises(RecipeError, match="sparsity is 0.7"):
        recipe.with_updates(["pattern=2:4", "sparsity=0.7"])
    with pytest.raises(RecipeError, match="'sparsity'.*1.5"):
        recipe.with_updates(["sparsity=1.5"])
    with pytest.raises(RecipeError, match="unknown recipe field 'sparsty'"):
        recipe.with_updates(["sparsty=0.5"])
    with pytest.raises(RecipeError, match="calibration.samples"):
        recipe.with_updates(["calibration.samples=3"])
    owl = recipe.with_updates(["block_sparsity.method=owl", "block_sparsity.spread=0.05"])
    assert (owl.block_sparsity.method, owl.block_sparsity.spread) == ("owl", 0.05)
    with pytest.raises(RecipeError, match="block_sparsity.lambda.*allowed fields: method, spread"):
        recipe.with_updates(["block_sparsity.lambda=0.1"])
    with pytest.raises(RecipeError, match="field=value"):
        recipe.with_updates(["sparsity"])


def test_yaml_round_trip():
    recipe = load_recipe({"method": "obd", "overrides": [{"targets": ["mlp"], "pattern": "2:4"}],
                          "calibration": {"source": "wikitext2", "stop": None}})
    again = load_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert again.calibration.stop is None


def test_unquoted_nm_pattern_in_yaml_is_a_pattern(tmp_path):
    # Plain YAML 1.1 reads 2:4 as the base-60 number 124; recipes read it as the pattern.
    path = tmp_path / "r.yaml"
    path.write_text("pattern: 2:4\ndampening_frac: 1e-3\n")
    recipe = load_recipe(path)
    assert (recipe.pattern, recipe.sparsity, recipe.dampening_frac) == ("2:4", 0.5, 0.001)


SCHEMA_LINE = "# yaml-language-server: $schema=./recipe.schema.json\n"


def test_schema_file_is_the_models_schema():
    generated = json.dumps(recipe_json_schema(), indent=2, sort_keys=True) + "\n"
    on_disk = (RECIPES / "recipe.schema.json").read_bytes()
    assert on_disk == generated.encode("utf-8"), (
        "recipes/recipe.schema.json is out of date; regenerate it with "
        "`obs-compress recipe --schema > recipes/recipe.schema.json`")


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_point_editors_at_the_schema(name):
    assert (RECIPES / name).read_text().startswith(SCHEMA_LINE)


def test_schema_describes_every_field():
    schema = recipe_json_schema()
    sections = [schema] + list(schema["$defs"].values())
    for section in sections:
        for name, prop in section["properties"].items():
            assert prop.get("description") and prop.get("expected"), name
    override = schema["$defs"]["Override"]
    assert set(override["properties"]) == {"targets", *PRUNE_FIELDS}
    assert override["required"] == ["targets"]
    assert not any("default" in prop for prop in override["properties"].values())


@pytest.mark.parametrize("data, hint, allowed", [
    ({"sparsty": 0.5}, "sparsity", "method, sparsity"),
    ({"overrides": [{"targets": ["mlp"], "sparsty": 0.3}]}, "sparsity",
     "targets, method, sparsity"),
    ({"calibration": {"n_sample": 16}}, "n_samples", "source, n_samples, seq_len"),
    ({"block_sparsity": {"spred": 0.1}}, "spread", "method, spread, outlier_threshold"),
])
def test_misspelt_key_names_the_close_match_of_its_own_section(data, hint, allowed, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert f"(did you mean {hint!r}?)" in message and f"in {path}" in message
    listed = message.split("allowed fields: ")[1]
    assert listed.startswith(allowed)
    if "calibration" in data or "block_sparsity" in data:
        assert "dampening_frac" not in listed  # only the fields of that section


def test_errors_name_the_dotted_field_the_value_and_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("overrides:\n  - targets: [mlp]\n    sparsity: 1.5\n")
    with pytest.raises(RecipeError, match=rf"'overrides\[0\]\.sparsity' in {path}: 1\.5 is not "
                                          r"allowed; expected a number in \[0, 1\)"):
        load_recipe(path)
    path.write_text("calibration:\n  n_samples: many\n")
    with pytest.raises(RecipeError, match=rf"'calibration\.n_samples' in {path}: 'many'"):
        load_recipe(path)


@pytest.mark.parametrize("data, field", [
    ({"block_size": True}, "block_size"),
    ({"dampening_frac": False}, "dampening_frac"),
    ({"max_dampening_frac": True}, "max_dampening_frac"),
    ({"calibration": {"seed": True}}, "calibration.seed"),
    ({"refit": 1}, "refit"),
    ({"refit": 0.0}, "refit"),
    ({"block_sparsity": {"spread": True}}, "block_sparsity.spread"),
])
def test_bools_are_not_numbers_nor_numbers_bools(data, field):
    with pytest.raises(RecipeError, match=f"'{field}'"):
        load_recipe(data)


def test_max_dampening_frac():
    assert load_recipe(None).max_dampening_frac == 1.0
    assert load_recipe({"max_dampening_frac": 0.01}).settings.max_dampening_frac == 0.01  # no raise
    assert load_recipe({"max_dampening_frac": 2}).max_dampening_frac == 2.0
    assert load_recipe({"dampening_frac": 0, "max_dampening_frac": 0}).max_dampening_frac == 0
    with pytest.raises(RecipeError, match="max_dampening_frac 0.001 is below dampening_frac 0.01"):
        load_recipe({"max_dampening_frac": 0.001})
    with pytest.raises(RecipeError, match="'max_dampening_frac': -1"):
        load_recipe({"dampening_frac": 0, "max_dampening_frac": -1})
    for value in (float("inf"), float("nan"), "high"):
        with pytest.raises(RecipeError, match="'max_dampening_frac'.*expected a finite number"):
            load_recipe({"max_dampening_frac": value})
    # An override that raises dampening_frac past the recipe's cap is refused where it is.
    with pytest.raises(RecipeError, match=r"\(overrides\[0\]\): max_dampening_frac 1 is below "
                                          "dampening_frac 2"):
        load_recipe({"overrides": [{"targets": ["mlp"], "dampening_frac": 2.0}]})
    recipe = load_recipe({"overrides": [{"targets": ["mlp"], "dampening_frac": 2.0,
                                         "max_dampening_frac": 2.0}]})
    assert recipe.settings_for("mlp").max_dampening_frac == 2.0
    assert load_recipe(RECIPES / "obs-50.yaml").with_updates(
        ["max_dampening_frac=0.01"]).max_dampening_frac == 0.01


def test_prune_kwargs_are_the_keywords_of_prune_weight():
    from obs_compress.algorithms import prune_weight

    kwargs = load_recipe({"max_dampening_frac": 0.5}).settings.prune_kwargs()
    assert set(kwargs) == set(PRUNE_FIELDS) - {"inverse"}
    assert kwargs["max_dampening_frac"] == 0.5
    assert set(kwargs) <= set(inspect.signature(prune_weight).parameters)


def test_nm_rule_when_loading_in_overrides_and_with_updates():
    # Loading: the pattern brings its sparsity, an explicit different one is refused.
    assert load_recipe({"sparsity": 0.5, "pattern": "2:4"}).sparsity == 0.5
    with pytest.raises(RecipeError, match="pattern 1:4 prunes exactly 0.75.*sparsity is 0.5"):
        load_recipe({"sparsity": 0.5, "pattern": "1:4"})
    # Overrides: an N:M override replaces the inherited sparsity; given in it, they must agree.
    recipe = load_recipe({"sparsity": 0.7, "overrides": [
        {"targets": ["mlp"], "pattern": "1:4"}, {"targets": ["down"], "sparsity": 0.75}]})
    assert recipe.settings_for("mlp.up").sparsity == 0.75
    assert recipe.settings_for("mlp.down").sparsity == 0.75
    with pytest.raises(RecipeError, match=r"\(overrides\[0\]\): pattern 2:4 prunes exactly 0.5"
                                          ".*sparsity is 0.6"):
        load_recipe({"overrides": [{"targets": ["mlp"], "pattern": "2:4", "sparsity": 0.6}]})
    # Overrides that disagree only on the layers both match are refused for those layers.
    clash = load_recipe({"sparsity": 0.7, "overrides": [
        {"targets": ["mlp"], "pattern": "2:4"}, {"targets": ["down"], "sparsity": 0.6}]})
    assert clash.settings_for("attn.q").sparsity == 0.7
    with pytest.raises(RecipeError, match="overrides of layer mlp.down: pattern 2:4.*sparsity "
                                          "is 0.6"):
        clash.settings_for("mlp.down")
    # --set: a pattern alone replaces the recipe's explicit sparsity; together they must agree.
    two_four = load_recipe(RECIPES / "obs-2of4.yaml")
    assert two_four.with_updates(["pattern=unstructured"]).sparsity == 0.5
    assert two_four.with_updates(["pattern=1:4"]).sparsity == 0.75
    with pytest.raises(RecipeError,
                       match="in command-line overrides: pattern 2:4.*sparsity is 0.7"):
        two_four.with_updates(["sparsity=0.7"])
    # The same rule in PruneSettings.with_changes; dataclasses.replace validates too.
    settings = load_recipe({"sparsity": 0.7}).settings
    assert settings.with_changes(pattern="2:4").sparsity == 0.5
    assert dataclasses.replace(settings, sparsity=0.6).sparsity == 0.6
    with pytest.raises(RecipeError, match="sparsity is 0.7"):
        settings.with_changes(pattern="2:4", sparsity=0.7)
    with pytest.raises(RecipeError, match="'sparsity': 1.5"):
        settings.with_changes(sparsity=1.5)


def test_settings_are_frozen_and_hashable():
    recipe = load_recipe(RECIPES / "obs-mixed.yaml")
    settings = {recipe.settings_for(name) for name in ("a.mlp.up", "a.mlp.down", "a.self_attn.q")}
    assert len(settings) == 2
    assert hash(recipe) == hash(load_recipe(RECIPES / "obs-mixed.yaml"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.settings.sparsity = 0.1
    override = recipe.overrides[0]
    assert isinstance(override, Override) and override.changes == (("pattern", "2:4"),)
    assert override.to_dict() == {"targets": [r"\.mlp\."], "pattern": "2:4"}
