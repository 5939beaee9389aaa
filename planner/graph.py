"""A symbolic replay of autograd's memory: which tensors a piece of the model allocates, keeps and frees.

The memory model describes one decoder layer (and the embedding, and the loss) as a list of ops with the
tensors they create, the tensors autograd saves for backward, and their transient scratch. `simulate`
replays forward and backward the way PyTorch's autograd engine does and records live bytes:

- forward: an op allocates its outputs (plus transient scratch); a tensor is freed after its last forward
  use unless an op saved it for backward or it is held (model outputs, a KV cache, a checkpoint input);
- backward, in reverse creation order (the engine runs the most recently created ready node first): an op
  allocates the gradients of its inputs that require grad (a gradient that reaches a tensor a second time
  is summed in place, so the new copy is transient), its parameter gradients, and its scratch; then it frees
  the gradients of its outputs and the tensors that only it saved. Ops such as `add` and views hand their
  output gradient to an input without a copy (`grad_alias`).

Sizes have two channels: bytes proportional to the micro-batch (activations) and fixed bytes (parameter
gradients, weight copies). A live total is the line `per_batch * B + fixed`, so one replay serves every
batch size: the peak at B is the maximum over the recorded points, kept as their upper envelope.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Size = tuple  # (per_batch_bytes, fixed_bytes)
ZERO: Size = (0, 0)


@dataclass
class _Tensor:
    size: Size
    rg: bool
    kind: str
    held: str | bool = False  # False, "step" or "piece"
    external: bool = False
    savers: list = field(default_factory=list)
    last_use: int = -1


@dataclass
class _Node:
    name: str
    inputs: tuple
    outputs: tuple
    saved: tuple
    param_grad: Size
    fwd_temp: Size
    bwd_temp: Size
    grad_alias: tuple
    hooked: bool = True  # its saved tensors reach the saved-tensor hooks (False: TRL's NoOpManager around lm_head)


class Graph:
    """Builder of one piece of the model: `t = g.tensor(...)`, then `g.op(...)` in forward order."""

    def __init__(self) -> None:
        self.tensors: list[_Tensor] = []
        self.nodes: list[_Node] = []

    def tensor(self, size: Size, rg: bool = False, kind: str = "activations", held: bool = False,
               external: bool = False) -> int:
        self.tensors.append(_Tensor(tuple(size), rg, kind, "step" if held is True else held, external))
        return len(self.tensors) - 1

    def rg(self, t: int) -> bool:
        return self.tensors[t].rg

    def size(self, t: int) -> Size:
        return self.tensors[t].size

    def op(self, name: str, inputs=(), outputs=(), saved=(), param_grad: Size = ZERO, fwd_temp: Size = ZERO,
           bwd_temp: Size = ZERO, grad_alias=()) -> None:
        """Record an op. `saved` lists what autograd keeps given the inputs' requires_grad (the builders
        decide). An op whose outputs receive no gradient never runs in backward."""
        idx = len(self.nodes)
        for t in inputs:
            self.tensors[t].last_use = idx
        for t in saved:
            self.tensors[t].savers.append(idx)
        self.nodes.append(_Node(name, tuple(inputs), tuple(outputs), tuple(saved), tuple(param_grad),
                                tuple(fwd_temp), tuple(bwd_temp), tuple(grad_alias)))

    def unhooked(self, since: int) -> None:
        """The ops recorded from node `since` on run under a saved-tensor hook that keeps their tensors as they are
        (TRL's `NoOpManager`, which `get_act_offloading_ctx_manager` enters around the lm_head's forward)."""
        for n in self.nodes[since:]:
            n.hooked = False

    def hold(self, t: int, scope: str = "step") -> None:
        """Keep `t` alive past its last use: `scope="step"` to the end of the training step (outputs, caches),
        `scope="piece"` to the end of this piece's backward (a checkpoint's input)."""
        self.tensors[t].held = scope


@dataclass(frozen=True)
class Point:
    """Live bytes at one instant, relative to the start of the piece: total and by kind, each (per_batch, fixed)."""

    total: Size
    kinds: tuple  # ((kind, (per_batch, fixed)), ...)

    def at(self, batch: int) -> int:
        return self.total[0] * batch + self.total[1]

    def kinds_at(self, batch: int) -> dict:
        return {k: s[0] * batch + s[1] for k, s in self.kinds if s[0] * batch + s[1]}


def _envelope(points: list) -> tuple:
    """Points not dominated in both channels: the only candidates for the maximum at any batch size."""
    best: dict = {}
    for p in points:
        best.setdefault(p.total, p)
    out, top_fixed = [], None
    for total in sorted(best, key=lambda s: (-s[0], -s[1])):
        if top_fixed is None or total[1] > top_fixed:
            out.append(best[total])
            top_fixed = total[1]
    return tuple(out) or (Point(ZERO, ()),)


def peak_point(points: tuple, batch: int) -> Point:
    """The first of `points` with the most live bytes at `batch` (`max(points, key=at)`, unrolled: the planner's
    hottest call)."""
    best = points[0]
    top = best.total[0] * batch + best.total[1]
    for p in points[1:]:
        per_batch, fixed = p.total
        if per_batch * batch + fixed > top:
            best, top = p, per_batch * batch + fixed
    return best


@dataclass(frozen=True)
class Offload:
    """TRL's activation offloading (trl 1.16.0 `models/activation_offloading.py` `OffloadActivations`, with
    `get_act_offloading_ctx_manager`'s defaults, as SFTTrainer calls it) at micro-batch `batch`: its rules depend on
    a saved tensor's bytes, so the replay is per batch size.

    Forward, per saved tensor in packing order (each pack takes the next id): a tensor whose storage is already
    tracked (offloaded and still in the forward stash, or kept once for that reason) is kept on the device (the
    dedup rule: `storage_key in storage_to_tensor_id`); one under `min_bytes` (1 KiB) is kept; otherwise it is
    copied to a new pinned host buffer (`empty_like(pin_memory=True)`; the host allocator rounds to a power of two)
    and its device tensor stays in the forward stash until an offloading pack with an id at least `stash` (5)
    higher (`max_fwd_stash_size`: entries with id <= new id - 5 are dropped, and only when a tensor is offloaded).
    Kept tensors stay referenced by TRL's tracker until their unpack. Parameters are never graph tensors here.

    Backward, per node: each offloaded tensor it unpacks is copied back to a new device tensor (`.to(device)`)
    unless still in the forward stash (then the device original is used); the copies stay in the backward stash
    until the next node that unpacks an offloaded tensor has run (its hook drops the previous nodes' copies), and
    that first hook also empties the forward stash. The lm_head runs under TRL's `NoOpManager` (`Graph.unhooked`):
    its saved tensors stay on the device, take no id and are released by autograd as without offloading."""

    batch: int
    min_bytes: int = 1024
    stash: int = 5


def pinned_bytes(nbytes: int) -> int:
    """Pinned host bytes of a buffer: the next power of two (torch 2.13 `CachingHostAllocator` `PowerOf2Ceil`)."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


@dataclass(frozen=True)
class Timeline:
    """What `simulate` recorded, relative to the bytes live when the piece starts (its external inputs)."""

    forward: tuple  # envelope of Points during forward
    backward: tuple  # envelope of Points during backward
    kept: Size  # after forward: bytes this piece keeps until its backward (saved + held), outputs excluded
    outputs: Size  # after forward: bytes of its outputs (handed to the next piece)
    param_grads: Size  # parameter gradients it leaves after backward
    grad_inputs: Size  # gradients of its external inputs it leaves after backward
    held: Size  # bytes held to the end (outputs object, caches)
    recompute: tuple = ()  # envelope of forward Points up to the last saved tensor (a checkpoint's recomputation)
    host: int = 0  # activation offloading: pinned host bytes of the piece's offloaded tensors (at `Offload.batch`)
    host_copied: int = 0  # activation offloading: bytes those tensors hold (what is copied to the host and back)
    end_copies: Size = ZERO  # activation offloading: copies still in the backward stash when the piece's backward ends
    end_stash: Size = ZERO  # activation offloading: bytes alive only through the forward stash at the forward's end
    end_stash_entries: tuple = ()  # those tensors as (age, size), oldest first (the next piece's `stash_in`)
    # with `simulate(hook_at=t)`: the backward envelope before t's gradient exists, and from then on (() otherwise)
    backward_pre: tuple = ()
    backward_post: tuple = ()


def _recompute_end(g: Graph, starts: list, n_points: int) -> int:
    """How many forward points a checkpoint's recomputation reaches. torch.utils.checkpoint (non-reentrant, early
    stop on by default) stops the recomputation once the last saved tensor is packed; autograd packs an op's saved
    inputs before running it and its saved outputs after, so the last saving op's outputs exist only if it saves
    one of them."""
    last = max((i for i, n in enumerate(g.nodes) if n.saved), default=None)
    if last is None:
        return n_points
    n = g.nodes[last]
    if set(n.saved) & set(n.outputs):
        return starts[last + 1] if last + 1 < len(starts) else n_points
    return starts[last]


def forward_without_saving(g: Graph, outputs=()) -> tuple:
    """Forward points of `g` when autograd keeps nothing (a checkpointed layer's first forward: the checkpoint's
    pack hook drops every saved tensor, so each dies after its last use)."""
    import copy

    g2 = copy.copy(g)
    g2.tensors = [copy.copy(t) for t in g.tensors]
    for t in g2.tensors:
        t.savers = []
    g2.nodes = [copy.copy(n) for n in g.nodes]
    for n in g2.nodes:
        n.saved = ()
    return simulate(g2, outputs=outputs).forward


def simulate(g: Graph, outputs=(), incoming_grads=(), offload: Offload | None = None, release_stash: bool = True,
             carry_in: Size = ZERO, stash_in: tuple = (), hook_at: int | None = None) -> Timeline:
    """Replay forward then backward of `g`.

    External tensors (the piece's inputs) are live at the start and owned by the caller; they count in the
    piece only from the moment it saves them. `outputs`: tensors handed to the next piece (stay live after
    forward). `incoming_grads`: tensors whose gradient arrives before this piece's backward starts.

    `offload`: TRL's activation offloading (`Offload`). `release_stash`: the forward stash left at the end of the
    forward is emptied by the next piece's packs (a decoder layer, the embedding) rather than kept into this
    piece's backward (the loss, the last to run forward). `carry_in`: the previous piece's copies still in the
    backward stash when this piece's backward starts (freed after its first node that unpacks an offloaded
    tensor). `hook_at`: a tensor with a gradient hook (FSDP2's pre-backward on a unit's output); the backward points
    are also split into those before its gradient exists and those from the backward of the node producing it on
    (`Timeline.backward_pre`, `backward_post`)."""
    live = [0, 0]
    by_kind: dict[str, list] = {}

    def alloc(size: Size, kind: str) -> None:
        live[0] += size[0]
        live[1] += size[1]
        k = by_kind.setdefault(kind, [0, 0])
        k[0] += size[0]
        k[1] += size[1]

    def free(size: Size, kind: str) -> None:
        alloc((-size[0], -size[1]), kind)

    def snap(points: list) -> None:
        points.append(Point((live[0], live[1]), tuple((k, (v[0], v[1])) for k, v in by_kind.items() if v != [0, 0])))

    alive = [False] * len(g.tensors)
    keep = set(outputs)
    for i, t in enumerate(g.tensors):
        if t.external:  # the piece's inputs: live from the start, freed after their last use unless kept
            alive[i] = True
            alloc(t.size, t.kind)
    fwd: list = []
    starts: list = []  # len(fwd) when each node starts
    # activation offloading: per tensor, packs kept on the device; the forward stash (pack id, tensor); the tensors
    # whose storage key is tracked; per node, which of its saved tensors went to the host
    kept_packs = [0] * len(g.tensors)
    stash: list = []
    tracked: set = set()
    offloaded_by: dict = {}
    kept_by: dict = {}  # tensor -> the nodes whose pack kept it on the device (TRL's tracker holds it until then)
    host = 0
    copied = 0
    pack_id = 0
    for age, size in stash_in:  # pseudo tensors with ids -age (the previous piece's last pack is 0), oldest first
        t = g.tensor(size)
        g.tensors[t].last_use = -1
        alive.append(True)
        kept_packs.append(0)
        alloc(size, "activations")
        stash.append((-age, t))

    def on_device(t: int) -> bool:  # still referenced on the device for backward
        if offload is None:
            return bool(g.tensors[t].savers)
        return kept_packs[t] > 0 or any(s == t for _, s in stash)

    def maybe_free(t: int, idx: int) -> None:
        tt = g.tensors[t]
        if not alive[t] or tt.held or on_device(t) or t in keep or tt.last_use > idx:
            return
        if tt.external and idx >= len(g.nodes):
            return
        alive[t] = False
        free(tt.size, tt.kind)

    def pack(t: int, idx: int) -> None:
        nonlocal host, copied, pack_id
        pack_id += 1
        tt = g.tensors[t]
        nbytes = tt.size[0] * offload.batch + tt.size[1]
        if t in tracked or nbytes < offload.min_bytes:
            kept_packs[t] += 1
            kept_by.setdefault(t, []).append(idx)
            if t in tracked:  # the dedup entry keeps the storage key until its unpack
                tracked.add(t)
            return
        while stash and stash[0][0] <= pack_id - offload.stash:
            _, old = stash.pop(0)
            if kept_packs[old] == 0:
                tracked.discard(old)
            maybe_free(old, idx)
        stash.append((pack_id, t))
        tracked.add(t)
        host += pinned_bytes(nbytes)
        copied += nbytes
        offloaded_by.setdefault(idx, []).append(t)

    for idx, n in enumerate(g.nodes):
        starts.append(len(fwd))
        # autograd packs an op's saved inputs before it runs and its saved outputs after (`SavedVariable`)
        if offload is not None and not n.hooked:  # held by autograd itself until this node's backward
            for t in n.saved:
                kept_packs[t] += 1
                kept_by.setdefault(t, []).append(idx)
        elif offload is not None:
            for t in n.saved:
                if t not in n.outputs:
                    pack(t, idx)
        for t in n.outputs:
            alive[t] = True
            alloc(g.tensors[t].size, g.tensors[t].kind)
        if n.fwd_temp != ZERO:
            alloc(n.fwd_temp, "temporaries")
            snap(fwd)
            free(n.fwd_temp, "temporaries")
        snap(fwd)
        if offload is not None and n.hooked:
            for t in n.saved:
                if t in n.outputs:
                    pack(t, idx)
        for t in set(n.inputs) | set(n.outputs):
            if offload is not None:
                maybe_free(t, idx)
                continue
            tt = g.tensors[t]
            if not alive[t] or tt.held or tt.savers or t in keep:
                continue
            if tt.last_use <= idx:
                alive[t] = False
                free(tt.size, tt.kind)
    end_stash = [0, 0]
    stash_entries = ()
    if offload is not None:
        last = len(g.nodes) - 1
        only_stash = [t for _, t in stash if alive[t] and kept_packs[t] == 0 and not g.tensors[t].held
                      and t not in keep and not g.tensors[t].external]
        for t in dict.fromkeys(only_stash):
            end_stash[0] += g.tensors[t].size[0]
            end_stash[1] += g.tensors[t].size[1]
        stash_entries = tuple((pack_id - i, g.tensors[t].size) for i, t in stash if t in only_stash)
        if release_stash:
            stash.clear()
            for t in dict.fromkeys(only_stash):
                maybe_free(t, last)
    for i, t in enumerate(g.tensors):  # unconsumed external inputs are freed by their owner after this piece
        if alive[i] and t.external and not on_device(i) and not t.held and i not in keep:
            alive[i] = False
            free(t.size, t.kind)
    kept = [0, 0]
    held = [0, 0]
    out_bytes = [0, 0]
    for i, t in enumerate(g.tensors):
        if not alive[i]:
            continue
        if i in keep and not on_device(i) and not t.held:
            out_bytes[0] += t.size[0]
            out_bytes[1] += t.size[1]
            alive[i] = False  # handed to the next piece, which owns it from here
            free(t.size, t.kind)
        else:
            kept[0] += t.size[0]
            kept[1] += t.size[1]
        if t.held == "step":
            held[0] += t.size[0]
            held[1] += t.size[1]

    # -- backward -----------------------------------------------------------------------------------------------
    # gradient storages: sid -> [size, refs]; grad_of: tensor -> sid
    storages: dict[int, list] = {}
    grad_of: dict[int, int] = {}
    next_sid = [0]

    def new_storage(size: Size) -> int:
        sid = next_sid[0]
        next_sid[0] += 1
        storages[sid] = [size, 1]
        alloc(size, "temporaries")
        return sid

    def decref(sid: int) -> None:
        st = storages[sid]
        st[1] -= 1
        if st[1] == 0:
            free(st[0], "temporaries")
            del storages[sid]

    for t in incoming_grads:
        grad_of[t] = new_storage(g.tensors[t].size)
    prev_copies: list = []  # activation offloading: the previous unpacking node's copies (the backward stash)
    if carry_in != ZERO:
        alloc(carry_in, "temporaries")
        prev_copies.append((carry_in, "temporaries"))
    fwd_stash = {t for _, t in stash}
    bwd: list = []
    # the node producing `hook_at`: its backward and every earlier node's run after the hook fired
    hook_node = next((i for i, n in enumerate(g.nodes) if hook_at in n.outputs), None) if hook_at is not None else None
    n_pre = None
    param_grads = [0, 0]
    for idx in range(len(g.nodes) - 1, -1, -1):
        n = g.nodes[idx]
        out_sid = next((grad_of[t] for t in n.outputs if t in grad_of), None)
        if out_sid is None:
            continue
        if hook_node is not None and idx <= hook_node and n_pre is None:
            n_pre = len(bwd)
        transients = []
        for t in n.inputs:
            tt = g.tensors[t]
            if not tt.rg:
                continue
            aliased = t in n.grad_alias and storages[out_sid][0] == tt.size
            if t in grad_of:
                if not aliased:  # summed in place into the existing gradient; the new one is transient
                    alloc(tt.size, "temporaries")
                    transients.append(tt.size)
            elif aliased:
                storages[out_sid][1] += 1
                grad_of[t] = out_sid
            else:
                grad_of[t] = new_storage(tt.size)
        if n.param_grad != ZERO:
            alloc(n.param_grad, "gradients")
            param_grads[0] += n.param_grad[0]
            param_grads[1] += n.param_grad[1]
        copies = []
        for t in offloaded_by.get(idx, ()):
            if t not in fwd_stash:  # brought back from the host: a new device tensor
                copies.append((g.tensors[t].size, g.tensors[t].kind))
                alloc(*copies[-1])
        if n.bwd_temp != ZERO:
            alloc(n.bwd_temp, "temporaries")
        snap(bwd)
        if n.bwd_temp != ZERO:
            free(n.bwd_temp, "temporaries")
        for size in transients:
            free(size, "temporaries")
        for t in n.outputs:
            sid = grad_of.pop(t, None)
            if sid is not None:
                decref(sid)
        if offload is None:
            for t in n.saved:  # the device tensor is released by its earliest saver's backward
                tt = g.tensors[t]
                if alive[t] and min(tt.savers) == idx and not tt.held:
                    alive[t] = False
                    free(tt.size, tt.kind)
            continue
        # under offloading, by the last backward of the packs that kept it (TRL's tracker, or autograd under the
        # NoOpManager: an offloaded pack holds only the host copy) once the forward stash no longer holds it
        for t in set(n.saved):
            if idx in kept_by.get(t, ()):
                kept_packs[t] -= kept_by[t].count(idx)
                if alive[t] and kept_packs[t] == 0 and not g.tensors[t].held and t not in fwd_stash:
                    alive[t] = False
                    free(g.tensors[t].size, g.tensors[t].kind)
        if idx in offloaded_by:  # TRL's hook: the forward stash and the previous nodes' copies are dropped
            for t in list(fwd_stash):
                fwd_stash.discard(t)
                if alive[t] and kept_packs[t] == 0 and not g.tensors[t].held and t not in keep:
                    alive[t] = False
                    free(g.tensors[t].size, g.tensors[t].kind)
            for size, kind in prev_copies:
                free(size, kind)
            prev_copies = copies
        else:
            prev_copies += copies
    end_copies = [0, 0]
    for size, kind in prev_copies:  # still in the backward stash: freed in the next piece (its `carry_in`)
        end_copies[0] += size[0]
        end_copies[1] += size[1]
        free(size, kind)
    for i, t in enumerate(g.tensors):  # the checkpoint releases its inputs when the piece's backward is done
        if alive[i] and t.held == "piece":
            alive[i] = False
            free(t.size, t.kind)
    grad_inputs = [0, 0]
    for t, sid in grad_of.items():
        if g.tensors[t].external:
            grad_inputs[0] += storages[sid][0][0]
            grad_inputs[1] += storages[sid][0][1]
    return Timeline(
        forward=_envelope(fwd),
        recompute=_envelope(fwd[: _recompute_end(g, starts, len(fwd))]),
        backward=_envelope(bwd),
        backward_pre=_envelope(bwd[:n_pre]) if n_pre is not None else (),
        backward_post=_envelope(bwd[n_pre:]) if n_pre is not None else (),
        kept=tuple(kept),
        outputs=tuple(out_bytes),
        param_grads=tuple(param_grads),
        grad_inputs=tuple(grad_inputs),
        held=tuple(held),
        host=host,
        host_copied=copied,
        end_copies=tuple(end_copies),
        end_stash=tuple(end_stash),
        end_stash_entries=stash_entries,
    )
