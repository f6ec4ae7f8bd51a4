"""Recipe objects (training/recipes.py): the loop asks them, and EDM/EDM2 answer as their references do."""

import inspect
import re

import pytest
import torch

from training import recipes
from training import training_loop as tl
from training.presets import build_config


def test_training_loop_has_no_recipe_branches():
    source = inspect.getsource(tl)
    assert not re.search(r"recipe\s*[!=]=", source), 'the loop branches on the recipe name; ask the recipe object'


def test_unknown_recipe_names_the_choices():
    cfg = build_config('tiny-edm')
    with pytest.raises(ValueError, match=r"recipe='nope' must be one of edm, edm2"):
        recipes.make_recipe(type(cfg)(recipe='nope'))


def test_snapshot_names_and_gradient_cleaning_follow_the_references():
    edm, edm2 = recipes.make_recipe(build_config('tiny-edm')), recipes.make_recipe(build_config('tiny-edm2'))
    assert (edm.kimg_name(1_234_567), edm2.kimg_name(1_234_567)) == ('001234', '0001234')
    for recipe, bound in ((edm, 1e5), (edm2, 0.0)):
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = torch.tensor([float('nan'), float('inf'), -float('inf')])
        recipe.clean_gradients([param])
        assert param.grad.tolist() == [0.0, bound, -bound]


def test_edm_updates_its_ema_before_the_step_edm2_after():
    seen = []
    class Probe:
        def update(self, cur_nimg, batch_size):
            seen.append((cur_nimg, batch_size))
    recipes.make_recipe(build_config('tiny-edm')).update_ema(Probe(), 64, 96)
    recipes.make_recipe(build_config('tiny-edm2')).update_ema(Probe(), 64, 96)
    assert seen == [(64, 32), (96, 32)]
