"""Modules whose weights live in pinned host memory and visit the GPU one at a time while they run:
the DiT's blocks beyond what a small card holds, and the T5 encoder's blocks on cards that cannot
keep it resident (memory.py decides which).

`ModuleStream` keeps a pinned host copy of each module's tensors and two sets of GPU buffers shaped
like them (the modules must be alike: the DiT's blocks, or T5's). `enter(i)` puts module i's
tensors in a buffer set (copied on a side stream, started early by `prefetch`, waited for by the
computing stream) and points its parameters' `.data` there; `leave(i)` points them back at the host
copy. So the math, compiled graphs included, sees ordinary GPU parameters; a copy overlaps the
previous module's compute; and no more than two modules are on the GPU at once.
"""
from __future__ import annotations

from typing import Sequence

import torch

SLOTS = 2  # buffer sets: one in use, one being filled


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers, in a fixed order (the slots are laid out by it)."""
    return [*module.parameters(), *(b for b in module.buffers() if b is not None)]


class ModuleStream:
    """Alike modules streamed to `device` one at a time (see the module docstring)."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.modules, self.device = list(modules), device
        layouts = {tuple((t.shape, t.dtype) for t in _tensors(m)) for m in self.modules}
        if len(layouts) != 1:
            raise ValueError("streamed modules must have the same tensors (shapes and dtypes)")
        self.host: list[list[torch.Tensor]] = []
        for module in self.modules:
            copies = []
            for tensor in _tensors(module):
                host = tensor.data.to("cpu")
                if device.type == "cuda":
                    host = host.pin_memory()
                tensor.data = host
                copies.append(host)
            self.host.append(copies)
        self.slots = [[torch.empty_like(t, device=device) for t in self.host[0]]
                      for _ in range(SLOTS)]
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.filled: list[torch.cuda.Event | None] = [None] * SLOTS  # copy into the slot done
        self.released: list[torch.cuda.Event | None] = [None] * SLOTS  # its last use done
        self.holder: list[int | None] = [None] * SLOTS  # which module's tensors a slot holds

    @property
    def bytes_per_module(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host[0])

    def _slot(self, index: int) -> int:
        return index % SLOTS

    def prefetch(self, index: int) -> None:
        """Start copying module `index` to its slot (no-op when it is there or out of range)."""
        if not 0 <= index < len(self.modules):
            return
        slot = self._slot(index)
        if self.holder[slot] == index:
            return
        targets, sources = self.slots[slot], self.host[index]
        if self.copy_stream is None:
            for target, source in zip(targets, sources):
                target.copy_(source)
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.released[slot] is not None:
                    self.copy_stream.wait_event(self.released[slot])  # its last user is done
                for target, source in zip(targets, sources):
                    target.copy_(source, non_blocking=True)
                self.filled[slot] = torch.cuda.Event()
                self.filled[slot].record(self.copy_stream)
        self.holder[slot] = index

    def enter(self, index: int) -> None:
        """Module `index`'s tensors on the device for the computing stream, from now until
        `leave(index)`."""
        self.prefetch(index)
        slot = self._slot(index)
        if self.copy_stream is not None and self.filled[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.filled[slot])
        for tensor, on_device in zip(_tensors(self.modules[index]), self.slots[slot]):
            tensor.data = on_device

    def leave(self, index: int) -> None:
        """Module `index` back to its host copy; its slot is free once the queued work using it
        is done."""
        slot = self._slot(index)
        if self.copy_stream is not None:
            self.released[slot] = torch.cuda.Event()
            self.released[slot].record(torch.cuda.current_stream(self.device))
        for tensor, host in zip(_tensors(self.modules[index]), self.host[index]):
            tensor.data = host

    def forget(self) -> None:
        """The host copies changed (a LoRA merge): slots may hold stale values."""
        self.holder = [None] * SLOTS

    def hook(self) -> None:
        """Stream the modules around their own forward calls (a model that calls them in order,
        as T5's encoder calls its blocks): each one enters before it runs, prefetching the next,
        and leaves after."""
        for index, module in enumerate(self.modules):
            def before(module, args, index=index):
                self.enter(index)
                self.prefetch(index + 1)

            def after(module, args, output, index=index):
                self.leave(index)

            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)


def embedding_on_host(embedding: torch.nn.Embedding, device: torch.device) -> None:
    """A (large) embedding table kept in host memory: the lookup runs there and only the looked-up
    rows go to `device` (T5's table is 2.1 GB; a prompt looks up 512 rows of it)."""
    embedding.to("cpu")

    def before(module, args):
        return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)

    def after(module, args, output):
        return output.to(device)

    embedding.register_forward_pre_hook(before)
    embedding.register_forward_hook(after)
