"""How far token reduction moves a trained Vim's class-token features, at equal token budgets.

For STM final ratios (STM's own setting) 0.15, 0.2, 0.3 and 0.4 the script compares, training-free:

* prune    -- R-MeeTo's bipartite selection, selected tokens dropped,
* rmeeto   -- R-MeeTo merging (size-weighted average),
* bnnm     -- STM's bidirectional nearest-neighbour merging, plain average (hsp=False),
* bnnm+hsp -- STM with hidden-state-protection weights (the default collapse),
* bnnm+hsp(decay) -- HSP with the "decay" collapse (B and C ignored), a variant,
* bnnm-drop -- a control: the tokens BNNM would merge are dropped instead (pruning at BNNM's
  positions), which separates the effect of the positions from that of the merge weights,

each at the same mean-token ratio as the STM setting as nearly as R-MeeTo's r allows
(``vimerge.r_for_ratio`` of the STM mean-token ratio). Columns: the mean-token ratio actually
used, the mean relative error ||f_red - f_full|| / ||f_full|| of the class token's final
features (after norm_f) over the evaluation images, and top-1 accuracy on them.

Without ``--checkpoint`` a small Vim is trained on Fashion-MNIST first (28x28, patch 4,
49 patches + class token = 50 tokens, depth 8, width 96) with AdamW on one thread and saved to
``--save``. Fashion-MNIST: ``apt-get install -y dataset-fashion-mnist`` (IDX files under
/usr/share/datasets/fashion-mnist/).

    python benchmarks/stm_error.py --save /tmp/vim_fmnist.pt        # train (~8 min) + table
    python benchmarks/stm_error.py --checkpoint /tmp/vim_fmnist.pt  # table only
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import struct
import time

import torch
import torch.nn.functional as F

import vimerge
from vimerge.reduce.stm import STM, default_per_side
from vimerge.tokens import MergePlan, merge_state

MEAN, STD = 0.2860, 0.3530
MODEL = dict(img_size=28, patch_size=4, stride=4, in_chans=1, depth=8, embed_dim=96, num_classes=10)


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (optionally .gz) as a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    def find(stem: str) -> str:
        for name in (stem, stem + ".gz"):
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
        raise FileNotFoundError(f"{stem}[.gz] not in {root}; apt-get install -y dataset-fashion-mnist")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find(f"{prefix}-images-idx3-ubyte")).float().div_(255).sub_(MEAN).div_(STD)
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte")).long()
    return images.unsqueeze(1), labels


class BNNMDrop(STM):
    """Control: BNNM's positions and order, the removed tokens dropped (slot -1) instead of merged."""

    def reduce(self, state, model):
        step = self._steps[state.layer]
        if step is None:
            return state
        plan = step.plan(state.hidden.shape[0], state.hidden.device)
        slot = plan.slot.clone()
        slot[:, list(step.removed)] = -1
        return merge_state(state, MergePlan(slot, plan.num_out, plan.cls_index))


def train(model, images, labels, steps: int, batch: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if n not in model.no_weight_decay()]
    rest = [p for n, p in model.named_parameters() if n in model.no_weight_decay()]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item())))
    model.train()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = images[idx]
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()   # light augmentation
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step == 0:
            print(f"  step {step + 1}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.eval()


@torch.no_grad()
def features(model, images, batch: int = 500) -> torch.Tensor:
    return torch.cat([model.forward_features(images[i:i + batch]) for i in range(0, images.shape[0], batch)])


def row(name: str, ratio: float, feats: torch.Tensor, full: torch.Tensor, model, labels) -> str:
    err = ((feats - full).norm(dim=-1) / full.norm(dim=-1)).mean().item()
    acc = (model.head(feats).argmax(-1) == labels).float().mean().item() * 100
    return f"| {name} | {ratio:.3f} | {err:.4f} | {acc:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="weights of the model in MODEL (skips training)")
    ap.add_argument("--save", default="vim_fmnist.pt", help="where to save the trained weights")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--steps", type=int, default=800, help="training steps (batch --batch)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--images", type=int, default=2000, help="test images for the table")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.15, 0.2, 0.3, 0.4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    test_x, test_y = load_split(args.data, "test")
    model = vimerge.create_model("vim_tiny", **MODEL)
    if args.checkpoint:
        vimerge.load_checkpoint(model, args.checkpoint)
        print(f"loaded {args.checkpoint}")
    else:
        train_x, train_y = load_split(args.data, "train")
        print(f"training {args.steps} steps x {args.batch} images on {args.threads} thread(s)")
        train(model, train_x, train_y, args.steps, args.batch, args.lr, args.seed)
        vimerge.save_checkpoint(model, args.save)
        print(f"saved {args.save}")
    model.eval()
    full_all = features(model, test_x)
    acc = (model.head(full_all).argmax(-1) == test_y).float().mean().item() * 100
    print(f"test accuracy (10000 images, unreduced): {acc:.2f}%")

    x, y = test_x[:args.images], test_y[:args.images]
    full = full_all[:args.images]
    n, depth = model.num_patches + 1, len(model.layers)
    print(f"\n{args.images} test images, {n} tokens, {depth} blocks; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| method | mean-token ratio | rel. error of cls features | top-1 % |")
    print("|---|---|---|---|")
    print(row("unreduced", 0.0, full, full, model, y))
    for ratio in args.ratios:
        stm = STM(final_ratio=ratio)      # STM's own setting: the share of tokens gone at the end
        target = stm.reduction_ratio(n, depth)
        r = vimerge.r_for_ratio(target, n, depth)
        rm_ratio = vimerge.reduction_ratio(r, n, depth)
        print(f"| **STM final_ratio {ratio}** (per side {stm.per_side or default_per_side(ratio)}, "
              f"{stm.token_counts(n, depth)[-1]} tokens at the end; R-MeeTo r={r}) | | | |")
        for name, method, opts, mt in (("prune", "prune", dict(r=r), rm_ratio),
                                       ("rmeeto", "rmeeto", dict(r=r), rm_ratio),
                                       ("bnnm", "stm", dict(final_ratio=ratio, hsp=False), target),
                                       ("bnnm+hsp", "stm", dict(final_ratio=ratio), target),
                                       ("bnnm+hsp(decay)", "stm", dict(final_ratio=ratio, collapse="decay"), target),
                                       ("bnnm-drop", BNNMDrop(final_ratio=ratio, hsp=False), {}, target)):
            vimerge.apply(model, method, **opts)
            print(row(name, mt, features(model, x), full, model, y), flush=True)
            vimerge.remove(model)
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
