"""Gradient averaging over processes, overlapped with backward: torch DDP for whole trained models (train_db.py's
U-Net and text encoders), a bucketed all-reduce on gradient hooks for adapters (LoRA, embeddings, hypernetworks),
whose parameters live outside any module DDP could wrap.

Both only reduce on accumulation boundaries, and both leave every rank with the same averaged gradients before the
loop clips them. Under `accelerate launch --use_fsdp` the models train_db.py / sdxl_train.py train whole are sharded
instead, with PyTorch's FSDP2 (`FullySharded`): each rank keeps its shards of weights, gradients and optimizer state,
and a save gathers the full weights. Nothing here is used by a single-process run.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb: large enough to amortise a collective's latency


def plan_buckets(params: Sequence[torch.Tensor], cap_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Parameter indices in buckets of at most `cap_bytes` (a larger parameter gets a bucket of its own), from the last
    parameter to the first: backward produces gradients roughly in reverse registration order, so the first bucket
    fills first. A bucket holds one dtype and device, so it can be one flat tensor."""
    buckets: list[list[int]] = []
    current: list[int] = []
    size, kind = 0, None
    for index in reversed(range(len(params))):
        param = params[index]
        nbytes = param.numel() * param.element_size()
        if current and ((param.dtype, param.device) != kind or size + nbytes > cap_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes
        kind = (param.dtype, param.device)
    if current:
        buckets.append(current)
    return buckets


class BucketedReducer:
    """Averages the gradients of `params` over the processes of `group` in fixed buckets.

    On a boundary micro-batch each parameter's post-accumulate-grad hook marks it ready; a bucket whose parameters
    are all ready is all-reduced asynchronously, strictly in bucket order (every rank must issue the same collectives
    in the same order), so communication overlaps the rest of backward. `finish()` launches the buckets still
    waiting (a parameter without a gradient is reduced as zeros, the same on every rank), waits for all of them and
    divides by the world size. Written by hand because DDP needs a module whose forward it runs, and adapter layers
    run inside the frozen base model's forward.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], *, cap_bytes: int = BUCKET_BYTES, group=None):
        self.params, self.group = list(params), group
        self.world = dist.get_world_size(group)
        self.buckets = plan_buckets(self.params, cap_bytes)
        self.bucket_of = {index: b for b, bucket in enumerate(self.buckets) for index in bucket}
        self._hooks = [p.register_post_accumulate_grad_hook(partial(self._ready, i)) for i, p in enumerate(self.params)]
        self._armed = False
        self._reset()

    def _reset(self) -> None:
        self._waiting = [len(bucket) for bucket in self.buckets]
        self._seen = [False] * len(self.params)
        self._launched: list[tuple[int, torch.Tensor, object]] = []

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        """Hooks launch reductions only in the backward of a boundary micro-batch (gradients are complete then)."""
        self._armed = boundary
        try:
            yield
        finally:
            self._armed = False

    def _ready(self, index: int, param: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        if self._seen[index]:
            # Its bucket may have been sent already without this part: the average would silently be wrong.
            raise RuntimeError(f"gradient of parameter {index} accumulated twice in one backward (reentrant "
                               "checkpointing?): the bucketed all-reduce needs one gradient per parameter")
        self._seen[index] = True
        self._waiting[self.bucket_of[index]] -= 1
        while len(self._launched) < len(self.buckets) and self._waiting[len(self._launched)] == 0:
            self._launch(len(self._launched))

    def _launch(self, b: int) -> None:
        params = [self.params[i] for i in self.buckets[b]]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        self._launched.append((b, flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    def finish(self) -> None:
        """Launch the rest in order, wait, and put the averages in place as each parameter's gradient."""
        while len(self._launched) < len(self.buckets):
            self._launch(len(self._launched))
        for b, flat, work in self._launched:
            work.wait()
            flat.div_(self.world)
            offset = 0
            for index in self.buckets[b]:
                param = self.params[index]
                param.grad = flat[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
        self._reset()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class _TrainedModels(torch.nn.Module):
    """DDP's module: the trained models as children (so DDP buckets their parameters) and a forward that computes the
    whole loss, so the U-Net and text encoder calls inside it, made by the method as usual, are the DDP forward."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        super().__init__()
        self.trained = torch.nn.ModuleList(modules)

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


class GradientSync:
    """What the loop uses under several processes: `loss(compute)` runs the loss (through DDP where it wraps the
    models), `micro_batch(boundary)` around forward and backward, `finish()` before clipping. `key` names the set of
    parameters it was built for: when a method freezes some mid-run, the loop builds a new one."""

    def __init__(self, key: tuple[int, ...], ddp: DistributedDataParallel | None, reducer: BucketedReducer | None):
        self.key, self.ddp, self.reducer = key, ddp, reducer

    def loss(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.ddp(compute) if self.ddp is not None else compute()

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.ddp is not None and not boundary:
                stack.enter_context(self.ddp.no_sync())  # accumulate locally; the boundary's backward reduces all
            if self.reducer is not None:
                stack.enter_context(self.reducer.micro_batch(boundary))
            yield

    def finish(self) -> None:
        if self.reducer is not None:
            self.reducer.finish()

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.close()
        if self.ddp is not None:
            # DDP's hooks live until its reducer is freed; collect now so an old wrapper never reacts to a later step.
            self.ddp = None
            gc.collect()


def check_ddp_options(config) -> None:
    """DDP's static graph cannot skip the all-reduce between accumulation boundaries (its no_sync fails an internal
    assertion on the first step), so the combination is one line, at any process count."""
    from library.errors import UserError

    if config.get("ddp_static_graph") and (config.get("gradient_accumulation_steps") or 1) > 1:
        raise UserError("--ddp_static_graph with --gradient_accumulation_steps > 1: DDP cannot accumulate gradients "
                        "locally on a static graph; drop --ddp_static_graph")


def trainable_key(params: Sequence[torch.nn.Parameter]) -> tuple[int, ...]:
    return tuple(id(p) for p in params if p.requires_grad)


def gradient_sync(method, params: Sequence[torch.nn.Parameter], *, first: bool,
                  static_graph: bool = False) -> GradientSync:
    """DDP over the modules the method trains whole (`data_parallel_modules()`, where it has that hook), the bucketed
    reducer over any other trained parameter. `first`: DDP broadcasts rank 0's weights once; a rebuild mid-run
    (after a freeze) starts from weights DDP kept equal. `static_graph` (--ddp_static_graph): DDP may assume the
    same parameters are used every step. Gradients are always views into DDP's buckets (--ddp_gradient_as_bucket_view
    is the default here: one copy of the gradients less)."""
    params = [p for p in params if p.requires_grad]
    hook = getattr(method, "data_parallel_modules", None)
    modules, find_unused = hook() if hook is not None else ([], False)
    wrapped = {id(p) for m in modules for p in m.parameters() if p.requires_grad}
    ddp = None
    if wrapped:
        # broadcast_buffers off: the models have no running statistics, and a broadcast per forward costs time.
        ddp = DistributedDataParallel(_TrainedModels(modules), broadcast_buffers=False, init_sync=first,
                                      find_unused_parameters=find_unused, gradient_as_bucket_view=True,
                                      static_graph=static_graph)
    rest = [p for p in params if id(p) not in wrapped]
    return GradientSync(trainable_key(params), ddp, BucketedReducer(rest) if rest else None)


# ---------------------------------------------------------------------------------------------------- FSDP
SHARDING_SPELLINGS = {"true": True, "1": True, "full_shard": True, "false": False, "2": False, "shard_grad_op": False}


def sharding_requested(environ=None) -> dict | None:
    """`accelerate launch --use_fsdp` exports ACCELERATE_USE_FSDP=true and its FSDP_* settings: the ones FSDP2 has
    here (reshard after forward, or FULL_SHARD / SHARD_GRAD_OP; parameters offloaded to CPU), or None without it."""
    import os

    from library.errors import UserError

    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return None
    spelled = environ.get("FSDP_RESHARD_AFTER_FORWARD") or environ.get("FSDP_SHARDING_STRATEGY") or "true"
    reshard = SHARDING_SPELLINGS.get(spelled.lower())
    if reshard is None:
        raise UserError(f"accelerate launch --use_fsdp: sharding strategy / reshard_after_forward {spelled!r} is not "
                        "supported; use FULL_SHARD (true) or SHARD_GRAD_OP (false), or launch without --use_fsdp")
    return {"reshard_after_forward": reshard,
            "offload": environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("true", "1")}


@contextlib.contextmanager
def hidden_from_accelerate(*names: str) -> Iterator[None]:
    """Build the Accelerator as for plain data parallel: FSDP (ACCELERATE_USE_FSDP) and DeepSpeed
    (ACCELERATE_USE_DEEPSPEED) shard the models here (FSDP2's fully_shard; library/training/zero.py's engine), and
    accelerate's own modes would expect to prepare them itself (on CPUs it ignores --use_fsdp anyway, and refuses
    DeepSpeed)."""
    import os

    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def refuse_unshardable(method, config) -> None:
    """What FSDP does not cover (yet), each as one line, before any weight is sharded."""
    from library.errors import UserError

    if not hasattr(method, "data_parallel_modules"):
        raise UserError("accelerate launch --use_fsdp: only full fine-tuning (train_db.py, sdxl_train.py) is sharded; "
                        "an adapter's frozen base model is not (a different feature): launch without --use_fsdp (DDP)")
    refused = [
        (config.get("use_ema"), "--use_ema", "drop it"),
        (config.get("save_state") or config.get("save_state_on_train_end") or config.get("resume"),
         "--save_state / --resume", "sharded optimizer states are not saved yet; drop them"),
    ]
    for bad, option, fix in refused:
        if bad:
            raise UserError(f"accelerate launch --use_fsdp with {option}: not supported under FSDP; {fix}, or launch "
                            "without --use_fsdp (DDP)")


def _meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters are empty meta tensors (no memory) and whose buffers are CPU copies: the
    unsharded shape a gathered full state dict is loaded into for a save."""
    import copy

    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in module.parameters()}
    memo |= {id(b): b.detach().to("cpu", copy=True) for b in module.buffers()}
    return copy.deepcopy(module, memo)


