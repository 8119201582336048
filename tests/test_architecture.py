"""The package's shape, enforced: layered imports without cycles, and contract tests driven by the
registries (every model x every method x every scan backend), including a toy method added in
one module (tests/toy_method.py) that works everywhere without an edit elsewhere."""

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

import toy_method  # noqa: F401  (registers "keepfirst" the way a user's module would)
import vimerge
from conftest import write_fashion_idx
from vimerge.cli import main
from vimerge.measure.flops import reduction_flops
from vimerge.models import get_preset, list_models, model_defaults
from vimerge.ops import available_backends
from vimerge.reduce import build, list_methods, parse_spec, spec_of, unsupported_reason
from vimerge.tokens import (
    SITES,
    TokenModel,
    input_shape,
    protected_positions,
    ratio_from_counts,
    token_frames,
)

PACKAGE = Path(vimerge.__file__).resolve().parent

# lowest first; a module may import its own layer or lower ones (models and reduce: not each other)
LAYERS = {
    "vimerge._version": 0, "vimerge.tokens": 0, "vimerge.ops": 0,
    "vimerge.models": 1, "vimerge.reduce": 1,
    "vimerge.data": 2, "vimerge.measure": 2, "vimerge.viz": 2, "vimerge.factory": 2,
    "vimerge.train": 3,
    "vimerge.demo": 4,
    "vimerge": 5,                       # the package __init__: the public API
    "vimerge.cli": 6, "vimerge.__main__": 6,
}
APART = ({"vimerge.models", "vimerge.reduce"},)


