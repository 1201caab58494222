"""LoRA files (low-rank weight updates) on our official-layout models: every format diffusers 0.42.1 converts for
Z-Image, FLUX.1 (and its tools) and FLUX.2, applied fused into the weights or as a side path in the forward.

A LoRA on a Linear adds `scale * alpha / rank * B @ A` to its weight, A (rank, in) "down", B (out, rank)
"up" (a BFL control LoRA's B also carries a bias). The scale is the user's, switchable; alpha / rank
is the file's: what diffusers folds into kohya-style files, and what PEFT applies for files with
`.alpha` keys or adapter metadata; without either it is 1. Files spell their keys in these formats:

    format          a key
    diffusers       transformer.<diffusers module>.lora_A.weight, .lora_B.weight (+ .alpha); text_encoder.<CLIP module>...
    kohya           lora_unet_<module, dots as underscores>.lora_down.weight, .lora_up.weight, .alpha; lora_te1_<CLIP module>...
    ComfyUI         diffusion_model.<official module>.lora_down.weight ...; text_encoders.clip_l.transformer.<CLIP module>...
    mixture         lora_transformer_<diffusers module, underscores>.lora_down.weight ...
    ai-toolkit      diffusion_model.<official module>.lora_A.weight ...
    fal Kontext     base_model.model.<official module>.lora_A.weight ...
    XLabs           double_blocks.N.processor.qkv_lora1.down.weight ... (FLUX.1; resolved through the family's aliases)
    BFL control     <official module>.lora_A.weight, .lora_B.weight, .lora_B.bias + the QK-norm scales, replaced whole
    Z-Image dot     <module>.lora.down.weight, .lora.up.weight (`to.q` for `to_q`)

Whatever the format, the module part of a key names one module of our model (official name), of
diffusers' (`transformer_blocks.0.attn.to_q`: rows 0..dim of our fused `double_blocks.0.img_attn.qkv`)
or of an alias, in any mix of dots and underscores: `KeyMap` resolves each to rows of one of our Linears.
Everything is checked against the model from the file's header, before a tensor is read or a weight touched.

Fused, the update is computed in fp32 and rounded once into the weight; unfusing recomputes it the same way,
subtracts, and puts back the few elements where that does not round to the original (found and recorded
at fusing), so the weights come back bit for bit with no copy of them kept. Unfused, a forward hook on the Linear adds x @ A^T @ B^T * scale to its
output rows: scales switch between calls at no cost.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn import functional as F

from zflux.common.files import CheckpointError
from zflux.common.graphs import drop_graphs
from zflux.common.identify import FAMILY_NAMES
from zflux.common.lora_files import MAX_NAMED, LoraFile, LoraModule, read_lora, underscored


@dataclass(frozen=True)
class Target:
    """Rows `rows` of our Linear `module`; `order` (a permutation of them) when a name holds them in another order."""

    module: str
    rows: slice
    order: Tensor | None = None  # row j of the named weight is our row rows.start + order[j]


class KeyMap:
    """A model's Linears under every name a LoRA file may give them: ours, diffusers' (through the family's
    `to_diffusers` converter), the family's aliases, each also with dots as underscores."""

    def __init__(self, model: nn.Module, to_diffusers: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                 aliases: dict[str, tuple[str, ...]] | None = None):
        self.model = model
        self.refresh()
        self.aliases = {re.compile(pattern): names for pattern, names in (aliases or {}).items()}
        names = list(self.linears)
        targets = {name: Target(name, slice(0, m.out_features)) for name, m in self.linears.items()}
        if to_diffusers is not None:
            # Each weight's rows tagged (module index, row): the converter's own cuts and swaps say where diffusers' rows live.
            probe = {f"{name}.weight": torch.stack([torch.full((m.out_features,), i), torch.arange(m.out_features)], dim=1)
                     for i, (name, m) in enumerate(self.linears.items())}  # (out, 2) each
            for key, tags in to_diffusers(probe).items():
                rows = tags[:, 1]
                start = int(rows.min())
                order = None if torch.equal(rows, torch.arange(start, start + len(rows))) else rows - start
                targets.setdefault(key.removesuffix(".weight"), Target(names[int(tags[0, 0])], slice(start, start + len(rows)), order))
        self.targets = {underscored(name): target for name, target in targets.items()}

    def refresh(self) -> None:
        """Find the Linears again (after an input projection was widened or restored)."""
        self.linears = {name: m for name, m in self.model.named_modules() if isinstance(m, nn.Linear)}

    def resolve(self, name: str) -> list[Target] | None:
        """The targets a file's module name stands for (an alias may stand for several), or None."""
        for pattern, names in self.aliases.items():
            m = pattern.fullmatch(name)
            if m:
                found = [self.targets.get(underscored(n.format(*m.groups()))) for n in names]
                return None if None in found else _merged(found)
        target = self.targets.get(underscored(name))
        return None if target is None else [target]


