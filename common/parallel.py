"""Several GPUs of one host on torch.distributed: sequence parallel, CFG parallel and data parallel.

    torchrun --nproc-per-node 4 -m zflux.cli generate --model flux-dev --weights FLUX.1-dev --prompt "..." --out fox.png \
        --parallel sp

The modes (`--parallel`), each rank running the whole pipeline on its own device:
- `sp`, sequence parallel (DeepSpeed-Ulysses): inside the transformer's main blocks every rank holds
  a contiguous slice of the token sequence (text and image tokens alike, padded to a multiple of the
  ranks). Everything but attention works token by token; around attention an all-to-all turns the
  token slices of q, k and v into head slices over the whole sequence (one all-to-all for the three),
  and a second all-to-all turns the output back. Heads that do not divide among the ranks (Z-Image's 30 on 4) are padded with
  zero heads whose outputs are dropped. The RoPE tables are sliced with the tokens; the keys of the
  padding, and each caption's padding, are masked by their position in the whole sequence.
  Sharded: FLUX.1's and FLUX.2's double and single blocks over [text; image], Z-Image's noise
  refiner (image tokens) and main layers ([image; caption]); Z-Image's context refiner (2 blocks
  over the caption alone, a few hundred tokens) runs whole on every rank.
- `cfg`: the conditional and the unconditional row of each guided model call run on two ranks
  (each as a batch of one: Z-Image's captions then need no key mask), and both rows' outputs are
  gathered; `cfg+sp` splits each row's tokens over the ranks of a half.
- `dp`: each rank makes its own share of the images (prompts x seeds) and writes their files.

Every rank draws the same noise (so a run needs a given seed, not a random one) and computes the
same schedule, text features and Euler steps: the gathered outputs are identical everywhere, so the
latents stay identical without more traffic. CUDA graphs (common/graphs.py) stay off under a plan.

Models stay unaware of the mode: they cut their sequence with `sequence_shards(length)` (a single
shard without `sp`), run their blocks inside `shards.attending()`, and `ops.attention` calls
`Shards.attention` while that scope is open. CFG parallel wraps the transformer's forward from the
outside (`split_rows`).
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Callable, Iterator, NamedTuple, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

MODES = ("sp", "cfg", "cfg+sp", "dp")
CFG_RANKS = 2  # one rank per CFG row: the conditional and the unconditional
T = TypeVar("T")


class Axis(NamedTuple):
    """The ranks that split one thing (a sequence, a batch): their process group, how many there are, and which one is this."""

    group: dist.ProcessGroup | None
    size: int
    rank: int


SINGLE = Axis(group=None, size=1, rank=0)
# The sequence axis `sp` runs on, set by Plan.applied; the shards whose attention is open now.
# Plain module globals, as ops._scoped: torch.compile traces global reads.
_sequence: Axis = SINGLE
_attending: "Shards | None" = None
_rows_split = False  # whether a transformer's CFG rows are split (Plan.applied)


def check_mode(mode: str, world: int, *, guided: bool, heads: int, images: int) -> None:
    """Refuse, in one line, a mode that this run cannot use on `world` processes (before any weight is read).

    `guided`: whether the run's model calls carry a CFG batch of two rows; `heads`: the transformer's
    attention heads; `images`: how many images the run makes.
    """
    if mode not in MODES:
        raise ValueError(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
    if world < 2:
        raise ValueError(f"--parallel {mode} needs several processes: launch with torchrun --nproc-per-node N (N >= 2), "
                         "one per GPU")
    if "cfg" in mode and not guided:
        raise ValueError(f"--parallel {mode}: this run has no classifier-free guidance (no conditional and unconditional "
                         "rows to split); use sp or dp")
    if mode == "cfg" and world != CFG_RANKS:
        raise ValueError(f"--parallel cfg runs on {CFG_RANKS} processes (one per CFG row), not {world}; "
                         "for more use cfg+sp on an even number")
    if mode == "cfg+sp" and (world % CFG_RANKS or world < 2 * CFG_RANKS):
        raise ValueError(f"--parallel cfg+sp needs an even number of processes >= 4 (2 CFG rows x sequence shards), not {world}")
    sequence_ranks = world // CFG_RANKS if mode == "cfg+sp" else world
    if "sp" in mode.split("+") and sequence_ranks > heads:
        raise ValueError(f"--parallel {mode}: {sequence_ranks} sequence shards for {heads} attention heads; use at most {heads}")
    if mode == "dp" and images < world:
        raise ValueError(f"--parallel dp over {world} processes makes {images} image(s): give at least {world} "
                         "(--num-images, --prompts) or fewer processes")


@dataclass(frozen=True)
class Plan:
    """What this process does in a parallel run: its rank among `world`, and the axes its mode splits."""

    mode: str
    rank: int
    world: int
    sequence: Axis = SINGLE
    rows: Axis = SINGLE

    @property
    def writes(self) -> bool:
        """Whether this rank saves images: its own share with dp, else the first rank only (all hold the same image)."""
        return self.mode == "dp" or self.rank == 0

    def share(self, jobs: Sequence[T]) -> list[T]:
        """This rank's part of a run's images: all of them, or with dp every world-th from its rank on."""
        return list(jobs[self.rank::self.world]) if self.mode == "dp" else list(jobs)

    @contextmanager
    def applied(self, transformer: torch.nn.Module) -> Iterator[None]:
        """Within this scope the models cut their sequences over this rank's sequence axis, and `transformer` splits
        its CFG rows over the row axis."""
        global _sequence, _rows_split
        previous = _sequence, _rows_split
        _sequence, _rows_split = self.sequence, self.rows.size > 1
        if self.rows.size > 1:
            transformer.forward = split_rows(transformer.forward, self.rows)
        try:
            yield
        finally:
            _sequence, _rows_split = previous
            transformer.__dict__.pop("forward", None)  # the class's forward again


SOLO = Plan(mode="none", rank=0, world=1)


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def rank_device(device: torch.device) -> torch.device:
    """This rank's device in a launched run: its own GPU (LOCAL_RANK) where `device` is CUDA, else `device` itself."""
    _, world, local = launched()
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--parallel runs one process per GPU, each on cuda:LOCAL_RANK: pass --device cuda, not {device}")
    count = torch.cuda.device_count()
    if world > count:
        raise ValueError(f"--parallel over {world} processes needs {world} GPUs; this machine has {count}")
    return torch.device("cuda", local)