def module_name(path: Path) -> str:
    parts = ("vimerge",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported vimerge module, at function level) for every import in the file, except those
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def resolve(node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, in_function) for a in node.names if a.name.split(".")[0] == "vimerge")
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node)
            if target.split(".")[0] == "vimerge":
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
                found.extend((t, in_function) for t in (subs or [target]))
                if subs and len(subs) < len(node.names):
                    found.append((target, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def layer_of(name: str) -> tuple[str, int]:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return best, LAYERS[best]


def graph() -> dict[str, list[tuple[str, bool]]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    assert all(layer_of(name) for name in modules())


def test_imports_point_down_and_nothing_imports_the_command_line():
    upward = []
    for src, targets in graph().items():
        group_s, rank_s = layer_of(src)
        for target, _ in targets:
            group_t, rank_t = layer_of(target)
            if rank_t > rank_s or any({group_s, group_t} == pair for pair in APART):
                upward.append(f"{src} -> {target}")
    assert upward == []


def test_no_import_cycles():
    edges = {src: {t for t, _ in targets if t != src} for src, targets in graph().items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(edges):
        if v not in index:
            connect(v)
    assert cycles == []


def test_the_package_imports_its_own_modules_at_the_top():
    lazy = [f"{src} -> {t}" for src, targets in graph().items() for t, inner in targets if inner]
    assert lazy == []


def test_the_graph_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "vimerge"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "__init__.py").write_text("")
    mod = pkg / "models" / "x.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import main\n"
                   "def f():\n    from ..reduce import apply\n    from . import y\n")
    found = imports("vimerge.models.x", mod, {"vimerge.models.y"})
    assert found == [("vimerge.reduce", True), ("vimerge.models.y", True)]


def test_backbones_import_parts_never_another_backbone():
    """docs/architecture.md, rule B1: a backbone file takes its parts from models/layers.py and the
    Mamba trunk models/mamba.py (and checkpoint/registry), never from another backbone file."""
    parts = {"vimerge.models.layers", "vimerge.models.mamba", "vimerge.models.checkpoint", "vimerge.models.registry"}
    backbones = {get_preset(n).builder.__module__ for n in list_models()}
    assert {"vimerge.models.vim", "vimerge.models.videomamba", "vimerge.models.deit",
            "vimerge.models.mambar"} <= backbones
    found = graph()
    crossing = [f"{b} -> {t}" for b in backbones for t, _ in found[b]
                if t.startswith("vimerge.models.") and t not in parts]
    assert crossing == [], "rule B1 (a backbone imports parts, never another backbone) broken"
    for part in parts:       # the parts know no backbone
        assert not [t for t, _ in found[part] if t in backbones], f"rule B1: {part} imports a backbone"


# ------------------------------------------------------------------------------- contract tests

METHOD_SPECS = {name: f"{name}:ratio=0.25" for name in list_methods()}

# Preset options that only change sizes: at :func:`small_kwargs`'s depth and resolution, presets
# differing in these alone run the same code paths (deit3_small / _base / _large / *_384).
SIZE_OPTIONS = {"embed_dim", "depth", "num_heads", "img_size", "num_classes", "num_registers", "cls_reduce"}


def variants() -> list[str]:
    """One preset per architecture variant (builder class and every non-size option), the
    narrowest: the method contracts run on each (the model contracts run on every preset)."""
    chosen: dict[tuple, str] = {}
    for name in list_models():
        preset = get_preset(name)
        key = (preset.builder, tuple(sorted((k, v) for k, v in preset.defaults.items() if k not in SIZE_OPTIONS)))
        width = preset.defaults.get("embed_dim", 0)
        if key not in chosen or width < get_preset(chosen[key]).defaults.get("embed_dim", 0):
            chosen[key] = name
    return sorted(chosen.values())


def test_variants_cover_every_builder_and_video():
    """The method contracts' presets include every backbone class, the video presets, the
    registers and the Fashion-MNIST models (one channel), and drop only same-shape duplicates."""
    names = variants()
    assert {get_preset(n).builder for n in names} == {get_preset(n).builder for n in list_models()}
    assert {"vim_tiny", "vim_fmnist", "deit_tiny", "deit3_small", "mambar_tiny", "videomamba_tiny",
            "videomamba_tiny_k400", "videomamba_fmnist_video"} <= set(names)
    assert not {"deit3_large_384", "vim_base", "mambar_large"} & set(names)


def small_kwargs(name: str) -> dict:
    """Reduced depth and resolution (an 8x8 patch grid, 6 blocks; video presets: 2 frames)."""
    d = model_defaults(name)
    frames = {"num_frames": 2 * d.get("tubelet_size", 1)} if d.get("num_frames") else {}
    return dict(depth=6, img_size=8 * d.get("patch_size", 16), **frames)


def small(name: str) -> torch.nn.Module:
    """A registered preset at reduced depth and resolution (:func:`small_kwargs`)."""
    return vimerge.create_model(name, **small_kwargs(name)).eval()


def images_for(model, batch: int = 2) -> torch.Tensor:
    """Random inputs of the model's shape: images (B, C, H, W) or clips (B, C, T, H, W)."""
    return torch.randn(input_shape(model, batch))


def mixer_lengths(model, x) -> list[int]:
    """Tokens the modules right after each block's reduction see: a Mamba block's mixer
    (``reduction_site == "before_mixer"``), a Transformer block's MLP (``"after_attention"``)."""
    seen = []
    after = ([b.mixer for b in model.layers] if model.reduction_site == "before_mixer"
             else [b.mlp for b in model.blocks])
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for m in after]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name, tmp_path):
    model = small(name)
    x = images_for(model)
    with torch.no_grad():
        out = model(x)
        state = model.forward_tokens(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    assert model.num_tokens == state.num_tokens          # (rule B8: test_backbone_rules)
    assert mixer_lengths(model, x) == vimerge.token_counts(model) == [model.num_tokens] * model.depth
    assert vimerge.count_flops(model) == model.flops([model.num_tokens] * model.depth)
    path = vimerge.save_checkpoint(model, tmp_path / "w.pth")
    again = vimerge.create_model(name, **small_kwargs(name), checkpoint=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), out)


def broken(rule: str, ok: bool, detail: str = "") -> list[str]:
    return [] if ok else [f"rule {rule}{': ' + detail if detail else ''}"]


