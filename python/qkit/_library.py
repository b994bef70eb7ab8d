"""The toolkit for defining qkit's ops, and the fast path on private torch APIs.

Defining: :func:`define` (a schema, with the load diagnosis as its kernel when ``_C`` is
missing), :func:`register_autograd_rules` (how autograd treats an op with no derivative),
:func:`register_straight_through` (the straight-through estimator of a fake quantization,
in every autograd mode and torch.func transform) and the vmap helpers
:func:`batch_first`, :func:`sample_like` and :func:`each_sample`. The ops themselves, one
section each, are in :mod:`qkit.ops`, :mod:`qkit.fp_ops` and :mod:`qkit.zeropp_ops`.

The fast path: :func:`kernel_keys` and :func:`straight_to_kernel` let a typed wrapper call
qkit's own kernel straight, past the dispatcher's Python layers, where nothing could act
on the call. Every private torch name it reads is looked up once, here, with a fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from qkit import _loader
from qkit._checks import check_vmap_same_device, functorch_unsupported_error, requires_grad_error, tangent_error

_loader.load()
lib = torch.library.Library("qkit", "DEF")


#: Names of every op qkit defines, in definition order.
DEFINED_OPS: list[str] = []


def define(schema: str, *, seeded: bool = False) -> None:
    """Define ``qkit::<schema>``; without ``_C`` its CPU/CUDA calls raise the load diagnosis."""
    tags = (torch.Tag.nondeterministic_seeded,) if seeded else ()
    lib.define(schema, tags=tags)
    name = schema.split("(", 1)[0]
    DEFINED_OPS.append(name)
    error = _loader.load_error()
    if error is not None:

        def raiser(*args, **kwargs):
            raise error

        for key in ("CPU", "CUDA"):
            lib.impl(name, raiser, key)


# ---------------------------------------------------------------- private torch APIs
# The fast paths read torch internals that any torch release may rename. Each is looked
# up once, here, by name; where one is missing, the path that needs it falls back to the
# plain dispatcher call (slower, same results), so no rename can break `import qkit`.
# tests/test_private_api_fallback.py deletes each name in turn and compares results.

#: The private torch names this torch lacks, as "torch._C._after_autograd_keyset"; empty on a
#: torch qkit was written against.
MISSING_PRIVATE_APIS: list[str] = []


def _private(owner: object, owner_name: str, name: str) -> Any:
    """``owner.name``, or ``None`` (recorded in :data:`MISSING_PRIVATE_APIS`) where it is absent."""
    value = getattr(owner, name, None)
    if value is None:
        MISSING_PRIVATE_APIS.append(f"{owner_name}.{name}")
    return value


def _below_autograd_keyset() -> torch._C.DispatchKeySet | None:
    """The keys below Autograd, which an Autograd kernel redispatches to; ``None`` when this
    torch offers no way to name them (then the Autograd kernels become fallthroughs)."""
    keys = _private(torch._C, "torch._C", "_after_autograd_keyset")
    if keys is not None:
        return keys
    # The same set, built the way torch builds it: every key after AutogradOther.
    full_after = _private(torch._C, "torch._C", "_dispatch_keyset_full_after")
    dispatch_key = getattr(torch._C, "DispatchKey", None)
    if full_after is None or dispatch_key is None:
        return None
    return full_after(dispatch_key.AutogradOther)


BELOW_AUTOGRAD = _below_autograd_keyset()

# Private torch state, read only where present; without it every call takes the
# (correct, slower) per-tensor look at the tangent.
_fw_grad_enabled = _private(torch._C, "torch._C", "_is_fwd_grad_enabled") or (lambda: True)
if isinstance(_private(_forward_ad, "torch.autograd.forward_ad", "_current_level"), int):

    def _dual_level_open() -> bool:
        return _forward_ad._current_level >= 0

else:

    def _dual_level_open() -> bool:
        return True


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``forward_ad.dual_level``, which
    ``torch.func.jvp`` uses too) with forward gradients enabled: only then can a
    tensor carry a tangent."""
    return _dual_level_open() and _fw_grad_enabled()


def has_tangent(t: Tensor) -> bool:
    """Whether ``t`` is a dual tensor at the current forward-AD level."""
    return _forward_ad.unpack_dual(t).tangent is not None


