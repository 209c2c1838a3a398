"""Errors a user can cause. The CLI prints them (no traceback) and exits 2 (or `exit_code`)."""


class EchocError(Exception):
    """Base class: the message must tell the user what to change."""
    exit_code = 2


class StoppedBySignal(EchocError):
    """SIGTERM / SIGINT stopped the run early (after a checkpoint, when there is a directory):
    not a finished run, so the exit code is the shell's for that signal (128 + its number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class SpecError(EchocError):
    """A spec that does not validate. `problems` holds (yaml_path, line or None, message).

    One problem reads as one line, `SOURCE: PATH (line N): MESSAGE`; several as a count line
    followed by one line per problem. Control characters are shown escaped, never printed.
    """

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]):
        assert problems, "a SpecError needs at least one problem"
        self.source = source
        self.problems = problems
        where = [(f"{path} (line {line})" if line else path, msg) for path, line, msg in problems]
        if len(where) == 1:
            text = _one_line(f"{source}: {where[0][0]}: {where[0][1]}")
        else:
            text = "\n".join([_one_line(f"{source}: {len(problems)} problems in the spec")]
                             + [_one_line(f"  {w}: {m}") for w, m in where])
        super().__init__(text)


def _one_line(text: str) -> str:
    """`text` with every control character (newlines included) escaped, so it prints as one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class MissingDependencyError(EchocError):
    """An optional package the spec asks for is not installed."""

    def __init__(self, feature: str, install: str):
        super().__init__(f"{feature} needs an optional package that is not installed: run `{install}`")


class CapacityOverflowError(EchocError):
    """Rows overflowed a static buffer and budgets.on_overflow is 'error'."""