@pytest.mark.parametrize("name", list_models())
def test_backbone_rules(name):
    """The rules of docs/architecture.md ("What a backbone must offer"), each failure naming its rule."""
    model = vimerge.create_model(name, **small_kwargs(name), scan_backend="reference").eval()
    errors = broken("B2 (accepts scan_backend and reports it)", getattr(model, "scan_backend", None) in
                    ("reference", None) and "scan_backend" in inspect.signature(type(model)).parameters)
    errors += broken("B3 (TokenModel attributes)", isinstance(model, TokenModel))
    errors += broken("B4 (reduction_site is one of tokens.SITES)", model.reduction_site in SITES)
    site = model.reduction_site
    hooks = (all(hasattr(b, "mixer") for b in getattr(model, "layers", [])) and len(model.layers) == model.depth
             if site == "before_mixer" else
             all(hasattr(b, "mlp") for b in getattr(model, "blocks", [])) and len(model.blocks) == model.depth)
    errors += broken("B5 (layers[i].mixer before_mixer / blocks[i].mlp after_attention, one per block)", hooks)
    frames = getattr(model, "num_frames", None)
    errors += broken("B6 (video: num_frames and token_frames; image: num_frames None or absent)",
                     frames is None or (isinstance(frames, int) and token_frames(model) >= 1),
                     f"num_frames={frames!r}")
    kept = protected_positions(model)
    errors += broken("B7 (protected: sorted positions within num_tokens, cls_index among them)",
                     list(kept) == sorted(set(kept)) and model.cls_index in kept and 0 <= kept[0]
                     and kept[-1] < model.num_tokens, f"{kept}")
    errors += broken("B8 (num_tokens = patches of every frame + protected tokens)",
                     model.num_tokens == token_frames(model) * model.grid_size[0] * model.grid_size[1] + len(kept))
    both = [model.flops([model.num_tokens] * model.depth, c) for c in ("paper", "full")]
    errors += broken("B9 (flops(counts, convention) in both conventions, full > paper > 0)", 0 < both[0] < both[1])
    names = {n for n, _ in model.named_parameters()}
    errors += broken("B10 (no_weight_decay names parameters)", set(model.no_weight_decay()) <= names)
    errors += broken("B11 (checkpoint_filter and checkpoint_hint)",
                     callable(getattr(model, "checkpoint_filter", None)) and
                     callable(getattr(model, "checkpoint_hint", None)))
    errors += broken("B12 (forward_tokens(x, track_source) gives the TokenState)",
                     model.forward_tokens(images_for(model), track_source=True).source is not None)
    assert errors == []


def refused(model, method: str) -> bool:
    """Whether ``method`` is not defined on ``model`` (rule M2: its ``unsupported`` reason); if so,
    ``vimerge.apply`` must refuse it with a ValueError carrying that reason, and leave the model
    unreduced."""
    reason = unsupported_reason(build(method), model)
    if reason is None:
        return False
    assert len(reason) > 40 and method in reason, f"rule M2: {method}'s refusal must name itself and the reason"
    with pytest.raises(ValueError) as err:
        vimerge.apply(model, METHOD_SPECS[method])
    assert str(err.value) == reason and model.reduction is None
    return True


@pytest.mark.parametrize("method", list(METHOD_SPECS))
@pytest.mark.parametrize("name", variants())
def test_no_method_merges_or_drops_a_protected_token(name, method):
    """Rule M1 (docs/architecture.md): every method keeps the class token and the registers, each
    alone in a slot of its own, in order; the head reads them where they went."""
    model = small(name)
    if refused(model, method):
        return
    vimerge.apply(model, METHOD_SPECS[method])
    x = images_for(model)
    with torch.no_grad():
        state = model.forward_tokens(x, track_source=True)
    start = protected_positions(model)
    assert len(state.kept) == len(start), "rule M1: a protected token was merged or dropped"
    assert state.cls_index in state.kept and list(state.kept) == sorted(state.kept)
    alone = torch.nn.functional.one_hot(torch.tensor(start), model.num_tokens).to(state.source.dtype)
    assert torch.equal(state.source[:, list(state.kept)], alone.expand(x.shape[0], -1, -1)), \
        "rule M1: a protected token absorbed another token"


