"""Reading YAML spec files safely and validating their entries.

A spec file is a YAML mapping with any of the top-level sections ``datasets``,
``models``, ``tasks`` and ``suites``; each maps a name to that entry's fields::

    datasets:
      my_atlas:
        uri: s3://bucket/atlas.h5ad
        organism: human
        label_key: cell_type
        batch_key: [assay, donor_id]

YAML is read with a safe loader after a pre-scan of its shape: deep nesting, alias bombs
and keys given twice are refused, and errors name the file and line, never its content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from czb.core.errors import SpecError
from czb.specs.names import NAME_RULE, is_valid_name, shown
from czb.specs.schema import SECTIONS, Spec


def _format_validation_error(
    path: Path, section: str, name: str, error: ValidationError, lines: dict[tuple[str, ...], int]
) -> str:
    """The problems of one entry, with the line of the most specific key of the first
    one (``models.x.parameters.k.default``: the line of ``k``)."""
    problems, line = [], None
    for e in error.errors():
        keys = tuple(str(p) for p in (section, name, *e["loc"]))
        problems.append(f"{'.'.join(keys)}: {e['msg']}")
        if line is None:
            line = next((lines[keys[:n]] for n in range(len(keys), 1, -1) if keys[:n] in lines), None)
    return f"{path}: " + "; ".join(problems) + ("" if line is None else f" (line {line})")


#: The PyYAML loader: libyaml's (fast) when PyYAML was built with it.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: Lists and mappings nested deeper than this are refused before the YAML is composed
#: (libyaml's composer recurses in C: a deep enough document would crash the process).
#: Spec parameters are copied into results a few levels down, and result files are read
#: back only up to 64 levels (:data:`czb.core.records.MAX_RESULT_DEPTH`): 32 leaves room.
MAX_YAML_DEPTH = 32
#: Nodes that aliases may add to one spec file, all aliases together (an alias adds the
#: size of what its anchor names): shared citations and weight files fit; quadratic alias
#: bombs (one big anchor, many aliases) do not.
MAX_ALIAS_NODES = 10_000
#: Levels of keys whose lines errors name: down to a model parameter's own key
#: (``models`` → name → ``parameters`` → parameter).
LINE_LEVELS = 4


class _DuplicateKeyError(ValueError):
    def __init__(self, line: int, first: int):
        super().__init__(f"duplicate key (first given at line {first})")
        self.line = line


class _SpecLoader(_BaseLoader):
    """A safe loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<" merges; explicit keys override it
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKeyError(line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: the base constructor refuses it
                    continue
        return super().construct_mapping(node, deep=deep)


def _check_yaml_shape(text: str, path: Path) -> None:
    """Refuse deep nesting, recursive aliases, aliases of lists or mappings that hold
    aliases themselves (how alias bombs grow exponentially), and aliases that add more
    than :data:`MAX_ALIAS_NODES` nodes in total; from the event stream, before anything
    is built from it."""
    anchors: dict[str, tuple[int, bool]] = {}  # anchor -> (nodes, holds an alias)
    open_anchors: set[str] = set()
    stack: list[list[Any]] = []  # [anchor, nodes so far, holds an alias] per open list or mapping
    added = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_YAML_DEPTH:
                msg = f"{path}:{line}: lists and mappings nested more than {MAX_YAML_DEPTH} levels deep"
                raise SpecError(msg)
            stack.append([event.anchor, 1, False])
            if event.anchor:
                open_anchors.add(event.anchor)
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size, holds_alias = stack.pop()
            if anchor:
                anchors[anchor] = (size, holds_alias)
                open_anchors.discard(anchor)
            if stack:
                stack[-1][1] += size
                stack[-1][2] = stack[-1][2] or holds_alias
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                anchors[event.anchor] = (1, False)
            if stack:
                stack[-1][1] += 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                msg = f"{path}:{line}: an alias refers to a list or mapping that contains it (recursive YAML)"
                raise SpecError(msg)
            size, holds_alias = anchors.get(event.anchor, (1, False))
            if holds_alias:
                msg = (f"{path}:{line}: an alias refers to a list or mapping that holds aliases itself; "
                       "nested aliases are refused (they can expand exponentially)")
                raise SpecError(msg)
            added += size
            if added > MAX_ALIAS_NODES:
                msg = (f"{path}:{line}: YAML aliases expand to more than {MAX_ALIAS_NODES:,} nodes; "
                       "write the entries out instead")
                raise SpecError(msg)
            if stack:
                stack[-1][1] += size
                stack[-1][2] = True


def load_yaml(path: Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Read a YAML spec file safely.

    The file must be a regular file of at most ``CZB_MAX_SPEC_MB``. Aliases (to share a
    citation or a weights file) are allowed while they cannot explode: an alias may not
    name a list or mapping that holds aliases itself, and all aliases together may add at
    most :data:`MAX_ALIAS_NODES` nodes. Nesting is limited to :data:`MAX_YAML_DEPTH`
    levels, and a key given twice in one mapping is an error.

    Returns
    -------
    The data, and the line of each key of the first :data:`LINE_LEVELS` levels
    (``(section,)``, ``(section, name)``, ``(section, name, field)``...), for error messages.

    Raises
    ------
    SpecError
        Naming the file (and line where there is one); never quoting its content.
    """
    from czb.core.settings import get_settings
    from czb.core.untrusted import read_bounded

    max_bytes = int(get_settings().max_spec_mb * 1e6)
    try:
        raw = read_bounded(path, max_bytes)
    except OSError as e:
        msg = f"{path}: cannot read spec file ({e.strerror or type(e).__name__})"
        raise SpecError(msg) from None
    except ValueError as e:
        msg = f"{path}: cannot read spec file ({e}; CZB_MAX_SPEC_MB raises the limit)"
        raise SpecError(msg) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"{path}: not valid YAML (not UTF-8 text at byte {e.start})"
        raise SpecError(msg) from None
    try:
        _check_yaml_shape(text, path)
        loader = _SpecLoader(text)
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except _DuplicateKeyError as e:
        msg = f"{path}:{e.line}: {e}"
        raise SpecError(msg) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "cannot be parsed"
        msg = f"{path}{where}: not valid YAML ({problem[:120]})"
        raise SpecError(msg) from None
    lines: dict[tuple[str, ...], int] = {}

    def note(mapping: Any, keys: tuple[str, ...]) -> None:
        if len(keys) < LINE_LEVELS and isinstance(mapping, yaml.MappingNode):
            for key, value in mapping.value:
                lines.setdefault((*keys, str(key.value)), key.start_mark.line + 1)
                note(value, (*keys, str(key.value)))

    note(node, ())
    return data, lines


def load_spec_file(path: Path) -> dict[str, dict[str, Spec]]:
    """Read one YAML spec file into ``{section: {name: spec}}``.

    Every entry name must be valid (:data:`~czb.specs.names.NAME_PATTERN`): names become folder and file
    names. Errors name the file, the line, the section and the entry.
    """
    path = Path(path)
    raw, lines = load_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        msg = f"{path}: a spec file must be a mapping with sections {sorted(SECTIONS)}"
        raise SpecError(msg)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:  # not quoted: a file that is no spec at all must not be echoed
        line = lines.get((str(unknown[0]),))
        msg = (f"{path}: {len(unknown)} unknown section(s); expected any of {sorted(SECTIONS)}"
               + ("" if line is None else f" (the first at line {line})"))
        raise SpecError(msg)
    out: dict[str, dict[str, Spec]] = {}
    for section, entries in raw.items():
        cls = SECTIONS[section]
        if entries is None:
            entries = {}
        if not isinstance(entries, dict):
            msg = f"{path}: {section} must map names to entries"
            raise SpecError(msg)
        out[section] = {}
        for name, fields in entries.items():
            if isinstance(name, (int, float)) and not isinstance(name, bool):
                name = str(name)  # e.g. a dataset called 2024
            line = lines.get((section, str(name)))
            at_line = "" if line is None else f" (line {line})"
            if not is_valid_name(name):
                msg = f"{path}: {section}: name {shown(name)} is not a valid name ({NAME_RULE}){at_line}"
                raise SpecError(msg)
            if not isinstance(fields, dict):
                msg = f"{path}: {section}.{name} must be a mapping of fields{at_line}"
                raise SpecError(msg)
            try:
                out[section][name] = cls(name=name, source=path, **fields)
            except ValidationError as e:
                raise SpecError(_format_validation_error(path, section, name, e, lines)) from None
            except TypeError as e:  # e.g. a field named "name" repeated inside the entry
                msg = f"{path}: {section}.{name}: {e}{at_line}"
                raise SpecError(msg) from None
    return out