def register_autograd_rules(
    name: str, *, mutates: str | tuple[str, ...] = (), no_grad_for: tuple[str, ...] = (), hint: str = ""
) -> None:
    """How autograd treats ``qkit::<name>`` (``"op"`` or ``"op.overload"``), an op with no
    derivative formula.

    Its outputs carry no gradient. Arguments in ``no_grad_for`` and the mutated
    arguments ``mutates`` must not require grad while grad mode is on (a clear error
    instead of a gradient that silently stops or goes wrong), and each mutated
    argument's version counter is bumped, as every aten in-place op does, so
    autograd notices when a saved tensor was overwritten. An op with nothing to
    guard gets a fallthrough: no Python runs per call at the Autograd key.
    """
    op_name, _, overload = name.partition(".")
    op = getattr(getattr(torch.ops.qkit, op_name), overload or "default")
    names = [a.name for a in op._schema.arguments]
    mutated = (mutates,) if isinstance(mutates, str) else mutates
    guarded = [*no_grad_for, *mutated]
    if not guarded or BELOW_AUTOGRAD is None:
        # Without the below-Autograd keys there is no way down from a Python Autograd
        # kernel: torch's own fallback handles the op (no guard errors, same results).
        lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
        return

    positions = [(names.index(arg_name), arg_name) for arg_name in guarded]
    mutated_positions = positions[len(no_grad_for) :]
    redispatch = op.redispatch
    below_autograd = BELOW_AUTOGRAD
    grad_enabled = torch.is_grad_enabled
    bump = torch.autograd.graph.increment_version

    def arg(args: tuple, kwargs: dict, index: int, arg_name: str) -> Tensor:
        return args[index] if index < len(args) else kwargs[arg_name]

    # Runs on every call, so it is kept lean: no dispatch guard (the kernels only
    # allocate and copy tensors that do not require grad, so nothing below would
    # record history) and the argument positions are looked up once, here.
    def autograd_kernel(keyset: torch._C.DispatchKeySet, *args, **kwargs):
        if grad_enabled():
            for index, arg_name in positions:
                if arg(args, kwargs, index, arg_name).requires_grad:
                    raise requires_grad_error(op_name, arg_name, name, hint)
        if forward_ad_active():
            # Forward mode has no "requires grad" flag: the tangent itself is the signal.
            # Dropping it would hand the caller a silent zero (torch.func.jvp) or None.
            for index, arg_name in positions:
                if has_tangent(arg(args, kwargs, index, arg_name)):
                    raise tangent_error(op_name, arg_name, name)
        result = redispatch(keyset & below_autograd, *args, **kwargs)
        # The version bump aten does at ADInplaceOrView, done here to save a second
        # Python kernel per call (inference mode skips both keys, and needs no bump).
        for index, arg_name in mutated_positions:
            bump(arg(args, kwargs, index, arg_name))
        return result

    lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling
# What the straight-call gate reads (kernel_keys); any one missing turns straight calls off.
functorch_active = _private(torch._C, "torch._C", "_are_functorch_transforms_active")
_dispatch_modes = _private(torch._C, "torch._C", "_len_torch_dispatch_stack")
_function_modes = _private(torch._C, "torch._C", "_is_torch_function_mode_enabled")
_profiling = _private(torch.autograd, "torch.autograd", "_profiler_enabled")
_jit_tracing = _private(torch._C, "torch._C", "_get_tracing_state")
_redispatch_boxed = _private(
    getattr(torch.ops.aten.empty.memory_format, "_handle", None), "OpOverload._handle", "redispatch_boxed"
)
_strided = torch.strided
KernelKeys = getattr(torch._C, "DispatchKeySet", object)


def _kernel_keys_on(backend_name: str) -> torch._C.DispatchKeySet | None:
    # With the view-bit keys in the set, their fallbacks still resolve a negative, conjugate
    # or zero view before qkit's kernel runs, just as a normal call would, for ~0.1 us.
    try:
        key_set, key = torch._C.DispatchKeySet, torch._C.DispatchKey
        keys = key_set(getattr(key, backend_name))
        for view_key in (key.Conjugate, key.Negative, key.ZeroTensor):
            keys = keys | key_set(view_key)
    except (AttributeError, TypeError):  # torch renamed or reshaped its dispatch keys
        MISSING_PRIVATE_APIS.append(f"torch._C.DispatchKeySet(DispatchKey.{backend_name})")
        return None
    return keys


_CPU_KEYS = _kernel_keys_on("CPU")
_CUDA_KEYS = _kernel_keys_on("CUDA")
_GATE = (functorch_active, _dispatch_modes, _function_modes, _profiling, _jit_tracing, _redispatch_boxed)
#: Whether the wrappers may call qkit's kernels straight (every private name they need is here).
STRAIGHT_CALLS = all(part is not None for part in (*_GATE, _CPU_KEYS, _CUDA_KEYS))  # `is`: keysets lack None ==
if functorch_active is None:
    # Read below outside the gate too: "maybe active" sends the straight-through estimator
    # down its single-level path, which is right with and without a transform.
    def functorch_active() -> bool:
        return True


