"""A second device on a CPU-only machine, for tests of device placement: `with other_device(): model.to(DEVICE)`.

The bug this exists for: code that builds a tensor on the CPU and hands it to a model on a GPU
(`align eval` did, in its KL: "Expected all tensors to be on the same device ... index_select").
A CPU-only machine cannot show it, and neither of torch's own stand-ins catches it here:
`FakeTensorMode` does check devices, but on a CPU-only build it cannot move a tensor to "cuda"
(`.to("cuda")` fails before any mode sees it) and its backward aborts the process; the `meta`
device accepts a CPU index into a meta weight without a word, and has no values to generate with.

So the second device is `meta:0` as far as every `.device` says (with an index: peft and
transformers take a plain `meta` device for "weights not loaded yet" and skip such layers), but
each such tensor (`OnDevice`)
holds a real CPU tensor and computes with it: generation, `.item()`, `.tolist()` and backward all
work and give the CPU's values. What a GPU refuses is refused here too, with CUDA's message:
an op mixing a tensor on the device with a CPU tensor of one or more dimensions (a 0-dim CPU
tensor is allowed, as CUDA treats it as a scalar; CPU indices into a device tensor are allowed,
as on CUDA), and `.numpy()` of a device tensor. Moving to the device (`.to(DEVICE)`, factories
with `device=DEVICE`, `torch.tensor(..., device=DEVICE)`) makes an `OnDevice`; `.cpu()` unwraps.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import _is_tensor_constructor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing

DEVICE = torch.device("meta", 0)  # not == torch.device("meta"), see above
aten = torch.ops.aten

# Ops that may take tensors on both devices, as on CUDA: copies, and CPU indices into a device tensor.
MIXED_DEVICE_OPS = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
                    aten.index_put.default, aten._index_put_impl_.default}
# Factories whose result lands on `device=` (besides the constructors torch lists itself).
LIKE_FACTORIES = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                  aten.rand_like.default, aten.randn_like.default, aten.randint_like.default,
                  aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
                  aten.new_empty_strided.default}


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class OnDevice(torch.Tensor):
    """A tensor whose `.device` is DEVICE, computing with the CPU tensor it holds (`elem`)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    # torch reads is_meta (from the device type) as "no data here": load_state_dict would skip copying
    # into such a parameter, where a GPU copies. This one has data.
    is_meta = property(lambda self: False)

    def __tensor_flatten__(self):
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return OnDevice(inner["elem"])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist:  # torch refuses tolist() on a subclass; a GPU tensor allows it
            return args[0].elem.tolist()
        if func is torch.Tensor.numpy:
            raise TypeError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        # Not Tensor's default, which would cast every result (a `.cpu()` copy too) to this class.
        return torch._C._disabled_torch_function_impl(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MIXED_DEVICE_OPS:
            leaves = pytree.tree_leaves((args, kwargs))
            host = [t for t in leaves if type(t) is torch.Tensor and t.device.type == "cpu" and t.dim() > 0]
            if host:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two devices, {DEVICE} and "
                    f"cpu! ({func}: a CPU tensor of shape {tuple(host[0].shape)})")
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                      aten._index_put_impl_.default) and not isinstance(args[0], OnDevice):
            raise RuntimeError(f"indices should be either on cpu or on the same device as the indexed tensor (cpu) "
                               f"({func})")
        inner_args, inner_kwargs = pytree.tree_map_only(OnDevice, lambda t: t.elem, (args, kwargs))
        if func is aten._to_copy.default and inner_kwargs.get("device") is not None:
            if torch.device(inner_kwargs["device"]).type == "cpu":
                return func(*inner_args, **inner_kwargs)  # to the host: a plain CPU tensor
            inner_kwargs = {**inner_kwargs, "device": torch.device("cpu")}
        out = func(*inner_args, **inner_kwargs)
        out = pytree.tree_map_only(torch.Tensor, lambda t: t if isinstance(t, OnDevice) else OnDevice(t), out)
        return return_and_correct_aliasing(func, args, kwargs, out)


class _Factories(TorchDispatchMode):
    """Every tensor made on (or copied to) DEVICE becomes an OnDevice, whoever makes it (Python or C++)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_device(kwargs.get("device")) and (
                _is_tensor_constructor(func) or func in LIKE_FACTORIES or func is aten._to_copy.default):
            if func is aten._to_copy.default and isinstance(args[0], OnDevice):
                return func(*args, **kwargs)
            return OnDevice(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


class _DataFactories(TorchFunctionMode):
    """`torch.tensor(data, device=DEVICE)` copies its data below the dispatcher: wrap it here instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _on_device(kwargs.get("device")):
            return OnDevice(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def other_device():
    """While inside, DEVICE behaves as a second device with values; see the module docstring."""
    with _DataFactories(), _Factories():
        yield


def unwrap(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor behind an OnDevice (a plain tensor is returned as it is)."""
    return t.elem if isinstance(t, OnDevice) else t