def init(mode: str, device: torch.device) -> Plan:
    """Join the process group torchrun (or the caller: MASTER_ADDR, RANK, ...) set up, NCCL on GPUs, gloo on the CPU,
    and make the groups of `mode`: ranks c * n .. c * n + n - 1 split row c's sequence into n shards."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = CFG_RANKS if "cfg" in mode else 1
    shards = world // rows if "sp" in mode.split("+") else 1
    if mode == "dp":
        return Plan(mode=mode, rank=rank, world=world)
    # Every rank creates every group, in the same order (new_group is collective).
    sequence_groups = [dist.new_group(list(range(c * shards, (c + 1) * shards))) for c in range(rows)] if shards > 1 else []
    row_groups = [dist.new_group(list(range(s, world, shards))) for s in range(shards)] if rows > 1 else []
    row, shard = divmod(rank, shards)
    sequence = Axis(sequence_groups[row], shards, shard) if sequence_groups else SINGLE
    row_axis = Axis(row_groups[shard], rows, row) if row_groups else SINGLE
    return Plan(mode=mode, rank=rank, world=world, sequence=sequence, rows=row_axis)


@contextmanager
def session(mode: str | None, device: torch.device) -> Iterator[Plan]:
    """The Plan of this process for `mode` (None: one process, no split), its process group joined for the scope
    (and left at its end if this scope joined it)."""
    if mode is None:
        yield SOLO
        return
    joined = not dist.is_initialized()
    try:
        yield init(mode, device)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def gather(x: Tensor, axis: Axis, dim: int) -> Tensor:
    """The pieces of `x` that the ranks of `axis` hold, joined along `dim` in rank order."""
    pieces = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(pieces, x.contiguous(), group=axis.group)
    return torch.cat(pieces, dim=dim)


def per_row(arg: object, batch: int) -> bool:
    """Whether a call's argument holds one entry per batch row: a tensor of `batch` rows, or a tuple of `batch` entries."""
    if isinstance(arg, Tensor):
        return arg.ndim > 0 and arg.shape[0] == batch
    return isinstance(arg, tuple) and len(arg) == batch


def split_rows(forward: Callable[..., Tensor], axis: Axis) -> Callable[..., Tensor]:
    """`forward` with its batch split over the ranks of `axis`: each runs its rows, all get every row's output.

    The batch size is the first tensor argument's; every tensor argument with that many rows, and every tuple with
    that many entries (Z-Image's caption lengths), is cut. A call whose rows do not divide (Z-Image's single row once
    CFG is truncated) runs whole on every rank.
    """

    @wraps(forward)
    def run(*args, **kwargs) -> Tensor:
        batch = next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)).shape[0]
        if batch % axis.size:
            return forward(*args, **kwargs)
        n = batch // axis.size
        rows = slice(axis.rank * n, (axis.rank + 1) * n)
        mine = lambda a: a[rows] if per_row(a, batch) else a  # noqa: E731
        out = forward(*map(mine, args), **{k: mine(v) for k, v in kwargs.items()})  # (n, ...)
        return gather(out, axis, dim=0)  # (batch, ...)

    return run


