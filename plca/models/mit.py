"""MiT-B0..B5, SegFormer's Mix Transformer: a four-stage hierarchical Transformer backbone.

Each stage embeds its input with an *overlapping* strided convolution (stage 1: 7x7,
stride 4, padding 3; stages 2-4: 3x3, stride 2, padding 1) followed by a LayerNorm,
runs a stack of pre-norm Transformer blocks on the tokens and ends with a LayerNorm;
the four maps have strides 4, 8, 16, 32. A block is

    x = x + drop_path(attention(norm1(x)))    efficient self-attention: the keys and values
                                              are computed from tokens spatially reduced by a
                                              sr x sr convolution of stride sr (+ LayerNorm)
    x = x + drop_path(mix_ffn(norm2(x)))      Linear -> depthwise 3x3 conv -> GELU -> Linear

with no positional embedding (the depthwise convolution gives the position). Sizes,
LayerNorm epsilons (1e-6 in the blocks and after each stage, PyTorch's 1e-5 in the patch
embeddings and the reduction), stochastic depth (linear from 0 to ``drop_path_rate`` over
all blocks) and initialisation follow NVlabs/SegFormer ``mix_transformer.py``.

ImageNet weights load from the official SegFormer / mmseg files (``mit_b5.pth``), from the
Hugging Face ``nvidia/mit-b*`` files (``.safetensors`` or ``pytorch_model.bin``) and from
files in this module's own layout (:meth:`MixTransformer.load_pretrained`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plca.models.normalization import IMAGENET_RGB, Normalization
from plca.models.registry import BackboneContract, WeightLayout, WeightsIdentity, register_backbone
from plca.models.weights import LoadReport, WeightsError, load_strict, read_state_dict

#: LayerNorm epsilon of the blocks and of the norm after each stage (the patch embeddings and
#: the spatial reduction use PyTorch's default, 1e-5).
BLOCK_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MiTSize:
    """One MiT variant: channels, blocks and attention heads per stage."""

    name: str
    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4

    def describe(self) -> str:
        return (f"MiT-{self.name.upper()} (dims {'/'.join(map(str, self.dims))}, "
                f"depths {'/'.join(map(str, self.depths))})")


_WIDE = (64, 128, 320, 512)
SIZES: dict[str, MiTSize] = {
    "b0": MiTSize("b0", (32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": MiTSize("b1", _WIDE, (2, 2, 2, 2)),
    "b2": MiTSize("b2", _WIDE, (3, 4, 6, 3)),
    "b3": MiTSize("b3", _WIDE, (3, 4, 18, 3)),
    "b4": MiTSize("b4", _WIDE, (3, 8, 27, 3)),
    "b5": MiTSize("b5", _WIDE, (3, 6, 40, 3)),
}

#: (kernel, stride, padding) of each stage's patch embedding
PATCH_EMBEDS: tuple[tuple[int, int, int], ...] = ((7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of the samples.

    Each sample of ``(B, ...)`` is kept with probability ``1 - p`` and then scaled by
    ``1 / (1 - p)``, so the expectation is unchanged; in eval mode (or ``p == 0``) the identity.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Strided convolution then LayerNorm: ``(B, C_in, H, W) -> tokens (B, h * w, C), h, w``.

    With kernel ``k``, stride ``s`` and padding ``k // 2``, ``h = floor((H + 2 (k // 2) - k) / s) + 1``
    (``ceil(H / 4)`` for the 7x7 stride-4 stem, ``ceil(H / 2)`` for the 3x3 stride-2 ones).
    """

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.conv(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from spatially reduced tokens.

    Tokens ``(B, h * w, C)`` of an ``h x w`` map in, same shape out. With ``sr_ratio > 1`` the
    keys and values are computed from the map reduced by a ``sr x sr`` convolution of stride
    ``sr`` and a LayerNorm (``floor(h / sr) * floor(w / sr)`` tokens), which divides the cost
    of attention by about ``sr ** 2``. Scores are scaled by ``1 / sqrt(C / heads)``.
    """

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not a multiple of the number of heads {heads}")
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.reduce = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.reduce_norm = nn.LayerNorm(dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        # (B, N, C) -> (B, heads, N, C / heads)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        context = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).unflatten(-1, (h, w))
            context = self.reduce_norm(self.reduce(grid).flatten(2).transpose(1, 2))
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(context))
        v = self._split_heads(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(out.transpose(1, 2).flatten(2))


class MixFFN(nn.Module):
    """Linear -> depthwise 3x3 conv -> GELU -> Linear on tokens ``(B, h * w, C)`` of an ``h x w`` map."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.fc1(x)
        x = self.dwconv(x.transpose(1, 2).unflatten(-1, (h, w))).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class MiTBlock(nn.Module):
    """Pre-norm Transformer block on tokens ``(B, h * w, C)``: attention then Mix-FFN, each residual."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, heads, sr_ratio)
        self.ffn_norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.ffn = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.attn_norm(x), h, w))
        return x + self.drop_path(self.ffn(self.ffn_norm(x), h, w))


class MiTStage(nn.Module):
    """Patch embedding, blocks, LayerNorm: ``(B, C_in, H, W) -> (B, dim, h, w)``."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int], heads: int, sr_ratio: int,
                 mlp_ratio: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.embed = OverlapPatchEmbed(in_channels, dim, *patch)
        self.blocks = nn.ModuleList(MiTBlock(dim, heads, sr_ratio, mlp_ratio, p) for p in drop_paths)
        self.norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        tokens, h, w = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return self.norm(tokens).transpose(1, 2).unflatten(-1, (h, w)).contiguous()


class MixTransformer(nn.Module):
    """MiT backbone: normalised images ``(B, 3, H, W)`` -> four maps ``(B, dims[k], ~H / s_k, ~W / s_k)``.

    ``s_k`` = 4, 8, 16, 32 (:attr:`strides`); each map is ``ceil`` of the previous one's size over
    its stride (``ceil(H / 4)``, then halved rounding up). Parameters are named
    ``stages.{k}.embed.{conv,norm}``, ``stages.{k}.blocks.{i}.{attn_norm, attn.{query,key,value,
    reduce,reduce_norm,proj}, ffn_norm, ffn.{fc1,dwconv,fc2}}`` and ``stages.{k}.norm``.
    """

    def __init__(self, size: str = "b0", drop_path_rate: float = 0.1) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"unknown MiT size {size!r}; choose one of: {', '.join(SIZES)}")
        self.size = SIZES[size]
        depths = self.size.depths
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear from 0 to the rate
        stages, in_channels, first = [], 3, 0
        for k, (dim, depth) in enumerate(zip(self.size.dims, depths)):
            stages.append(MiTStage(in_channels, dim, PATCH_EMBEDS[k], self.size.heads[k], self.size.sr_ratios[k],
                                   self.size.mlp_ratio, rates[first:first + depth]))
            in_channels, first = dim, first + depth
        self.stages = nn.ModuleList(stages)
        self.out_channels: tuple[int, ...] = self.size.dims
        self.strides: tuple[int, ...] = (4, 8, 16, 32)
        self.normalization: Normalization = IMAGENET_RGB
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs ``[(B, dims[k], h_k, w_k)]`` of normalised images ``(B, 3, H, W)``."""
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels

    def no_weight_decay(self) -> set[str]:
        """The parameters AdamW leaves undecayed: the weight and bias of every LayerNorm.

        This is DAFormer's rule for MiT: its optimiser config exempts names containing ``norm``
        (``patch_embed*.norm``, ``block*.*.norm1`` / ``norm2``, ``attn.norm``, ``norm1``-``norm4``: all
        LayerNorms, here ``embed.norm``, ``attn_norm``, ``ffn_norm``, ``attn.reduce_norm``, the stage
        ``norm``) or ``pos_block``, which names no MiT parameter: the Mix-FFN's depthwise
        convolution (``mlp.dwconv.dwconv`` there, ``ffn.dwconv`` here) is decayed like every other
        convolution, linear layer and bias.
        """
        return {f"{module_name}.{param_name}" for module_name, module in self.named_modules()
                if isinstance(module, nn.LayerNorm) for param_name, _ in module.named_parameters(recurse=False)}

    def load_pretrained(self, path: str | Path, drop_head: bool = False) -> LoadReport:
        """ImageNet weights from a local file in any layout :func:`load_mit_weights` knows, strictly.

        The ImageNet classifier is always dropped (and reported), so ``drop_head`` changes nothing.
        """
        return load_mit_weights(self, path)


def _init_weights(module: nn.Module) -> None:
    # SegFormer's initialisation; only matters when training without ImageNet weights
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- ImageNet weights

# Their names of the parts of a key below one block -> ours (the official "attn.kv" is split apart).
_OFFICIAL_BLOCK: dict[str, str] = {
    "norm1": "attn_norm", "attn.q": "attn.query", "attn.sr": "attn.reduce", "attn.norm": "attn.reduce_norm",
    "attn.proj": "attn.proj", "norm2": "ffn_norm", "mlp.fc1": "ffn.fc1", "mlp.dwconv.dwconv": "ffn.dwconv",
    "mlp.fc2": "ffn.fc2",
}
_HF_BLOCK: dict[str, str] = {
    "layer_norm_1": "attn_norm", "attention.self.query": "attn.query", "attention.self.key": "attn.key",
    "attention.self.value": "attn.value", "attention.self.sr": "attn.reduce",
    "attention.self.layer_norm": "attn.reduce_norm", "attention.output.dense": "attn.proj",
    "layer_norm_2": "ffn_norm", "mlp.dense1": "ffn.fc1", "mlp.dwconv.dwconv": "ffn.dwconv", "mlp.dense2": "ffn.fc2",
}
_HF_PREFIXES = ("segformer.encoder.", "encoder.")


def _rename_part(part: str, table: dict[str, str]) -> str | None:
    # part = "<module path>.<weight|bias>"
    module, _, tensor = part.rpartition(".")
    return f"{table[module]}.{tensor}" if module in table else None


def _from_official(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """SegFormer / mmseg ``mit_b*.pth``: ``patch_embed{1-4}``, ``block{1-4}.{i}``, ``norm{1-4}``, ``head``."""
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        if key.startswith("head."):
            ignored.append(f"{key} (ImageNet classifier)")
            continue
        match = re.fullmatch(r"patch_embed([1-4])\.(proj|norm)\.(\w+)", key)
        if match:
            stage, module, tensor = match.groups()
            out[f"stages.{int(stage) - 1}.embed.{'conv' if module == 'proj' else 'norm'}.{tensor}"] = value
            continue
        match = re.fullmatch(r"norm([1-4])\.(\w+)", key)
        if match:
            out[f"stages.{int(match[1]) - 1}.norm.{match[2]}"] = value
            continue
        match = re.fullmatch(r"block([1-4])\.(\d+)\.(.+)", key)
        if match:
            prefix = f"stages.{int(match[1]) - 1}.blocks.{match[2]}."
            part = match[3]
            if part in ("attn.kv.weight", "attn.kv.bias"):
                # keys and values stacked on the output axis, keys first
                if value.shape[0] % 2:
                    raise WeightsError(f"weights file '{path}': '{key}' has shape {tuple(value.shape)}, whose first "
                                       f"axis (keys and values stacked) is not even")
                tensor = part.rpartition(".")[2]
                out[prefix + f"attn.key.{tensor}"], out[prefix + f"attn.value.{tensor}"] = value.chunk(2, dim=0)
                continue
            renamed = _rename_part(part, _OFFICIAL_BLOCK)
            if renamed is not None:
                out[prefix + renamed] = value
                continue
        out[key] = value  # no place in the model: reported as unexpected
    return out, ignored


def _from_hf(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """Hugging Face ``nvidia/mit-b*``: ``segformer.encoder.{patch_embeddings,block,layer_norm}``, ``classifier``."""
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        if key.startswith("classifier."):
            ignored.append(f"{key} (ImageNet classifier)")
            continue
        prefix = next((p for p in _HF_PREFIXES if key.startswith(p)), None)
        rest = key[len(prefix):] if prefix else ""
        match = re.fullmatch(r"patch_embeddings\.([0-3])\.(proj|layer_norm)\.(\w+)", rest)
        if match:
            stage, module, tensor = match.groups()
            out[f"stages.{stage}.embed.{'conv' if module == 'proj' else 'norm'}.{tensor}"] = value
            continue
        match = re.fullmatch(r"layer_norm\.([0-3])\.(\w+)", rest)
        if match:
            out[f"stages.{match[1]}.norm.{match[2]}"] = value
            continue
        match = re.fullmatch(r"block\.([0-3])\.(\d+)\.(.+)", rest)
        if match:
            renamed = _rename_part(match[3], _HF_BLOCK)
            if renamed is not None:
                out[f"stages.{match[1]}.blocks.{match[2]}.{renamed}"] = value
                continue
        out[key] = value
    return out, ignored


def _from_own(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], list[str]]:
    return dict(state), []


#: layout name -> (a key that marks it, converter to our layout)
_LAYOUTS: dict[str, tuple[Callable[[str], bool], Callable[..., tuple[dict[str, Tensor], list[str]]]]] = {
    "official SegFormer / mmseg (patch_embed1.proj.weight, block1.0.attn.q.weight, norm1.weight, head.weight)": (
        lambda key: key.startswith("patch_embed1.") or re.match(r"block[1-4]\.\d+\.attn\.", key) is not None,
        _from_official),
    "Hugging Face nvidia/mit-b* (segformer.encoder.patch_embeddings.0.proj.weight, "
    "segformer.encoder.block.0.0.attention.self.query.weight, classifier.weight)": (
        lambda key: any(key.startswith(p + "patch_embeddings.") or key.startswith(p + "block.")
                        for p in _HF_PREFIXES),
        _from_hf),
    "this project's (stages.0.embed.conv.weight, stages.0.blocks.0.attn.query.weight)": (
        lambda key: key.startswith("stages."), _from_own),
}


def _find_layout(state: Mapping[str, Tensor]) -> str | None:
    for layout, (marks, _) in _LAYOUTS.items():
        if any(marks(key) for key in state):
            return layout
    return None


def _detect_layout(state: dict[str, Tensor], path: Path) -> str:
    layout = _find_layout(state)
    if layout is not None:
        return layout
    shown = ", ".join(list(state)[:6])
    hint = ""
    if any(key.startswith("backbone.patch_embed1.") for key in state):
        hint = (" It looks like a whole mmseg segmentor checkpoint (backbone.* and decode_head.*), "
                "not an ImageNet backbone file.")
    raise WeightsError(
        f"weights file '{path}' is in no MiT weights layout known here; known layouts: "
        + "; ".join(_LAYOUTS) + f". Its first keys are: {shown}.{hint}"
    )


def _architecture(state: dict[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(dims, depths) of a state dict in our layout, or None where the file lacks the keys to tell."""
    dims, depths = [], []
    for k in range(4):
        embed = state.get(f"stages.{k}.embed.conv.weight")
        if embed is None or embed.dim() != 4:
            return None
        dims.append(int(embed.shape[0]))
        blocks = {int(m[1]) for key in state if (m := re.match(rf"stages\.{k}\.blocks\.(\d+)\.", key))}
        depths.append(max(blocks) + 1 if blocks else 0)
    return tuple(dims), tuple(depths)


