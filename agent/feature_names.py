"""Feature names: what a model's input columns are called, from the reference data to the agents.

Drift compares a reference column with the traffic column of the same name,
so both sides must name an input's columns alike. Names travel as a list (a
model with one input) or ``{input: [names]}``: from the reference data's header
(or ``--feature-names``) into the profile's ``feature_names``, from there into
the registry with the model version, and on to managed agents with the version
they serve; static agents take them with ``agent serve --feature-names``.

This module is the one place that reads such names and checks them against a
model's inputs, for the agent (``NodeArg``s) and the collector (the registry's
schema: ``{"name", "type", "shape"}`` with ``None`` for symbolic dimensions)
alike. The column rule itself (``<input>[i]`` by default) is ``agent.capture``'s.
Every problem raises ``InvalidArgument`` saying what to change.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from agent.errors import InvalidArgument

Names = Union[list[str], dict[str, list[str]]]
# The collector refuses longer column names (collector.base.ingest.Limits.max_column_name_chars): an agent
# given one would have every window refused, so such a name is refused where it is given.
MAX_NAME_CHARS = 256
MAX_NAMES = 4096  # columns per profile or window (Limits.max_columns)
FEATURE_ROLE = 1  # summary_pb2.ColumnSummary.FEATURE (not imported: this module stays free of protos)
DERIVED = "@"  # columns Outrider computes from a whole row ("@reconstruction_error") start so: no input's


# ------------------------------------------------------------------ reading names


def parse(text: str, what: str = "--feature-names") -> Names:
    """Names as an operator writes them: ``A,B,C`` (a one-input model), JSON (a list, or
    ``{"input": ["A", ...]}`` for several inputs), or ``@FILE`` holding either (commas or
    newlines between names)."""
    source = what
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise InvalidArgument(f"{what}: cannot read {path}: {reason}; pass @FILE of names "
                                  "(A,B,C or JSON)") from None
        source = f"{what} file {path.name}"
    text = text.strip()
    if not text:
        raise InvalidArgument(f"{source} is empty; pass A,B,C (or JSON {{\"input\": [names]}} for several inputs)")
    if text[0] in "[{":
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"{source} is not valid JSON ({exc}); pass a JSON list or "
                                  "{\"input\": [names]}") from None
        return coerce(value, source)
    return coerce([part.strip() for part in text.replace("\n", ",").split(",")], source)


def coerce(value: Any, what: str = "feature_names") -> Names:
    """``value`` checked as names: a sequence of strings, or a mapping of input name to one."""
    if isinstance(value, Mapping):
        if not value:
            raise InvalidArgument(f"{what} names no input; give {{\"input\": [names]}}")
        out: dict[str, list[str]] = {}
        for key, names in value.items():
            if not isinstance(key, str) or not key:
                raise InvalidArgument(f"{what} has an input name {key!r} that is not text")
            out[key] = _checked_list(names, f"{what} of input {key!r}")
        _check_unique([n for names in out.values() for n in names], what)
        return out
    return _checked_list(value, what)


def _checked_list(names: Any, what: str) -> list[str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise InvalidArgument(f"{what} must be a list of names, not {type(names).__name__}")
    if not names:
        raise InvalidArgument(f"{what} has no names")
    if len(names) > MAX_NAMES:
        raise InvalidArgument(f"{what} has {len(names)} names, at most {MAX_NAMES} allowed")
    out = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise InvalidArgument(f"{what}: name {i + 1} is {type(name).__name__}, not text")
        if not name:
            raise InvalidArgument(f"{what}: name {i + 1} is empty; give every column a name (A,B,C)")
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise InvalidArgument(f"{what}: name {i + 1} ({name[:40]!r}) must be printable and at most "
                                  f"{MAX_NAME_CHARS} characters")
        if name.startswith(DERIVED):
            raise InvalidArgument(f"{what}: name {i + 1} ({name[:40]!r}) starts with {DERIVED!r}, which marks the "
                                  "columns Outrider derives; name the column otherwise")
        out.append(name)
    _check_unique(out, what)
    return out


def _check_unique(names: list[str], what: str) -> None:
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise InvalidArgument(f"{what} repeats {few(twice)}; each column needs its own name")


def to_json(names: Mapping[str, Sequence[str]]) -> str:
    """The registry's and the serve command's form: ``{"input": [names]}`` (compact)."""
    return json.dumps({k: list(v) for k, v in names.items()}, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Input:
    """What naming needs of a model input: its name, onnxruntime type and shape (None: symbolic)."""

    name: str
    type: str
    shape: tuple[int | None, ...]

    @classmethod
    def of(cls, arg: Any) -> Input:
        """From an onnxruntime NodeArg, or an entry of the registry's schema."""
        if isinstance(arg, Mapping):
            name, kind, shape = arg.get("name", ""), arg.get("type", ""), arg.get("shape") or []
        else:
            name, kind, shape = arg.name, arg.type, arg.shape or []
        return cls(str(name), str(kind), tuple(d if isinstance(d, int) and d >= 0 else None for d in shape))

    @property
    def per_column(self) -> bool:
        """A tensor of rank 1 or 2: one summary column per feature, which names can name
        (higher ranks are summarised per sample as ``.mean``/``.std``/``.l2``)."""
        return self.type.startswith("tensor(") and len(self.shape) <= 2

    @property
    def width(self) -> int | None:
        """Columns of a per-column input; None when the model leaves that dimension open."""
        dims = self.shape[1:]
        return 1 if not dims else dims[0]

    def default_columns(self) -> list[str] | None:
        """``agent.capture``'s names without feature names: ``<input>`` or ``<input>[i]``."""
        width = self.width
        if width is None:
            return None
        return [self.name] if width == 1 else [f"{self.name}[{i}]" for i in range(width)]