class FullySharded:
    """The trained models sharded with FSDP2 (`fully_shard`: each U-Net block and text-encoder layer, then each
    model), in the loop's GradientSync shape: forward and backward gather and reduce-scatter by themselves, so
    `loss` only calls, `micro_batch` turns the reduce-scatter off between accumulation boundaries (gradients then
    accumulate unsharded, as DDP's no_sync does) and `finish` has nothing to wait for. Must run before the optimizer
    is built: the models' parameters become DTensor shards."""

    def __init__(self, modules: Sequence[torch.nn.Module], *, reshard_after_forward: bool = True,
                 offload: bool = False):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        self.modules = list(modules)
        self.skeletons = [_meta_skeleton(m) for m in self.modules]  # taken before sharding: the unsharded layout
        on_cpu = next(self.modules[0].parameters()).device.type == "cpu"
        # Offloading moves shards to CPU memory between uses: nothing to do when training runs on the CPU.
        policy = CPUOffloadPolicy() if offload and not on_cpu else OffloadPolicy()
        for module in self.modules:
            for unit in (*_shard_units(module), module):
                recorded = _recorded_outputs(unit)
                fully_shard(unit, reshard_after_forward=reshard_after_forward, offload_policy=policy)
                _recorded_outputs(unit, recorded)

    def loss(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()

    @contextlib.contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        for module in self.modules:
            module.set_requires_gradient_sync(boundary)
        yield

    def finish(self) -> None:
        pass  # the boundary's backward reduce-scattered the averaged gradients into the shards

    def close(self) -> None:
        pass

    def gather(self) -> list[torch.nn.Module] | None:
        """A collective (every process must call it): the full weights, in unsharded CPU copies of the models, on
        the main process (rank 0); None elsewhere."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # held by rank 0 only, in CPU memory
        states = [get_model_state_dict(m, options=options) for m in self.modules]
        if dist.get_rank() != 0:
            return None
        full = []
        for skeleton, state in zip(self.skeletons, states):
            copy = _meta_skeleton(skeleton)
            copy.load_state_dict(state, assign=True)
            full.append(copy.requires_grad_(False).eval())
        return full

    @contextlib.contextmanager
    def full_weights(self, method) -> Iterator[None]:
        """On every process, around a save: on the main process `method.parts` holds unsharded models with the full
        trained weights for the duration, so its export writes the same files as without FSDP."""
        import dataclasses

        full = self.gather()
        if full is None:
            yield
            return
        swap = {id(m): f for m, f in zip(self.modules, full)}
        parts = method.parts
        method.parts = dataclasses.replace(parts, unet=swap.get(id(parts.unet), parts.unet),
                                           text_encoders=tuple(swap.get(id(t), t) for t in parts.text_encoders))
        try:
            yield
        finally:
            method.parts = parts


def _shard_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks sharded on their own, so only one block's full weights are gathered at a time: a U-Net's down, mid
    and up blocks, a CLIP text model's transformer layers (and the parts called outside its forward)."""
    units = [*getattr(module, "down_blocks", ()), *([module.mid_block] if getattr(module, "mid_block", None) else []),
             *getattr(module, "up_blocks", ())]
    text_model = getattr(module, "text_model", module)  # transformers 5: no text_model
    units += list(getattr(getattr(text_model, "encoder", None), "layers", ()))
    # Called outside the model's forward (the final norm under --clip_skip, SDXL's pooled projection): as units of
    # their own they gather their weights when called.
    outside = (getattr(text_model, "final_layer_norm", None), getattr(module, "text_projection", None))
    return units + [m for m in outside if m is not None]


def _recorded_outputs(module: torch.nn.Module, entry=None):
    """transformers (5) finds which outputs a model records (hidden_states for --clip_skip) by its class's name, and
    fully_shard gives the module a new class (FSDP<name>): read the entry before sharding, register it again after."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers 4 returns hidden states without a registry
        return None
    if entry is None:
        return _CAN_RECORD_REGISTRY.get(module) or None
    _CAN_RECORD_REGISTRY[module] = entry
    return entry


def fully_shard_trained(method, config, settings: dict, *, processes: int) -> FullySharded | None:
    """FSDP over the models the method trains whole, before the optimizer; what it does not cover is refused even on
    one process (which trains unsharded), so a run behaves the same at any process count."""
    refuse_unshardable(method, config)
    if processes == 1:
        return None
    modules, _ = method.data_parallel_modules()
    if not modules:  # nothing trains whole (--learning_rate 0 and a frozen text encoder): nothing to shard
        return None
    sharded = FullySharded(modules, **settings)
    if dist.get_rank() == 0:
        print(f"FSDP: {len(modules)} trained model(s) sharded over {processes} processes (fully_shard per block; "
              f"reshard after forward: {settings['reshard_after_forward']}, CPU offload: {settings['offload']})")
    return sharded
