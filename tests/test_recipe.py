"""Recipe schema: shipped recipes, defaults, overrides, and errors that name field and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from obs_compress.errors import RecipeError
from obs_compress.recipe import (BLOCK_SPARSITY_FIELDS, CALIBRATION_FIELDS, NO_CALIBRATION,
                                 PRUNE_FIELDS, CalibrationSettings, Recipe, load_recipe)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED = ("obs-50.yaml", "obs-2of4.yaml", "obs-70.yaml", "magnitude-50.yaml")
TOP_LEVEL = set(PRUNE_FIELDS) | {"targets", "ignore", "overrides", "sequential", "block_sparsity",
                                 "calibration"}


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_load_and_spell_out_every_field(name):
    raw = yaml.safe_load((RECIPES / name).read_text())
    assert set(raw) == TOP_LEVEL
    assert set(raw["calibration"]) == set(CALIBRATION_FIELDS)
    assert set(raw["block_sparsity"]) == set(BLOCK_SPARSITY_FIELDS)
    recipe = load_recipe(RECIPES / name)
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
