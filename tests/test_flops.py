"""FLOPs, pinned to the R-MeeTo paper's Table 2 and to hand-computed values."""

import pytest

import vimerge
from vimerge.measure import count_flops


@pytest.mark.parametrize("name,r,base,reduced", [("vim_tiny", 5, 1.45, 1.28), ("vim_small", 11, 5.08, 3.58),
                                                  ("vim_base", 11, 18.87, 13.21)])
def test_paper_convention_reproduces_table_2(name, r, base, reduced):
    model = vimerge.create_model(name)
    assert round(count_flops(model) / 1e9, 2) == base
    vimerge.apply(model, "rmeeto", r=r)
    assert round(count_flops(model) / 1e9, 2) == reduced


def _tiny():
    # C = 8, d_inner 16, n = 4, R = ceil(8 / 16) = 1, 2x2 grid of 4x4 patches -> 5 tokens, 1 block
    return vimerge.create_model("vim_tiny", depth=1, embed_dim=8, d_state=4, img_size=8, patch_size=4,
                                stride=4, in_chans=1, num_classes=3)


def test_paper_convention_by_hand():
    N, C, di, n, R = 5, 8, 16, 4, 1
    block = (N * C * 4 * C + N * di * C + (N + 3) * di * 4 + N * di * (R + 2 * n) + N * R * di
             + 9 * N * di * n + 2 * N * di)
    expected = block + N * C * 16 + C * 3
    # in_proj 1280, out_proj 640, conv 512, x_proj 720, dt_proj 80, scan 2880 + 160, patches 640, head 24
    assert count_flops(_tiny()) == expected == 6936


def test_full_convention_by_hand():
    N, C, di, n, R = 5, 8, 16, 4, 1
    direction = (2 * N * di * 4 + N * di + 4 * N * di + 2 * N * di * (R + 2 * n) + 2 * N * R * di
                 + 3 * N * di + N * di + 2 * N * di * n + 3 * N * di * n + 2 * N * di * n
                 + 2 * N * di + 5 * N * di)
    block = 2 * N * C * 4 * C + 2 * N * di * C + 2 * direction + 2 * N * di + 4 * N * C + N * C
    expected = block + 2 * N * C * 16 + 2 * C * 3 + N * C + 4 * C
    assert count_flops(_tiny(), "full") == expected


def test_merge_cost_and_schedule_by_hand():
    # 65 tokens, 4 blocks, r = 8 at block 2: counts 65, 65, 57, 57; merge cost at block 2
    model = vimerge.create_model("vim_tiny", depth=4, embed_dim=8, d_state=4, img_size=32, patch_size=4,
                                 stride=4, in_chans=1, num_classes=3)
    full = count_flops(model)
    vimerge.apply(model, "rmeeto", r=8)
    C, di, n, R = 8, 16, 4, 1

    def block(N):
        return (N * C * 4 * C + N * di * C + (N + 3) * di * 4 + N * di * (R + 2 * n) + N * R * di
                + 9 * N * di * n + 2 * N * di)

    merge = 6 * 65 * C + 2 * C * (65 / 2) ** 2 + 8 * C
    assert count_flops(model) == pytest.approx(full - 2 * block(65) + 2 * block(57) + merge)


def test_bad_convention():
    with pytest.raises(ValueError, match="unknown FLOPs convention"):
        count_flops(_tiny(), "hardware")