def _check_size(backbone: MixTransformer, state: dict[str, Tensor], path: Path) -> None:
    found = _architecture(state)
    ours = backbone.size
    if found is None or found == (ours.dims, ours.depths):
        return  # a file too incomplete to tell is left to the strict key check
    dims, depths = found
    sizes = [size for size in SIZES.values() if (size.dims, size.depths) == found]
    what = (f"weights of {sizes[0].describe()}" if sizes else
            f"weights of no MiT size known here (dims {'/'.join(map(str, dims))}, "
            f"depths {'/'.join(map(str, depths))})")
    raise WeightsError(f"weights file '{path}' holds {what}; this backbone is {ours.describe()}")


@dataclass(frozen=True)
class MiTWeightsInfo:
    """What a MiT weights file holds, read from its names and shapes alone."""

    layout: str  # "official" (SegFormer / mmseg mit_b*.pth) | "hf" (Hugging Face nvidia/mit-b*) | "own"
    dims: tuple[int, ...]
    depths: tuple[int, ...]
    size: MiTSize | None  # the MiT size with these dims and depths, None for none known here
    classifier: int | None  # outputs of the ImageNet classifier (head.* / classifier.*), None without one
    fits: bool  # every tensor has a place of the right shape in MixTransformer(size)


@functools.lru_cache(maxsize=None)
def _tensor_shapes(size: str) -> dict[str, tuple[int, ...]]:
    # shapes of MixTransformer(size)'s tensors (built once on the meta device: no memory)
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in MixTransformer(size).state_dict().items()}


