"""The exceptions fxcompress raises for bad input: each says where, and what to do."""


class FxCompressError(Exception):
    """Base class of every user-facing error. The CLI prints it on one line and exits with code 2."""


class TraceError(FxCompressError):
    """A model could not be traced by torch.fx."""


class RecipeError(FxCompressError):
    """A recipe is invalid. `line` (1-based, when known) and `field` (a dotted path) locate the problem."""

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None,
                 source: str | None = None, path: tuple = ()):
        self.message = message
        self.path = path
        self.field = field
        self.line = line
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.source or self.line is not None:
            where.append(f"{self.source or 'recipe'}" + (f":{self.line}" if self.line is not None else ""))
        if self.field:
            where.append(self.field)
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class VerificationError(FxCompressError):
    """A pass declared exact changed the model's outputs, or an export does not match torch."""


class DataError(FxCompressError):
    """A data source cannot be loaded (missing root, unreadable files, wrong shapes)."""