def _merged(targets: list[Target]) -> list[Target]:
    """Targets of one module whose rows follow each other, in order, as one (an alias for q, k and v of a fused weight)."""
    first, last = targets[0], targets[-1]
    adjacent = all(a.module == b.module and a.order is None and b.order is None and a.rows.stop == b.rows.start
                   for a, b in zip(targets, targets[1:]))
    return [Target(first.module, slice(first.rows.start, last.rows.stop))] if adjacent and len(targets) > 1 else targets


@dataclass
class Update:
    """One low-rank update of rows of one Linear, in our layout: weight[rows] += factor * up @ down (+ bias)."""

    module: str
    rows: slice
    down: Tensor  # (rank, in)
    up: Tensor  # (len(rows), rank)
    bias: Tensor | None  # (len(rows),)
    factor: float  # alpha / rank


@dataclass
class Fused:
    """What unfusing one update needs beyond the update itself: the elements that do not round back."""

    where: Tensor  # (n,) int32 flat indices within the rows (about 1% of a bf16 weight for a typical LoRA)
    values: Tensor  # (n,) their original values
    bias: Tensor | None  # the bias rows before (a handful of numbers)


@dataclass
class Lora:
    """One loaded LoRA: its updates per model part, its scale, and whether they are fused."""

    name: str
    scale: float
    fused: bool
    updates: dict[str, list[Update]]  # part ("transformer", "text_encoder") -> updates
    undo: dict[int, Fused] = field(default_factory=dict)  # id(update) -> what unfusing it needs


