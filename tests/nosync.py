"""Find host syncs on a CPU-only machine: every place where a CUDA run would make the host wait for the GPU.

On CUDA the host waits for the GPU when it reads a device value (`.item()`, `bool(t)`, `.tolist()`,
`.numpy()`, `.cpu()`, ops whose output size depends on the data: `nonzero`, `masked_select`, boolean-mask
indexing, `unique`, ...) and when it copies host memory to the device with a blocking copy
(`torch.tensor(list, device=...)`, `torch.as_tensor(ndarray, device=...)`, `.to(device)` of a host
tensor: a cudaMemcpy followed by a stream synchronize). On a CPU nothing waits, so `HostSyncs` records
where such a read or copy happens instead, with two modes:
- a TorchFunctionMode sees the Python-level tensor API (numpy, tolist, cpu, to, factories with device=);
- a TorchDispatchMode sees every aten op, also those called inside torch (`_local_scalar_dense` behind
  item/bool/int/float, nonzero, masked_select, is_nonzero, equal, index with a boolean mask, ...).

Which tensors are "on the device"? On a CPU every tensor is, physically. A CUDA run keeps some torch
tensors on the host on purpose (e.g. built from numpy without device=), so the checker tracks it: a
tensor is on the device when it was made with an explicit device= (other than the literal "cpu"), moved
with .to(device), derived by any op from a device tensor, or marked with `mark_device` (the state a run
builds before the check: networks, optimizer, replay). The mark sits on the tensor's storage, so views,
`.data` and clones keep it. Host tensors may be read freely.

The Triton interpreter (TRITON_INTERPRET=1) copies kernel arguments to numpy and back; that is the
simulated GPU, not the program, so events inside it are ignored.

Each event names the innermost frame in the repository (file, line, function, source line) and the op.
"""
import linecache
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
aten = torch.ops.aten

# aten ops that read device data on the host (their result is a host value or has a data-dependent size)
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
         aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_dim.default,
         aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.bincount.default,
         aten.histc.default}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
TO_HOST = {torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__}
COPIES = {torch.tensor, torch.as_tensor, torch.asarray}


def _tensors(tree):
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def is_device(t) -> bool:
    try:
        return bool(getattr(t.untyped_storage(), "_on_device", False))
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return False


def mark_device(*objs, on=True):
    """Mark the tensors in objs (tensors, nn.Modules, optimizers, dicts, lists, objects' attributes)."""
    seen = set()

    def visit(x, depth=0):
        if id(x) in seen or depth > 4:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            x.untyped_storage()._on_device = on
        elif isinstance(x, torch.nn.Module):
            for t in list(x.parameters()) + list(x.buffers()):
                visit(t)
        elif isinstance(x, torch.optim.Optimizer):
            for state in x.state.values():
                visit(state, depth + 1)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v, depth + 1)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for v in vars(x).values():
                visit(v, depth + 1)

    for obj in objs:
        visit(obj)


def _where():
    """(file, line, function, source) of the innermost frame in the repository, or None inside Triton's
    interpreter (the simulated device)."""
    frame, found = sys._getframe(2), None
    while frame is not None:
        path = frame.f_code.co_filename
        if "triton" in path and "interpreter" in path:
            return None
        if found is None and path.startswith(REPO) and os.sep + "tests" + os.sep not in path:
            found = (os.path.relpath(path, REPO), frame.f_lineno, frame.f_code.co_name,
                     linecache.getline(path, frame.f_lineno).strip())
        frame = frame.f_back
    return found or ("?", 0, "?", "")


class _Functions(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args else None
        if func in TO_HOST and is_device(src):
            self.owner.record("d2h", f"Tensor.{func.__name__}")
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_literal_cpu(args, kwargs)):
            if is_device(src):
                self.owner.record("d2h", f"Tensor.{func.__name__}")
                out = func(*args, **kwargs).clone()  # a host copy, as on CUDA
                mark_device(out, on=False)
                return out
        out = func(*args, **kwargs)
        explicit = kwargs.get("device") is not None and kwargs.get("device") != "cpu"
        moves = func in (torch.Tensor.to, torch.Tensor.cuda) and not _to_literal_cpu(args, kwargs) and (
            func is torch.Tensor.cuda or explicit or any(isinstance(a, (str, torch.device)) for a in args[1:]))
        if isinstance(out, torch.Tensor) and (explicit or moves):
            host_source = (func in COPIES and src is not None and not (isinstance(src, torch.Tensor)
                                                                        and is_device(src))) or (
                moves and isinstance(src, torch.Tensor) and not is_device(src))
            if host_source and not kwargs.get("non_blocking", False):
                self.owner.record("h2d", getattr(func, "__name__", str(func)))
            mark_device(out)
        return out


def _to_literal_cpu(args, kwargs):
    dev = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(dev, str) and dev == "cpu"


class _Ops(TorchDispatchMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        on_device = any(is_device(t) for t in inputs)
        if on_device and func in READS:
            self.owner.record("d2h", str(func.overloadpacket.__name__))
        elif on_device and func in BOOL_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.owner.record("d2h", f"{func.overloadpacket.__name__} with a boolean mask")
        elif func is aten.copy_.default and len(args) == 2:  # dst.copy_(src) across host and device
            if is_device(args[0]) and not is_device(args[1]):
                self.owner.record("h2d", "copy_")
            elif is_device(args[1]) and not is_device(args[0]):
                self.owner.record("d2h", "copy_")
        out = func(*args, **kwargs)
        if on_device:
            for t in _tensors(out):
                mark_device(t)
        return out


class HostSyncs:
    """Context manager that records host syncs: `with HostSyncs() as syncs: ...; syncs.events`.

    Each event is (kind, op, file, line, function, source): kind "d2h" (the host reads device data) or
    "h2d" (a blocking copy of host memory to the device). `allowed` maps a name to (file, function,
    text): an event at a line of that function whose source contains text is counted under that name
    in `syncs.allowed_hits` instead of `syncs.events`.
    """

    def __init__(self, allowed=None):
        self.allowed = dict(allowed or {})
        self.events, self.allowed_hits = [], {name: 0 for name in self.allowed}
        self._modes = [_Functions(self), _Ops(self)]

    def record(self, kind, op):
        where = _where()
        if where is None:
            return
        file, line, function, source = where
        for name, (a_file, a_function, text) in self.allowed.items():
            if file == a_file and function == a_function and text in source:
                self.allowed_hits[name] += 1
                return
        self.events.append((kind, op, file, line, function, source))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self):
        return "\n".join(f"{kind} {op} at {file}:{line} in {function}(): {source}"
                         for kind, op, file, line, function, source in self.events)
