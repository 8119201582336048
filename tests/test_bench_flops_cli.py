"""`vimerge flops` and the throughput benchmark on a tiny model (no timing assertions)."""

import json
import subprocess
import sys

import pytest

import vimerge
from vimerge.cli import build_parser, main
from vimerge.measure import count_flops

TINY = ["--model", "vim_tiny", "--set", "depth=4", "--set", "embed_dim=16", "--img-size", "32",
        "--set", "patch_size=4", "--set", "stride=4", "--num-classes", "3"]


def test_flops_command_matches_count_flops(capsys):
    assert main(["flops", *TINY, "--r", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = vimerge.create_model("vim_tiny", depth=4, embed_dim=16, img_size=32, patch_size=4, stride=4,
                                 num_classes=3)
    vimerge.apply(model, "rmeeto", r=8)
    assert out["gflops_paper"] * 1e9 == pytest.approx(count_flops(model, "paper"), rel=1e-12)
    assert out["gflops_full"] * 1e9 == pytest.approx(count_flops(model, "full"), rel=1e-12)
    assert out["token_counts"] == [65, 65, 57, 57]
    assert abs(out["reduction_ratio"] - (1 - (65 * 2 + 57 * 2) / (4 * 65))) < 1e-12


def test_bench_rows(capsys):
    args = build_parser().parse_args(["bench", *TINY, "--ratios", "0,0.1", "--batch-size", "2", "--repeats", "2",
                                      "--json", "--method", "prune"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["none", "prune"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["token_ratio"] == 0.0
    assert rows[1]["gflops_paper"] < rows[0]["gflops_paper"]
    assert 0.05 < rows[1]["token_ratio"] < 0.15
    for r in rows:
        assert r["img_s"] > 0 and r["img_s_min"] <= r["img_s"] <= r["img_s_max"]
        assert 0.0 <= r["reduce_share"] < 1.0


def test_bench_command_prints_a_table(capsys):
    assert main(["bench", *TINY, "--ratios", "0,0.1", "--batch-size", "1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| ratio |") and len(lines) == 5
    assert lines[3].startswith("| 0.00 |") and "1.00x" in lines[3]


def test_bench_peak_memory_does_not_depend_on_row_order():
    """A fresh process (one-time costs not paid yet): the same row measured first and last has
    about the same peak (before: the first row's peak held the warm-up's kernel compilation,
    114 vs 40 MB)."""
    proc = subprocess.run([sys.executable, "-m", "vimerge", "bench", "--model", "vim_fmnist", "--ratios", "0.5,0,0.5",
                           "--batch-size", "32", "--repeats", "2", "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peaks = [r["peak_mb"] for r in json.loads(proc.stdout)]
    if None in peaks:
        pytest.skip("no resident-set high-water mark to reset here")
    assert abs(peaks[0] - peaks[2]) <= max(10.0, 0.3 * peaks[2]), peaks


def test_gflops_are_printed_with_significant_digits(capsys):
    """vim_fmnist costs 0.037 GFLOPs: printed as 0.03711, not 0.03 or 0.04."""
    assert main(["flops", "--model", "vim_fmnist"]) == 0
    assert "0.03711 GFLOPs (paper convention)" in capsys.readouterr().out
