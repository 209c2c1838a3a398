"""Errors a user can cause. The CLI prints them (no traceback) and exits 2."""


class EchocError(Exception):
    """Base class: the message must tell the user what to change."""


class SpecError(EchocError):
    """A spec that does not validate. `problems` holds (yaml_path, line or None, message)."""

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the spec"]
        for path, line, msg in problems:
            where = f"{path} (line {line})" if line else path
            lines.append(f"  {where}: {msg}")
        super().__init__("\n".join(lines))


class MissingDependencyError(EchocError):
    """An optional package the spec asks for is not installed."""

    def __init__(self, feature: str, install: str):
        super().__init__(f"{feature} needs an optional package that is not installed: run `{install}`")


class CapacityOverflowError(EchocError):
    """Rows overflowed a static buffer and budgets.on_overflow is 'error'."""
