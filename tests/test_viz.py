"""Merged-token pictures: group maps from source tracking, drawing, the visualize command."""

import torch
from PIL import Image

import vimerge
from vimerge.cli import main
from vimerge.viz import draw_groups, figure, token_groups


def small_model():
    return vimerge.create_model("vim_fmnist", depth=4, embed_dim=16).eval()


def test_unreduced_groups_are_the_patches_in_order():
    model = small_model()
    groups = token_groups(model, torch.randn(2, 1, 28, 28))
    assert groups.shape == (2, 7, 7)
    # patch p is token p before the class token (index 24) and p + 1 after it
    expected = torch.tensor([p if p < 24 else p + 1 for p in range(49)]).view(7, 7)
    assert torch.equal(groups[0], expected) and torch.equal(groups[1], expected)


def test_reduced_groups_match_token_sizes():
    model = small_model()
    vimerge.apply(model, "rmeeto", r=6)
    images = torch.randn(3, 1, 28, 28)
    groups = token_groups(model, images)
    with torch.no_grad():
        state = model.forward_tokens(images, track_source=True)
    for b in range(3):
        ids, counts = groups[b].flatten().unique(return_counts=True)
        assert len(ids) == state.num_tokens - 1 == 50 - 6 - 1      # depth 4: block 2 reduces
        assert state.cls_index not in ids.tolist()
        sizes = state.size[b, ids, 0]
        assert torch.equal(sizes, counts.float())     # a token's size = the patches it holds


def test_draw_groups_paints_and_outlines():
    img = Image.new("L", (28, 28), 128)
    same = draw_groups(img, torch.zeros(2, 2, dtype=torch.long), cell=10)
    assert same.size == (20, 20)
    assert len(same.getcolors()) == 1                        # one group: no outline, one colour
    split = draw_groups(img, torch.tensor([[0, 1], [0, 1]]), cell=10)
    assert split.getpixel((10, 5)) == (20, 20, 20)             # the border between the two groups
    assert split.getpixel((3, 3)) != split.getpixel((16, 3))   # two colours
    sheet = figure([[same, split], [split, same]], ["a", "b"])
    assert sheet.size == (2 * 26 + 6, 2 * 26 + 6 + 14)


def test_visualize_command(tmp_path, capsys):
    model = small_model()
    ckpt = tmp_path / "m.pth"
    vimerge.save_checkpoint(model, ckpt)
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(28, 28) * 255).byte().numpy()).save(img)
    out = tmp_path / "vis.png"
    base = ["visualize", "--model", "vim_fmnist", "--set", "depth=4", "--set", "embed_dim=16",
            "--checkpoint", str(ckpt), "--r", "6", "--out", str(out)]
    assert main(base + ["--image", str(img), str(img)]) == 0
    assert "49 patches -> 44 tokens" in capsys.readouterr().out
    sheet = Image.open(out)
    assert sheet.size == (2 * (168 + 6) + 6, 2 * (168 + 6) + 6 + 14)
    assert main(base + ["--image", str(tmp_path / "missing.png")]) == 2      # one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("vimerge visualize: error: cannot read image") and "missing.png" in err