class LoraSet:
    """The LoRAs loaded into a pipeline's models, in order; each pipeline holds one (load_lora, set_lora_scale, unload_lora).

    `parts` maps "transformer" (and, for FLUX.1, "text_encoder": CLIP) to each model's KeyMap; `family`
    is a key of identify.FAMILY_NAMES. `widen` (FLUX.1: img_in) names the one Linear a BFL control LoRA
    may give more inputs, and the call that does it, given the file and the new width; it returns the undo.
    """

    def __init__(self, parts: dict[str, KeyMap], family: str,
                 widen: tuple[str, Callable[[Path, int], Callable[[], None]]] | None = None):
        self.parts, self.family, self.widen = parts, family, widen
        self.loras: list[Lora] = []
        self.restores: list[Callable[[], None]] = []  # undo replaced norms and widened inputs, in reverse order
        self.hooks: dict[tuple[str, str], torch.utils.hooks.RemovableHandle] = {}

    def changes(self, part: str) -> bool:
        """Whether a loaded LoRA changes `part` ("transformer", "text_encoder")."""
        return any(lora.updates.get(part) for lora in self.loras)

    def check(self, path: str | Path) -> LoraFile:
        """Everything load() checks, from the header: the modules resolve, the shapes fit. Reads no tensor."""
        lora = read_lora(path)
        self._plan(lora)
        return lora

    def load(self, path: str | Path, scale: float = 1.0, fuse: bool = True) -> Lora:
        """Read the LoRA at `path` and apply it at `scale`, fused into the weights or as a side path."""
        if not (isinstance(scale, (int, float)) and abs(scale) < float("inf")):
            raise ValueError(f"LoRA scale {scale!r} must be a finite number")
        file = read_lora(path)
        plan, widths = self._plan(file)
        with safe_open(file.path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for m in file.modules for key in m.keys.values()}
            tensors.update({key: f.get_tensor(key) for key in file.replacements.values()})
        with torch.no_grad():
            for width in widths.values():
                self.restores.append(self.widen[1](file.path, width))
            self.parts["transformer"].refresh()
            self._replace_norms(file, tensors)
        updates = {part: [u for module, targets in todo for u in self._updates(part, module, targets, tensors, file.metadata)]
                   for part, todo in plan.items()}
        lora = Lora(file.path.stem, float(scale), fuse, updates)
        self.loras.append(lora)
        if fuse:
            self._fuse(lora)
        else:
            self._attach(lora)
        return lora

    def set_scale(self, scale: float | list[float]) -> None:
        """New scales: one for every LoRA, or one each in load order. Fused LoRAs are unfused and fused again."""
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(self.loras)
        if not self.loras:
            raise ValueError("no LoRA is loaded: load_lora first")
        if len(scales) != len(self.loras):
            raise ValueError(f"{len(scales)} scales for {len(self.loras)} loaded LoRAs: give one, or one each")
        fused = [lora for lora in self.loras if lora.fused]
        for lora in reversed(fused):
            self._unfuse(lora)
        for lora, s in zip(self.loras, scales):
            lora.scale = float(s)
        for lora in fused:
            self._fuse(lora)
        self._drop_graphs()

    def unload(self) -> None:
        """Remove every LoRA: fused ones unfused (the weights bit for bit as before), side paths detached, norms and
        widened inputs restored."""
        for lora in reversed(self.loras):
            if lora.fused:
                self._unfuse(lora)
        for handle in self.hooks.values():
            handle.remove()
        for part, name in self.hooks:
            del self.parts[part].linears[name].lora_updates
        self.hooks.clear()
        self._drop_graphs()
        with torch.no_grad():
            for restore in reversed(self.restores):
                restore()
        self.parts["transformer"].refresh()
        self.loras.clear()
        self.restores.clear()

    # -- planning: names and shapes from the header --

    def _plan(self, file: LoraFile) -> tuple[dict[str, list[tuple[LoraModule, list[Target]]]], dict[str, int]]:
        """Per part, each file module with its targets; the inputs to widen. A CheckpointError for any mismatch."""
        plan, unmatched, widths = {}, [], {}
        skipped_text = [m.name for m in file.modules if m.part not in self.parts]
        if skipped_text:
            warnings.warn(f"{file.path.name}: {len(skipped_text)} text-encoder LoRA modules skipped ({skipped_text[0]}, ...): "
                          f"{FAMILY_NAMES[self.family]}'s text encoder takes no LoRA (as in diffusers)", stacklevel=3)
        for what, keys in file.skipped.items():
            warnings.warn(f"{file.path.name}: {len(keys)} keys of {what} left out, as diffusers does ({keys[0]}, ...)", stacklevel=3)
        modules = [m for m in file.modules if m.part in self.parts]
        for module in modules:
            targets = self.parts[module.part].resolve(module.name)
            if targets is None:
                unmatched.append(module.name)
            else:
                plan.setdefault(module.part, []).append((module, targets))
        params = dict(self.parts["transformer"].model.named_parameters())
        unmatched += [name for name in file.replacements if name not in params]
        if unmatched:
            looks = f"; the file looks like a {FAMILY_NAMES[file.family]} LoRA" if file.family != self.family else ""
            raise CheckpointError(f"{file.path.name}: {len(unmatched)} of {len(modules) + len(file.replacements)} LoRA modules "
                                  f"match nothing in this {FAMILY_NAMES[self.family]} model ({', '.join(unmatched[:MAX_NAMED])}"
                                  f"{', ...' if len(unmatched) > MAX_NAMED else ''}){looks}")
        for part, todo in plan.items():
            plan[part] = _drop_copies(todo, self.parts[part].linears)
            for module, targets in plan[part]:
                widths.update(self._check_shapes(file, part, module, targets))
        for name, key in file.replacements.items():
            if file.shapes[key] != tuple(params[name].shape):
                raise CheckpointError(f"{file.path.name}: {name} of shape {file.shapes[key]} replaces one of {tuple(params[name].shape)}")
        if widths and (self.widen is None or set(widths) != {self.widen[0]}):
            raise CheckpointError(f"{file.path.name}: {', '.join(widths)} would need more inputs than this model has")
        return plan, widths

    def _check_shapes(self, file: LoraFile, part: str, module: LoraModule, targets: list[Target]) -> dict[str, int]:
        down, up = file.shapes[module.keys["down"]], file.shapes[module.keys["up"]]
        linear = self.parts[part].linears[targets[0].module]
        rows = sum(t.rows.stop - t.rows.start for t in targets)
        where = f"{file.path.name}: {module.name} (our {targets[0].module})"
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            raise CheckpointError(f"{where}: down {down} and up {up} are not a LoRA pair of one rank")
        if up[0] != rows:
            raise CheckpointError(f"{where}: the LoRA changes {up[0]} rows, the module has {rows} there: a LoRA for another model size?")
        bias = module.keys.get("bias")
        if bias is not None and (file.shapes[bias] != (rows,) or linear.bias is None):
            raise CheckpointError(f"{where}: a LoRA bias of shape {file.shapes[bias]} for a module with {rows} rows"
                                  f"{'' if linear.bias is not None else ' and no bias'}")
        if down[1] == linear.in_features:
            return {}
        if file.format == "BFL control" and down[1] > linear.in_features:
            return {targets[0].module: down[1]}
        raise CheckpointError(f"{where}: the LoRA takes {down[1]} inputs, the module {linear.in_features}: "
                              "a LoRA for another model size?")

    # -- tensors --

    def _updates(self, part: str, module: LoraModule, targets: list[Target], tensors: dict[str, Tensor],
                 metadata: dict) -> list[Update]:
        """The file module's updates in our layout: B split over several targets, rows reordered where a name orders them."""
        linear = self.parts[part].linears[targets[0].module]
        weight = linear.weight
        down = tensors[module.keys["down"]].to(weight.device)  # the file's precision: fusing computes in fp32
        up = tensors[module.keys["up"]].to(weight.device)
        bias = tensors.get(module.keys.get("bias"))
        factor = self._alpha(module, tensors, metadata) / down.shape[0]
        out, start = [], 0
        for target in targets:
            n = target.rows.stop - target.rows.start
            piece = up[start:start + n]
            piece_bias = None if bias is None else bias[start:start + n].to(weight.device)
            if target.order is not None:
                piece = torch.empty_like(piece).index_copy_(0, target.order.to(piece.device), piece)  # row j -> our row order[j]
                piece_bias = None if piece_bias is None else torch.empty_like(piece_bias).index_copy_(0, target.order.to(piece.device), piece_bias)
            out.append(Update(target.module, target.rows, down, piece.contiguous(), piece_bias, factor))
            start += n
        return out

    @staticmethod
    def _alpha(module: LoraModule, tensors: dict[str, Tensor], metadata: dict) -> float:
        """alpha: the file's `.alpha`, else PEFT's metadata (lora_alpha, alpha_pattern), else the rank (factor 1)."""
        if "alpha" in module.keys:
            return float(tensors[module.keys["alpha"]])
        rank = tensors[module.keys["down"]].shape[0]
        config = {k.removeprefix(f"{module.part}."): v for k, v in metadata.items()}
        for pattern, alpha in (config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module.name):
                return float(alpha)
        return float(config.get("lora_alpha", rank)) * rank / float(config.get("r", rank))

    def _replace_norms(self, file: LoraFile, tensors: dict[str, Tensor]) -> None:
        """BFL control LoRAs' QK-norm scales replace ours outright (as diffusers loads them); the originals kept for unload."""
        params = dict(self.parts["transformer"].model.named_parameters())
        for name, key in file.replacements.items():
            param = params[name]
            original = param.detach().clone()
            param.copy_(tensors[key])
            self.restores.append(lambda param=param, original=original: param.copy_(original))

    # -- applying --

    def _fuse(self, lora: Lora) -> None:
        with torch.no_grad():
            for part, updates in lora.updates.items():
                for u in updates:
                    lora.undo[id(u)] = _fuse_one(self.parts[part].linears[u.module], u, lora.scale)

    def _unfuse(self, lora: Lora) -> None:
        with torch.no_grad():
            for part, updates in lora.updates.items():
                for u in reversed(updates):
                    _unfuse_one(self.parts[part].linears[u.module], u, lora.scale, lora.undo.pop(id(u)))

    def _attach(self, lora: Lora) -> None:
        """Unfused: each changed Linear keeps a list of (lora, update in its dtype) its forward hook adds."""
        for part, updates in lora.updates.items():
            for u in updates:
                linear = self.parts[part].linears[u.module]
                if (part, u.module) not in self.hooks:
                    linear.lora_updates = []
                    self.hooks[part, u.module] = linear.register_forward_hook(_side_path)
                dtype = linear.weight.dtype
                bias = None if u.bias is None else u.bias.to(dtype)
                linear.lora_updates.append((lora, replace(u, down=u.down.to(dtype), up=u.up.to(dtype), bias=bias)))
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        """CUDA graphs (common/graphs.py) replay the forward as captured, side paths and their scales included: recapture."""
        for keys in self.parts.values():
            drop_graphs(keys.model)


