"""The shipped Fashion-MNIST base checkpoint matches its sidecar."""

import json
from pathlib import Path

import pytest
import torch

import vimerge
from vimerge.data.fashion_mnist import FashionMNIST, FashionMNISTNotFound
from vimerge.models.registry import pretrained_uri

FMNIST_WEIGHTS = pretrained_uri("vim_fmnist")

SIDECAR = Path(FMNIST_WEIGHTS).with_suffix(".json")


SHIPPED = {"vim_fmnist": 88.0, "deit_fmnist": 84.0}     # lowest test top-1 each may have


@pytest.mark.parametrize("name", list(SHIPPED))
def test_sidecar_records_how_the_weights_were_made(name):
    meta = json.loads(Path(pretrained_uri(name)).with_suffix(".json").read_text())
    for key in ("command", "seed", "commit", "test_top1", "test_top1_first1000", "train_seconds"):
        assert key in meta, key
    assert meta["model"] == name and meta["test_top1"] >= SHIPPED[name]
    assert meta["command"].startswith("vimerge ") and f"--model {name}" in meta["command"]


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_weights_reproduce_the_recorded_accuracy(name):
    sidecar = Path(pretrained_uri(name)).with_suffix(".json")
    model = vimerge.create_model(name, pretrained=True).eval()
    try:
        data = FashionMNIST(None, "test", limit=1000)
    except FashionMNISTNotFound as exc:
        pytest.skip(f"Fashion-MNIST is not installed here: {exc}")
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        correct = sum((model(images[i:i + 250]).argmax(-1) == labels[i:i + 250]).sum().item()
                      for i in range(0, 1000, 250))
    assert abs(100 * correct / 1000 - json.loads(sidecar.read_text())["test_top1_first1000"]) <= 0.1


def test_cli_pretrained_flag_loads_the_shipped_weights():
    import argparse

    from vimerge.cli import add_model_args, add_reduction_args, build_model
    from vimerge.models.checkpoint import read_state_dict
    p = argparse.ArgumentParser()
    add_model_args(p)
    add_reduction_args(p)
    model = build_model(p.parse_args(["--model", "vim_fmnist", "--pretrained", "--r", "4"]))
    shipped = read_state_dict(FMNIST_WEIGHTS)
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    assert model.reduction is not None and model.reduction.r == 4
