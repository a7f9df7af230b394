"""The one exception type graphshape raises for user-facing failures."""


class GraphshapeError(Exception):
    """A failure the user can act on.

    The message says what went wrong, where (op, node, file) and what to do about it.
    ``node`` and ``op`` are set when the failure belongs to one graph node.
    """

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None):
        prefix = ""
        if node is not None or op is not None:
            where = ", ".join(p for p in (f"node {node!r}" if node else None,
                                          f"op {op!r}" if op else None) if p)
            prefix = f"[{where}] "
        super().__init__(prefix + message)
        self.node = node
        self.op = op
