"""``vimerge train``: ``vimerge retrain`` with the from-scratch recipe of the shipped
``vim_fmnist`` weights (:data:`vimerge.train.recipe.BASE_RECIPE`, ``--recipe base``) as defaults."""

from __future__ import annotations

import argparse

from . import retrain

HELP = ("train a model from scratch (default: the recipe of the shipped vim_fmnist weights); "
        "resumable, also under torchrun")


def add_args(p: argparse.ArgumentParser) -> None:
    retrain.add_args(p)
    p.set_defaults(recipe="base")


run = retrain.run