def _drop_copies(todo: list[tuple[LoraModule, list[Target]]], linears: dict[str, nn.Linear]) -> list[tuple[LoraModule, list[Target]]]:
    """Z-Image dot files carry copies: a LoRA on the fused qkv next to LoRAs on its parts, a bare `out` next to `to_out.0`.
    Keep the parts and the first of equal targets, as diffusers does."""
    def whole(t: Target) -> bool:
        return t.rows == slice(0, linears[t.module].out_features)

    parted = {t.module for _, targets in todo for t in targets if not whole(t)}
    kept, seen = [], set()
    for module, targets in todo:
        spans = tuple((t.module, t.rows.start, t.rows.stop) for t in targets)
        if spans in seen or (len(targets) == 1 and whole(targets[0]) and targets[0].module in parted):
            continue
        seen.add(spans)
        kept.append((module, targets))
    return kept


def _moved(weight: Tensor, u: Update, scale: float) -> Tensor:
    """weight + scale * factor * up @ down, computed in fp32 (one addmm) and rounded once to the weight's dtype."""
    return torch.addmm(weight.float(), u.up.float(), u.down.float(), alpha=scale * u.factor).to(weight.dtype)


def _fuse_one(linear: nn.Linear, u: Update, scale: float) -> Fused:
    """Fuse one update into weight[rows]; record the elements that moving back (the same addmm, -scale) would not restore."""
    weight = linear.weight[u.rows]  # a view
    new = _moved(weight, u, scale)
    off = (_moved(new, u, -scale) != weight).view(-1)  # (rows * in,) bool; a row range of a weight is contiguous
    fused = Fused(where=off.nonzero().squeeze(1).to(torch.int32), values=weight.view(-1)[off], bias=None)
    weight.copy_(new)
    if u.bias is not None:
        bias = linear.bias[u.rows]
        fused.bias = bias.clone()
        bias.copy_((bias.float() + u.bias.float() * (scale * u.factor)).to(bias.dtype))
    return fused