def _device_keys(t: Tensor) -> KernelKeys | None:
    return _CPU_KEYS if t.is_cpu else _CUDA_KEYS if t.is_cuda else None


def _plain(t: Tensor) -> bool:
    return type(t) is Tensor and t.layout is _strided and not t.is_nested


def _kernel_keys(a: Tensor, b: Tensor | None = None, c: Tensor | None = None) -> KernelKeys | None:
    """The key set that reaches qkit's own CPU or CUDA kernel, when a call on ``a`` (and
    ``b``, ``c``) may go straight there; ``None`` when the op must be called the normal way.

    Straight means ``op._handle.redispatch_boxed(keys, ...)``: no Python autograd kernel,
    no dispatch-key computation from the arguments, no torch-function handling; about
    a third of a small call's time. It is only taken where none of those could act:
    strided plain Tensors (no subclass, FakeTensor, proxy, sparse or nested tensor) of one
    device kind, none requiring grad (or grad mode off), no dispatch or torch-function
    mode, no profiler (a redispatch records no op event), outside torch.compile and
    torch.jit tracing and functorch transforms, and with no forward-AD level open. After a
    straight call to an op that writes into an argument, the caller bumps that argument's
    version (:func:`bump`), as the skipped Autograd kernel would have.
    """
    # Spelled out for three tensors, cheapest tests first: every 30 ns is 1% of a call.
    if _compiling() or functorch_active() or _dispatch_modes() or _function_modes() or _profiling() or _jit_tracing():
        return None
    if _dual_level_open():  # a tensor may carry a forward-mode tangent: the Autograd kernel decides
        return None
    if not (_plain(a) and (b is None or _plain(b)) and (c is None or _plain(c))):
        return None
    wants_grad = a.requires_grad or (b is not None and b.requires_grad) or (c is not None and c.requires_grad)
    if wants_grad and _grad_enabled():
        return None
    keys = _device_keys(a)
    if (b is not None and _device_keys(b) is not keys) or (c is not None and _device_keys(c) is not keys):
        return None
    return keys


def _no_kernel_keys(a: Tensor, b: Tensor | None = None, c: Tensor | None = None) -> KernelKeys | None:
    """:func:`kernel_keys` on a torch without the private names it reads: never straight."""
    return None


# Chosen once, here, so that a working torch pays no per-call test for the fallback.
kernel_keys = _kernel_keys if STRAIGHT_CALLS else _no_kernel_keys


#: Marks a tensor (or each of several) as written in place, for autograd's saved-tensor check.
bump = torch.autograd.graph.increment_version