def inputs_of(args: Iterable[Any]) -> list[Input]:
    return [Input.of(a) for a in args]


def for_inputs(args: Iterable[Any], option: Names | Mapping[str, Sequence[str]] | Sequence[str] | None,
               what: str = "feature names") -> dict[str, list[str]]:
    """Explicit names per input (a list applies to a one-input model), each checked against the
    input it names: it exists, takes names, and has that many columns where its width is fixed."""
    if option is None or (isinstance(option, Mapping) and not option):
        return {}
    inputs = inputs_of(args)
    names = coerce(option, what)
    if isinstance(names, list):
        if len(inputs) != 1:
            raise InvalidArgument(f"a list of {what} applies to a model with one input; this one has {len(inputs)} "
                                  f"({', '.join(a.name for a in inputs)}): name the columns per input, as JSON "
                                  "{\"input\": [names]}")
        names = {inputs[0].name: names}
    by_name = {a.name: a for a in inputs}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise InvalidArgument(f"{what} given for {unknown}, but the model's inputs are {[a.name for a in inputs]}")
    for key, given in names.items():
        check_width(by_name[key], given, what)
    return names


def check_width(arg: Input, names: Sequence[str], what: str = "feature names") -> None:
    if not arg.per_column:
        raise InvalidArgument(f"input {arg.name!r} has shape {shape_text(arg.shape)}: it is summarised per sample "
                              f"({arg.name}.mean, .std, .l2), so its columns take no {what}")
    if arg.width is not None and len(names) != arg.width:
        raise InvalidArgument(f"{len(names)} {what} given for input {arg.name!r}, which has {arg.width} "
                              "columns: give one name per column")


def columns_of(args: Iterable[Any], names: Mapping[str, Sequence[str]]) -> dict[str, list[str] | None]:
    """The feature columns each per-column input becomes with ``names`` (else the default names);
    None for an input whose width is open and that has no names."""
    out: dict[str, list[str] | None] = {}
    for arg in inputs_of(args):
        if arg.per_column:
            out[arg.name] = list(names[arg.name]) if arg.name in names else arg.default_columns()
    return out


def all_feature_columns(args: Iterable[Any], names: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Every feature column the model's inputs become, in order (``agent.capture``'s rules: per
    column, or ``.mean``/``.std``/``.l2`` per sample of a higher rank); None if some are unknown."""
    out: list[str] = []
    per_column = columns_of(args, names)
    for arg in inputs_of(args):
        if arg.per_column:
            columns = per_column[arg.name]
            if columns is None:
                return None
            out.extend(columns)
        elif arg.type.startswith("tensor(") and arg.type != "tensor(string)":
            out.extend(f"{arg.name}.{stat}" for stat in ("mean", "std", "l2"))
    return out


def shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


# ------------------------------------------------------------------ profiles


def from_profile(profile: Any, args: Iterable[Any] | None = None) -> dict[str, list[str]]:
    """A profile's names per input: its ``feature_names``, or for a profile made before they were
    recorded, its feature columns grouped by the input they come from (per-column inputs only,
    when the model's ``args`` are given)."""
    if profile.feature_names:
        return {key: list(value.names) for key, value in profile.feature_names.items()}
    by_input = columns_by_input(profile.columns)
    if args is None:
        return by_input
    per_column = {a.name for a in inputs_of(args) if a.per_column}
    return {key: names for key, names in by_input.items() if key in per_column}


def feature_columns(columns: Iterable[Any]) -> list[str]:
    """The names of the input columns among ``columns`` (of a profile or a window), in order: the
    FEATURE columns, less those Outrider derives from several inputs (named ``@...``)."""
    return [c.name for c in columns if c.role == FEATURE_ROLE and not c.name.startswith(DERIVED)]


def columns_by_input(columns: Iterable[Any]) -> dict[str, list[str]]:
    """``feature_columns`` grouped by the input they come from (the column's ``source``)."""
    out: dict[str, list[str]] = {}
    for c in columns:
        if c.role == FEATURE_ROLE and not c.name.startswith(DERIVED):
            out.setdefault(c.source, []).append(c.name)
    return out


def difference(expected: Sequence[str], got: Sequence[str], limit: int = 6) -> str:
    """"" when both hold the same columns; else what is missing from ``got`` and what it has besides."""
    have, want = set(got), set(expected)
    missing = [c for c in expected if c not in have]
    extra = [c for c in got if c not in want]
    return "; ".join(p for p in (f"missing {few(missing, limit)}" if missing else "",
                                 f"unexpected {few(extra, limit)}" if extra else "") if p)


def few(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items)} in all)' if len(items) > limit else ''}]"