@dataclass(frozen=True)
class Shards:
    """One sequence of `length` tokens cut into equal contiguous slices, one per rank of `axis` (padded at the end)."""

    length: int
    axis: Axis

    @property
    def local(self) -> int:
        """Tokens per rank, the padding included."""
        return -(-self.length // self.axis.size)

    @property
    def start(self) -> int:
        return self.axis.rank * self.local

    def count(self, first: int) -> int:
        """How many of the sequence's first `first` tokens this rank holds (FLUX's text tokens: a prefix)."""
        return min(max(first - self.start, 0), self.local)

    def split(self, x: Tensor) -> Tensor:
        """This rank's slice (B, local, ...) of a whole sequence (B, length, ...)."""
        if self.axis.size == 1:
            return x
        x = F.pad(x, (0, 0) * (x.ndim - 2) + (0, self.local * self.axis.size - self.length))  # (B, P*local, ...)
        return x[:, self.start: self.start + self.local]

    def gather(self, x: Tensor) -> Tensor:
        """The whole sequence (B, length, ...) from every rank's slice (B, local, ...)."""
        if self.axis.size == 1:
            return x
        return gather(x, self.axis, dim=1)[:, : self.length]

    def gather_after(self, first: int, head: Tensor, tail: Tensor) -> Tensor:
        """The whole sequence's tokens after its first `first` (B, length - first, ...), from this rank's slice split as
        `head` (its tokens among the first) and `tail`: FLUX's image tokens. One rank: `tail` itself, no copy."""
        if self.axis.size == 1:
            return tail
        return self.gather(torch.cat([head, tail], dim=1))[:, first:]

    @contextmanager
    def attending(self) -> Iterator[None]:
        """Within this scope, ops.attention takes q, k, v of this rank's tokens and attends over the whole sequence."""
        global _attending
        previous = _attending
        _attending = self if self.axis.size > 1 else previous
        try:
            yield
        finally:
            _attending = previous

    def attention(self, q: Tensor, k: Tensor, v: Tensor, key_lens: Tensor | None,
                  attend: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]) -> Tensor:
        """Ulysses attention: q, k, v (B, H, local, D) of this rank's tokens -> (B, H, local, D).

        attend(q, k, v, key_lens) runs on every token and this rank's heads; `key_lens` (B,) counts
        valid keys from the sequence's start (None: all `length` are); the padding after `length` is masked.
        """
        heads = q.shape[1]
        q, k, v = self._to_heads(torch.stack([q, k, v]))  # (B, Hp/P, P*local, D) each: one all-to-all for the three
        if key_lens is None and self.local * self.axis.size > self.length:
            key_lens = torch.full((q.shape[0],), self.length, device=q.device)  # (B,)
        return self._to_tokens(attend(q, k, v, key_lens))[:, :heads]  # (B, H, local, D)

    def _to_heads(self, x: Tensor) -> Tensor:
        """(K, B, H, local, D) of this rank's tokens -> (K, B, Hp/P, P*local, D): every token of this rank's heads (H padded
        to Hp)."""
        P = self.axis.size
        x = F.pad(x, (0, 0, 0, 0, 0, -x.shape[2] % P))  # (K, B, Hp, local, D): zero heads attend uniformly, their outputs are dropped
        send = rearrange(x, "k b (p h) s d -> p k b h s d", p=P).contiguous()  # head group p goes to rank p
        received = torch.empty_like(send)  # received[p]: rank p's tokens of this rank's heads
        dist.all_to_all_single(received, send, group=self.axis.group)
        return rearrange(received, "p k b h s d -> k b h (p s) d")

    def _to_tokens(self, x: Tensor) -> Tensor:
        """(B, Hp/P, P*local, D) of this rank's heads -> (B, Hp, local, D): every head of this rank's tokens."""
        send = rearrange(x, "b h (p s) d -> p b h s d", p=self.axis.size).contiguous()  # token slice p goes to rank p
        received = torch.empty_like(send)  # received[p]: rank p's heads of this rank's tokens
        dist.all_to_all_single(received, send, group=self.axis.group)
        return rearrange(received, "p b h s d -> b (p h) s d")


def active() -> bool:
    """Whether a parallel plan is applied in this process (the transformer's calls then talk to other ranks)."""
    return _sequence.size > 1 or _rows_split


def sequence_shards(length: int, whole: bool = False) -> Shards:
    """A sequence of `length` tokens cut over this process's sequence axis (one whole shard without `sp`, or if `whole`)."""
    return Shards(length, SINGLE if whole else _sequence)


def shard_joint(txt: Tensor, img: Tensor, rope: tuple[Tensor, Tensor],
                whole: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor], Shards]:
    """FLUX's joint sequence [text; image] (B, L+S, dim) and its RoPE tables (B, L+S, D/2) cut over the sequence axis:
    this rank's slice (B, local, dim) of each, and the shards (whose count(L) of its tokens are text)."""
    x = torch.cat([txt, img], dim=1)  # (B, L+S, dim)
    shards = sequence_shards(x.shape[1], whole)
    return shards.split(x), tuple(shards.split(table) for table in rope), shards


def attending() -> Shards | None:
    """The shards whose attention scope is open, if any: ops.attention then runs Shards.attention."""
    return _attending