@pytest.mark.parametrize("method", list(METHOD_SPECS))
@pytest.mark.parametrize("name", variants())
def test_method_contract(name, method):
    model = small(name)
    if refused(model, method):
        return
    x = images_for(model)
    with torch.no_grad():
        before = model(x)
    reducer = vimerge.apply(model, METHOD_SPECS[method])
    counts = vimerge.token_counts(model)
    assert mixer_lengths(model, x) == counts                        # what the mixers really see
    assert abs(ratio_from_counts(counts, model.num_tokens) - 0.25) <= 0.03  # ratio: one meaning
    # FLOPs: the backbone at these counts (additive over blocks) plus the method's own cost
    own = reduction_flops(model, counts, "paper")      # reducer.flops (+ the site where it asks)
    assert own >= 0
    assert vimerge.count_flops(model) == pytest.approx(model.flops(counts) + own, rel=1e-12)
    if model.reduction_site == "before_mixer":      # a Mamba block's cost depends on its own count only
        base = model.flops([])
        assert model.flops(counts) == pytest.approx(base + sum(model.flops([c]) - base for c in counts), rel=1e-12)
    assert vimerge.count_flops(model) < model.flops([model.num_tokens] * model.depth)
    # the spec round-trips, and a reducer built from it gives the same outputs
    assert parse_spec(spec_of(reducer))[0] == method
    with torch.no_grad():
        reduced = model(x)
        vimerge.apply(model, spec_of(reducer))
        assert torch.equal(model(x), reduced)
        vimerge.remove(model)
        assert torch.equal(model(x), before)                        # remove restores bit for bit
    # gradients reach every parameter through the reduced model
    model.train()
    vimerge.apply(model, METHOD_SPECS[method])
    model(x).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "reference"])
def test_scan_backends_run_the_model_like_the_reference(backend, tiny_model):
    model = tiny_model(depth=2)
    x = torch.randn(2, 3, 32, 32)
    vimerge.apply(model, "rmeeto:r=8")
    with torch.no_grad():
        model.scan_backend = "reference"
        ref = model(x)
        model.scan_backend = backend
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- the toy method


def test_a_method_in_one_module_works_everywhere(tiny_model, tmp_path, capsys):
    assert "keepfirst" in vimerge.list_methods()
    model = tiny_model()                                   # 65 tokens, class token at 32, 6 blocks
    reducer = vimerge.apply(model, "keepfirst:k=10")
    assert vimerge.token_counts(model) == [65] + [11] * 5
    assert mixer_lengths(model, torch.randn(1, 3, 32, 32)) == [65] + [11] * 5
    assert vimerge.count_flops(model) == model.flops([65] + [11] * 5)
    assert spec_of(reducer) == "keepfirst:k=10" and parse_spec("keepfirst:ratio=0.5") == ("keepfirst", {"ratio": 0.5})
    vimerge.apply(model, "keepfirst", ratio=0.5)          # 1 - (65 + 5 (k + 1)) / 390 = 0.5 -> k = 25
    assert vimerge.token_counts(model) == [65] + [26] * 5
    # the command line knows it without an edit: --reduce, --sweep and its own shorthand flag --k
    ckpt = vimerge.save_checkpoint(vimerge.create_model("vim_fmnist", depth=2, embed_dim=16), tmp_path / "m.pth")
    write_fashion_idx(tmp_path, 12)
    common = ["eval", "--model", "vim_fmnist", "--set", "depth=2", "--set", "embed_dim=16", "--checkpoint",
              str(ckpt), "--data", str(tmp_path), "--no-progress", "--json"]
    # vim_fmnist: 50 tokens, class token at 24; two blocks: 1 - (50 + kept) / 100 = 0.25 -> 25 kept (k = 24)
    assert main([*common, "--reduce", "keepfirst:ratio=0.25"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["reduce"] == "keepfirst:ratio=0.25" and row["token_counts"] == [50, 25]
    assert row["images"] == 12 and row["reduction_ratio"] == pytest.approx(0.25)
    assert main([*common, "--method", "keepfirst", "--k", "9"]) == 0
    assert json.loads(capsys.readouterr().out)["token_counts"] == [50, 10]
    assert main([*common, "--sweep", "none;keepfirst:k=3"]) == 0
    assert [r["token_counts"] for r in json.loads(capsys.readouterr().out)["rows"]] == [[50, 50], [50, 4]]
