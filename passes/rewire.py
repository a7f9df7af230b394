"""Rewiring helper for the shaping passes.

``Graph.replace_uses`` rewrites consumers' ``inputs``; some nodes also name graph values
inside their attributes (opaque nodes' ``args``/``kwargs`` templates, a reshape's dynamic
``shape`` entries), and backends resolve those by name. :func:`replace_uses` rewrites both.
"""

from __future__ import annotations

from graphshape.ir import Graph, Ref


def substitute_ref(value, old: Ref, new: Ref):
    """``value`` (an attribute template) with every ``old`` Ref replaced by ``new``."""
    if isinstance(value, Ref):
        return new if value == old else value
    if isinstance(value, tuple):
        items = [substitute_ref(v, old, new) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [substitute_ref(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: substitute_ref(v, old, new) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(substitute_ref(value.start, old, new), substitute_ref(value.stop, old, new),
                     substitute_ref(value.step, old, new))
    return value


def replace_uses(graph: Graph, old, new) -> int:
    """Make every consumer of value ``old`` read ``new``, in its inputs and in any attribute
    template that names ``old``. Returns the number of consumers rewritten."""
    old, new = Ref(*old), Ref(*new)
    for user in graph.users(old.node):
        user.attrs = substitute_ref(user.attrs, old, new)
    return graph.replace_uses(old, new)