def identify_mit_weights(state: Mapping[str, Tensor]) -> MiTWeightsInfo | None:
    """The MiT a state dict in one of :func:`load_mit_weights`' layouts holds; None when it is not one.

    Reads names and shapes only (meta tensors do): the file's tensors go through the same converter as
    a load, then are compared with a ``MixTransformer`` of the size their dims and depths name.
    """
    layout = _find_layout(state)
    if layout is None:
        return None
    convert = _LAYOUTS[layout][1]
    try:
        converted, _ = convert(dict(state), Path("<listing>"))
    except WeightsError:
        return None
    found = _architecture(converted)
    if found is None:
        return None
    dims, depths = found
    size = next((s for s in SIZES.values() if (s.dims, s.depths) == found), None)
    classifier = next((int(v.shape[0]) for k, v in state.items()
                       if k in ("head.weight", "classifier.weight") and v.dim() == 2), None)
    fits = size is not None and _tensor_shapes(size.name) == {k: tuple(v.shape) for k, v in converted.items()}
    short = {_from_official: "official", _from_hf: "hf", _from_own: "own"}[convert]
    return MiTWeightsInfo(short, dims, depths, size, classifier, fits)


def load_mit_weights(backbone: MixTransformer, path: str | Path) -> LoadReport:
    """Load ImageNet weights into ``backbone``, strictly, from a file in any of three layouts.

    The layout is read from the keys: the official SegFormer / mmseg ``mit_b*.pth``
    (``block1.0.attn.kv`` holds keys and values stacked, keys first: it is split), the Hugging
    Face ``nvidia/mit-b*`` files (``.safetensors`` or ``pytorch_model.bin``, keys under
    ``segformer.encoder.``), or this module's own names. The ImageNet classifier (``head.*`` /
    ``classifier.*``) is dropped and reported as ignored. A file of another MiT size raises
    :class:`WeightsError` naming the size it holds; any other missing or unexpected key or shape
    mismatch raises listing the keys; a file in no known layout raises listing the layouts.
    """
    path = Path(path)
    state = read_state_dict(path)
    layout = _detect_layout(state, path)
    converted, ignored = _LAYOUTS[layout][1](state, path)
    _check_size(backbone, converted, path)
    what = f"{backbone.size.describe()} backbone ({layout.split(' (')[0]} layout)"
    return load_strict(backbone, converted, path, what, ignored, optional=True)


