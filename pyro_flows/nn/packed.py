"""Several tensors in ONE flat parameter: its views, and loading checkpoints saved with separate tensors.

A network whose weights and biases live in one ``nn.Parameter`` is updated by an optimiser in one go
(Adam costs a few dozen aten ops per tensor per step; Pyro's optimisers keep a Python optimiser per
tensor). :class:`Packing` is the layout (shapes -> one flat tensor; :meth:`Packing.unpack` gives the
views in one split, of the parameter itself or of a tensor shaped like it, e.g. its gradient), and
:func:`register_old_keys` lets ``load_state_dict`` read state dicts saved with one tensor per weight.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["Packing", "pack_old_keys", "register_old_keys"]


class Packing:
    """The layout of several tensors, in order, in one flat tensor.

    Arguments:
        shapes: the tensors' shapes, in order.

    Example:
        >>> import torch
        >>> p = Packing([(2, 3), (2,)])
        >>> flat = p.pack([torch.ones(2, 3), torch.zeros(2)])
        >>> flat.shape, [tuple(t.shape) for t in p.unpack(flat)]
        (torch.Size([8]), [(2, 3), (2,)])
    """

    def __init__(self, shapes):
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]
        self.sizes = [math.prod(shape) for shape in self.shapes]

    def __len__(self):
        return len(self.shapes)

    @property
    def offsets(self) -> list:
        """Where each tensor starts in the flat tensor."""
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def pack(self, tensors) -> torch.Tensor:
        """The tensors (of :attr:`shapes`), flattened and concatenated (a new tensor)."""
        tensors = list(tensors)
        got = [tuple(t.shape) for t in tensors]
        if got != self.shapes:
            raise ValueError(f"Packing: expected tensors of shapes {self.shapes}, got {got}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unpack(self, flat: torch.Tensor) -> list:
        """Views of ``flat`` (a tensor of :attr:`numel` entries), one per shape, from one split."""
        parts = flat.split(self.sizes)
        return [t if len(shape) == 1 else t.view(shape) for t, shape in zip(parts, self.shapes)]


def pack_old_keys(state_dict, prefix, old_keys, new_key, drop=()):
    """Replace the entries ``prefix + k`` for ``k`` in ``old_keys`` of ``state_dict`` (in place) by
    their packed concatenation under ``prefix + new_key``, if all of them are there (else do nothing).

    An entry of ``old_keys`` may be a tuple of keys: their tensors are stacked (along a new first
    dimension) before flattening. Keys in ``drop`` (e.g. masks now computed from the sizes) are
    removed if present.

    Example:
        >>> import torch
        >>> sd = {"net.a": torch.ones(2, 2), "net.b": torch.zeros(2), "net.m": torch.ones(2)}
        >>> pack_old_keys(sd, "net.", ["a", "b"], "packed", drop=["m"])
        >>> list(sd), sd["net.packed"].tolist()
        (['net.packed'], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    """
    names = [k if isinstance(k, tuple) else (k,) for k in old_keys]
    if not names or any(prefix + k not in state_dict for ks in names for k in ks):
        return
    parts = []
    for key, ks in zip(old_keys, names):
        if isinstance(key, tuple):
            parts.append(torch.stack([state_dict.pop(prefix + k) for k in ks]).reshape(-1))
        else:
            parts.append(state_dict.pop(prefix + key).reshape(-1))
    for k in drop:
        state_dict.pop(prefix + k, None)
    state_dict[prefix + new_key] = torch.cat(parts)


def _hook(state_dict, prefix, *args, old_keys, new_key, drop):
    pack_old_keys(state_dict, prefix, old_keys, new_key, drop)


def register_old_keys(module, old_keys, new_key, drop=()):
    """Make ``module.load_state_dict`` accept state dicts with ``old_keys`` in place of ``new_key``
    (see :func:`pack_old_keys`; keys relative to the module). Returns the hook's handle."""
    hook = functools.partial(_hook, old_keys=tuple(old_keys), new_key=new_key, drop=tuple(drop))
    return module._register_load_state_dict_pre_hook(hook)