def _unfuse_one(linear: nn.Linear, u: Update, scale: float, fused: Fused) -> None:
    weight = linear.weight[u.rows]
    back = _moved(weight, u, -scale)
    back.view(-1)[fused.where.long()] = fused.values
    weight.copy_(back)
    if fused.bias is not None:
        linear.bias[u.rows].copy_(fused.bias)


def _side_path(linear: nn.Linear, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """Forward hook of an unfused LoRA's Linear: out[..., rows] += (x @ A^T @ B^T + bias) * scale * factor, per LoRA."""
    x = inputs[0]
    for lora, u in linear.lora_updates:
        if lora.scale:
            out[..., u.rows] += F.linear(F.linear(x, u.down), u.up, u.bias) * (lora.scale * u.factor)  # (..., rows)
    return out


class LoraPipeline:
    """load_lora, set_lora_scale and unload_lora for a pipeline class, which defines `lora_set() -> LoraSet`: which of its
    models take LoRAs, under which names; and holds `offload` (common/offload.py), whose kept prompt encoding a change
    to the text encoder makes stale."""

    _loras: LoraSet | None = None

    @property
    def loras(self) -> LoraSet:
        """The LoRAs loaded, in order (their key maps built on first use)."""
        if self._loras is None:
            self._loras = self.lora_set()
        return self._loras

    def load_lora(self, path: str | Path, scale: float = 1.0, fuse: bool = True) -> None:
        """Apply the LoRA file at `path` (any format diffusers reads for this family) at `scale`: fused into the weights
        (fast to run; changing its scale refuses it), or as a side path in the forward (`fuse=False`: scales switch
        for free). Several LoRAs add up; unload_lora() removes them all."""
        lora = self.loras.load(path, scale=scale, fuse=fuse)
        if lora.updates.get("text_encoder"):
            self.offload.forget_encoding()

    def set_lora_scale(self, scale: float | list[float]) -> None:
        """One scale for every loaded LoRA, or one each in load order."""
        self.loras.set_scale(scale)
        if self.loras.changes("text_encoder"):
            self.offload.forget_encoding()

    def unload_lora(self) -> None:
        """Remove every LoRA: the weights come back bit for bit."""
        changed = self.loras.changes("text_encoder")
        self.loras.unload()
        if changed:
            self.offload.forget_encoding()