# --------------------------------------------------------------------------- registration


def _identify(tensors: Mapping[str, Tensor], layout: str) -> WeightsIdentity | None:
    """What a file in ``layout`` (official | hf | own) holds (``plca weights inspect``)."""
    info = identify_mit_weights(tensors)
    if info is None or info.layout != layout:
        return None
    dims, depths = "/".join(map(str, info.dims)), "/".join(map(str, info.depths))
    if info.size is None:
        return WeightsIdentity(f"MiT with dims {dims}, depths {depths}",
                               notes=("no MiT size B0-B5 has these dims and depths",))
    architecture = info.size.describe()
    if info.classifier is not None:
        architecture += f", with its {info.classifier}-way ImageNet classifier (not part of the backbone)"
    if not info.fits:
        return WeightsIdentity(architecture, notes=(f"its tensors do not all fit this project's mit_{info.size.name}",))
    return WeightsIdentity(architecture, backbone=f"mit_{info.size.name}")


#: What every MiT promises: ImageNet RGB input (model.style null or pytorch, which means the same), three layouts.
CONTRACT = BackboneContract(
    family="MiT",
    normalization=IMAGENET_RGB,
    styles={"pytorch": None},
    weight_layouts=(
        WeightLayout("segformer-mit", "SegFormer's official mit_b* (patch_embed1.proj.weight, block1.0.attn.q.weight, "
                                      "attn.kv, norm1.weight, head.weight)",
                     functools.partial(_identify, layout="official")),
        WeightLayout("hf-mit", "Hugging Face nvidia/mit-b* (segformer.encoder.patch_embeddings.0.proj.weight, "
                               "segformer.encoder.block.0.0.attention.self.query.weight, ...)",
                     functools.partial(_identify, layout="hf")),
        WeightLayout("plca-mit", "this project's MiT names (stages.0.embed.conv.weight, "
                                 "stages.0.blocks.0.attn.query.weight)",
                     functools.partial(_identify, layout="own")),
    ),
)


def _mit_factory(size: str) -> Callable[..., MixTransformer]:
    def build(style: str | None = None) -> MixTransformer:
        return MixTransformer(size)  # the registry has checked the style against CONTRACT

    build.__name__ = f"mit_{size}"
    build.__doc__ = f"{SIZES[size].describe()}, stochastic depth 0.1, strides 4/8/16/32."
    return build


for _size in SIZES:
    register_backbone(f"mit_{_size}", contract=CONTRACT)(_mit_factory(_size))
