"""Ordinary mistakes on the command line: one line on stderr naming the problem and the fix,
exit 2; Ctrl-C exit 130; a closed pipe exits quietly (issue 13, items 7, 8, 12-14)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_fashion_idx
from vimerge.cli import bench as bench_cli
from vimerge.cli import build_parser, main
from vimerge.cli import eval as eval_cli
from vimerge.cli.bench import row_specs
from vimerge.cli.common import build_model
from vimerge.measure.flops import model_cost
from vimerge.models import list_models, model_defaults
from vimerge.reduce import apply

FMNIST_SMALL = ["--model", "vim_fmnist", "--set", "depth=4", "--set", "embed_dim=16"]


def _one_line_error(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err and "\n" not in err, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ------------------------------------------------------------------------------ item 8: mistakes
@pytest.mark.parametrize("argv,needles", [
    (["flops", "--model", "vim-small"], ["unknown model 'vim-small'", "did you mean vim_small"]),
    (["flops", "--model", "vim_small", "--r", "200"], ["r <= 98"]),
    (["flops", "--model", "vim_fmnist", "--ratio", "0.9"], ["out of reach", "0.510"]),
    (["flops", "--model", "vim_fmnist", "--r", "1,2"], ["one entry per block (8)"]),
    (["flops", "--model", "vim_fmnist", "--r", "0.3"], ["--ratio"]),
    (["bench", "--model", "vim_fmnist", "--ratios", "0,abc"], ["--ratios", "'0,abc'"]),
    (["bench", "--model", "vim_fmnist", "--ratios", "0,0.9"], ["0.9", "out of reach"]),
    (["flops", "--model", "vim_fmnist", "--set", "foo=1"], ["foo", "depth", "embed_dim"]),
    (["flops", "--model", "vim_fmnist", "--set", "depth"], ["KEY=VALUE"]),
    (["eval", "--model", "vim_fmnist", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_mistakes_are_one_line(capsys, argv, needles):
    _one_line_error(capsys, argv, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("verb", ["bench", "eval"])
def test_cuda_without_cuda_names_the_fix(capsys, verb):
    _one_line_error(capsys, [verb, "--model", "vim_fmnist", "--device", "cuda"], "CUDA", "--device cpu")


def test_unreachable_bench_ratio_fails_before_any_timing(capsys, monkeypatch):
    monkeypatch.setattr(bench_cli, "measure", lambda *a, **k: pytest.fail("timed before checking the ratios"))
    _one_line_error(capsys, ["bench", *FMNIST_SMALL, "--ratios", "0,0.6"], "0.6")


# ------------------------------------------------------------------------------ output paths
def _eval_argv(data: Path, *extra: str) -> list[str]:
    return ["eval", *FMNIST_SMALL, "--data", str(data), "--no-progress", "--limit", "8", *extra]


@pytest.fixture
def fmnist_dir(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    write_fashion_idx(root, 8)
    return root


def test_output_under_a_file_is_refused_before_the_work(capsys, monkeypatch, tmp_path, fmnist_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --output"))
    _one_line_error(capsys, _eval_argv(fmnist_dir, "--output", str(blocker / "out.json")), "--output", "file.txt")
    img = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(img)
    _one_line_error(capsys, ["visualize", *FMNIST_SMALL, "--image", str(img), "--output", str(blocker / "v.png")],
                    "--output", "file.txt")
    _one_line_error(capsys, ["demo", "--data", str(fmnist_dir), "-o", str(blocker / "d"), "--no-progress"],
                    "--output", "file.txt")


def test_read_only_output_is_refused(capsys, monkeypatch, tmp_path, fmnist_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:      # root writes anywhere: play a read-only directory
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    else:
        ro.chmod(0o500)
    try:
        _one_line_error(capsys, _eval_argv(fmnist_dir, "--output", str(ro / "a" / "out.json")),
                        "not writable", str(ro))
        _one_line_error(capsys, ["demo", "--data", str(fmnist_dir), "-o", str(ro / "d"), "--no-progress"],
                        "not writable")
    finally:
        ro.chmod(0o700)


def test_missing_parents_of_an_output_are_created(capsys, tmp_path):
    img = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(img)
    out = tmp_path / "new" / "dir" / "v.png"
    assert main(["visualize", *FMNIST_SMALL, "--r", "4", "--image", str(img), "-o", str(out)]) == 0
    assert out.is_file()
    legacy = tmp_path / "legacy.png"         # --out stays as an alias of --output
    assert main(["visualize", *FMNIST_SMALL, "--image", str(img), "--out", str(legacy)]) == 0
    assert legacy.is_file()
    assert "--out " not in build_parser()._subparsers._group_actions[0].choices["visualize"].format_help()


# ------------------------------------------------------------------------------ Ctrl-C, pipes
def test_ctrl_c_in_eval_and_bench_is_one_line_exit_130(capsys, monkeypatch, fmnist_dir):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "evaluate", interrupt)
    monkeypatch.setattr(bench_cli, "measure", interrupt)
    for argv in (_eval_argv(fmnist_dir), ["bench", *FMNIST_SMALL, "--ratios", "0,0.1", "--repeats", "1"]):
        assert main(argv) == 130
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"vimerge {argv[0]}: interrupted") and "\n" not in err


def test_closed_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)                         # `vimerge ... --json | head` once head has gone
    try:
        proc = subprocess.run([sys.executable, "-m", "vimerge", "info", "--json"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


# ------------------------------------------------------------------------------ item 7: bench defaults
@pytest.mark.parametrize("name", list_models())
def test_default_bench_rows_fit_every_preset(name, monkeypatch):
    """The default --ratios of every registered preset are reachable (no timing)."""
    args = build_parser().parse_args(["bench", "--model", name])
    cfg = model_defaults(name)
    depth = cfg.get("depth", 24)
    model = build_model(args, "none")
    specs = row_specs(args, model)
    assert specs[0] == "none" and len(specs) >= 4
    for spec in specs:
        apply(model, spec)
        cost = model_cost(model)
        assert len(cost["token_counts"]) == depth


def test_default_bench_ratios_note_what_they_leave_out(capsys):
    args = build_parser().parse_args(["bench", "--model", "vim_fmnist"])
    model = build_model(args, "none")
    specs = row_specs(args, model)
    assert all("0.54" not in s for s in specs) and "rmeeto:ratio=0.42" in specs
    assert "0.54" in capsys.readouterr().err


def test_bench_table_gflops_significant_digits(capsys):
    assert main(["bench", *FMNIST_SMALL, "--ratios", "0", "--repeats", "1", "--batch-size", "1"]) == 0
    row = capsys.readouterr().out.splitlines()[3]
    gflops = row.split("|")[3].strip()
    assert gflops != "0.00" and len(gflops.replace("0.", "").lstrip("0")) >= 3, row


# ------------------------------------------------------------------------------ item 14: consistency
def _subparser(verb: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[verb]


@pytest.mark.parametrize("verb", ["eval", "bench", "flops", "visualize", "info", "demo"])
def test_help_shows_every_default(verb):
    for action in _subparser(verb)._actions:
        if action.help in (None, argparse.SUPPRESS) or action.default in (None, False, argparse.SUPPRESS):
            continue
        assert "default" in _subparser(verb)._get_formatter()._expand_help(action), action.option_strings


def test_mean_std_take_the_same_comma_list_in_eval_and_visualize():
    for verb in ("eval", "visualize"):
        args = _subparser(verb).parse_args(["--image", "x.png"] * (verb == "visualize") +
                                           ["--mean", "0.1,0.2,0.3", "--std", "0.5"])
        assert tuple(args.mean) == (0.1, 0.2, 0.3) and tuple(args.std) == (0.5,)


def test_output_is_output_everywhere():
    for verb in ("eval", "visualize", "demo"):
        flags = {s for a in _subparser(verb)._actions for s in a.option_strings}
        assert {"--output", "-o"} <= flags, verb


# ------------------------------------------------------------------------------ item 12: eval data
def test_eval_without_data_uses_installed_fashion_mnist_for_a_fmnist_model(capsys, monkeypatch, fmnist_dir):
    monkeypatch.setattr("vimerge.data.fashion_mnist.DEFAULT_ROOT", str(fmnist_dir))
    args = build_parser().parse_args(["eval", *FMNIST_SMALL, "--no-progress", "--limit", "8", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "fashion-mnist" and out["images"] == 8


def test_eval_without_data_for_an_rgb_model_names_the_fix(capsys):
    _one_line_error(capsys, ["eval", "--model", "vim_tiny", "--set", "depth=2", "--set", "embed_dim=16"],
                    "--data DIR")


def test_eval_reads_the_val_split_of_a_dataset_root(capsys, tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "root" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (28, 28), 40 * i).save(tmp_path / "root" / split / c / f"{i}.png")
    args = ["eval", *FMNIST_SMALL, "--data", str(tmp_path / "root"), "--no-progress", "--json",
            "--mean", "0.5", "--std", "0.5"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == 2 and out["images"] == 4 and out["data"].endswith("val")


def test_retrain_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["retrain", *FMNIST_SMALL, "--device", "cuda", "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--device cpu" in err


def test_bench_takes_stm_settings_and_sets_the_amount_itself(capsys, monkeypatch):
    args = build_parser().parse_args(["bench", *FMNIST_SMALL, "--reduce", "stm:final_ratio=0.2,hsp=false",
                                      "--ratios", "0,0.2"])
    assert row_specs(args) == ["none", "stm:hsp=false,ratio=0.2"]
    assert main(["bench", *FMNIST_SMALL, "--method", "stm", "--final-ratio", "0.2", "--ratios", "0,0.2"]) == 2
    assert "drop --r/--ratio/--final-ratio" in capsys.readouterr().err


def test_pretrained_without_model_uses_the_default_model(capsys):
    main(["flops", "--pretrained"])                  # vim_tiny's hub weights: offline here, or loaded
    err = capsys.readouterr().err
    assert "model None" not in err


def test_a_flag_only_one_method_takes_implies_it(capsys):
    assert main(["flops", *FMNIST_SMALL, "--final-ratio", "0.2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reduce"] == "stm:final_ratio=0.2"
    assert main(["flops", *FMNIST_SMALL, "--ratio", "0.2", "--json"]) == 0          # the paper's method
    assert json.loads(capsys.readouterr().out)["reduce"] == "rmeeto:ratio=0.2"
    assert main(["flops", *FMNIST_SMALL, "--distance", "l1"]) == 2                 # rmeeto or prune: ambiguous
    assert "without a reduction method" in capsys.readouterr().err


def test_demo_option_mistakes_are_one_line(tmp_path, capsys):
    assert main(["demo", "--limit", "0", "-o", str(tmp_path / "d")]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["demo", "--retrain-images", "3", "-o", str(tmp_path / "d")]) == 2
    assert "vimerge demo: error: --retrain-images must be at least one batch" in capsys.readouterr().err