def straight_to_kernel(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """``op``'s call at a given key set, for the keys :func:`kernel_keys` returns; without
    straight calls (never taken then), the plain call, ignoring the keys."""
    if STRAIGHT_CALLS:
        return op._handle.redispatch_boxed

    def plain(keys: KernelKeys, *args: Any, **kwargs: Any) -> Any:
        return op(*args, **kwargs)

    return plain


# fake_quantize's straight-through estimator is applied from inside its Autograd kernel, where a functorch
# transform is already being processed: torch.autograd.Function.apply would hand it to
# functorch's custom_function_call, which cannot be dispatched from there. The
# single-level base class applies it at the current level instead, exactly as a C++
# derivative formula would be; functorch itself applies such Functions the same way.
SingleLevelFunction = getattr(torch.autograd.function, "_SingleLevelFunction", None)
fw_grad_mode = getattr(_forward_ad, "_set_fwd_grad_enabled", None)
try:
    from torch._functorch.utils import enable_single_level_autograd_function as single_level_allowed
except ImportError:  # a torch without it: torch.autograd works, torch.func transforms are refused
    single_level_allowed = None
FUNCTORCH_READY = None not in (SingleLevelFunction, fw_grad_mode, single_level_allowed)
if fw_grad_mode is None:

    def fw_grad_mode(enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


# ---------------------------------------------------------------- the straight-through estimator


def register_straight_through(name: str) -> None:
    """The Autograd kernel of ``qkit::<name>``, a fake quantization (input first, output of
    its shape): the straight-through estimator d out / d input := 1, for backward (the
    gradient passes through) and forward mode (the tangent passes through), in plain
    autograd, ``forward_ad`` and every torch.func transform. Calls where nothing
    differentiates redispatch straight below Autograd."""
    op_name = name
    op = getattr(torch.ops.qkit, name).default
    redispatch = op.redispatch
    if BELOW_AUTOGRAD is None:
        # No way below Autograd from Python (see register_autograd_rules): torch's own
        # helper gives the backward estimator (no forward mode, no torch.func transforms).
        no_gradients = (None,) * (len(op._schema.arguments) - 1)

        def no_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
            pass

        def pass_gradient(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
            return (grad, *no_gradients)

        try:
            torch.library.register_autograd(f"qkit::{name}", pass_gradient, setup_context=no_context, lib=lib)
        except AttributeError:  # the helper reads torch._C.DispatchKeySet too: no estimator at all
            lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
        return
    below_autograd = BELOW_AUTOGRAD
    grad_enabled = torch.is_grad_enabled

    class StraightThrough(SingleLevelFunction if FUNCTORCH_READY else torch.autograd.Function):
        """One call of the op at one autograd level, differentiated straight through."""

        @staticmethod
        def forward(keyset: torch._C.DispatchKeySet, input: Tensor, *args: Any) -> Tensor:
            # Past this level's Autograd key, with both grad modes back on: apply() turned them
            # off, and an enclosing torch.func level below must still record the call.
            with torch.enable_grad(), fw_grad_mode(True):
                return redispatch(keyset & below_autograd, input, *args)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
            ctx.others = (None,) * (len(inputs) - 2)  # the estimator needs nothing from the forward

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
            return (None, grad, *ctx.others)

        @staticmethod
        def jvp(ctx: Any, keyset_tangent: None, tangent: Tensor, *_: object) -> Tensor:
            return tangent

    StraightThrough.__name__ = StraightThrough.__qualname__ = f"{name}_straight_through"

    def autograd_kernel(keyset: torch._C.DispatchKeySet, input: Tensor, *args: Any) -> Tensor:
        # The estimator only where something differentiates: a tensor that requires grad
        # (under torch.func.grad/vjp, the transform's wrapper does) or carries a tangent
        # (forward_ad, torch.func.jvp). Otherwise a plain redispatch.
        if (input.requires_grad and grad_enabled()) or (forward_ad_active() and has_tangent(input)):
            if not functorch_active():
                return StraightThrough.apply(keyset, input, *args)
            if not FUNCTORCH_READY:
                raise functorch_unsupported_error(op_name)
            with single_level_allowed():
                return StraightThrough.apply(keyset, input, *args)
        return redispatch(keyset & below_autograd, input, *args)

    lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


# ---------------------------------------------------------------- vmap helpers

# Generator state by device type, to replay one draw for every sample (randomness="same").
_RNG_STATE: dict[str, tuple[Callable[[torch.device], Tensor], Callable[[Tensor, torch.device], None]]] = {
    "cpu": (lambda device: torch.get_rng_state(), lambda state, device: torch.set_rng_state(state)),
    "cuda": (torch.cuda.get_rng_state, torch.cuda.set_rng_state),
}


def batch_first(t: Tensor, bdim: int | None, batch: int) -> Tensor:
    """A batching rule's argument with its batch dimension first: ``t`` moved (``bdim``) or,
    unbatched (``None``), expanded to ``batch`` samples (a view, no copy)."""
    if bdim is None:
        return t.unsqueeze(0).expand(batch, *t.shape)
    return t.movedim(bdim, 0)


def sample_like(x: Tensor) -> Tensor:
    """A meta tensor of one sample's shape and dtype of batch-first ``x`` (exists for an empty
    batch too): what the unbatched call's argument checks look at."""
    return torch.empty(x.shape[1:], dtype=x.dtype, device="meta")


def each_sample(call: Callable[..., Any], *batches: Tensor, same_draw: str | None = None) -> Any:
    """``call`` on each sample of the batch-first ``batches`` (the ``i``-th slice of each), the
    results stacked along a new first dimension (a tuple of results: each part stacked).
    ``same_draw="<op>"``: every sample with one generator state, vmap's randomness="same".
    At least one sample."""
    if same_draw is not None:
        device = batches[0].device
        check_vmap_same_device(device, same_draw)
        get_state, set_state = _RNG_STATE[device.type]
        state = get_state(device)
    results = []
    for samples in zip(*batches, strict=True):
        if same_draw is not None:
            set_state(state, device)
        results.append(call(*samples))
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results, strict=True))
    return torch.stack(results)
