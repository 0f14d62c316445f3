"""Every `fieldreid <command>` that the package's messages, docstrings and comments or the README tell a user
to run is a command the CLI really has (a hint naming a missing command sends users nowhere)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import typer.main

from fieldreid.cli import app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fieldreid"
# `fieldreid CMD`, `fieldreid GROUP SUB` or `fieldreid gallery list\|show` (README table); placeholders such as
# {name}, PATH or ... end the command words
MENTION = re.compile(r"`+fieldreid +([a-z][a-z0-9-]*)(?: +([a-z][a-z0-9-]*(?:\\?\|[a-z][a-z0-9-]*)*))?")
SHELL_LINE = re.compile(r"^\s*(?:[A-Z_]+=\S+\s+)*fieldreid +([a-z][a-z0-9-]*)(?: +([a-z][a-z0-9-]*))?")


def _commands() -> dict[str, set[str] | None]:
    """Registered command -> its sub-commands (None for a plain command)."""
    group = typer.main.get_command(app)
    return {name: (set(cmd.commands) if hasattr(cmd, "commands") else None) for name, cmd in group.commands.items()}


def _python_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string (implicit concatenations and f-string pieces joined) and comment."""
    source = path.read_text(encoding="utf-8")
    texts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr):
            texts.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append((node.lineno, node.value))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            texts.append((tok.start[0], tok.string))
    return texts


def _readme_texts() -> list[tuple[int, str, bool]]:
    """(line, text, inside a fenced code block) of README.md."""
    out, fenced = [], False
    for i, line in enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        out.append((i, line, fenced))
    return out


def mentions() -> list[tuple[str, str, str | None]]:
    """(where, command, sub-command words or None) for every command mention in the package and the README."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _python_texts(path):
            for m in MENTION.finditer(text):
                found.append((f"{path.relative_to(ROOT)}:{line}", m.group(1), m.group(2)))
    for line, text, fenced in _readme_texts():
        where = f"README.md:{line}"
        for m in MENTION.finditer(text):
            found.append((where, m.group(1), m.group(2)))
        if fenced and (m := SHELL_LINE.match(text)):
            found.append((where, m.group(1), m.group(2)))
    return found


def unknown_commands(found, commands) -> list[str]:
    bad = []
    for where, cmd, sub in found:
        if cmd not in commands:
            bad.append(f"{where}: `fieldreid {cmd}` is not a command")
        elif commands[cmd] is not None:  # a group: the word after it must be one of its commands
            for word in (sub or "").replace("\\", "").split("|"):
                if word and word not in commands[cmd]:
                    bad.append(f"{where}: `fieldreid {cmd} {word}` is not a command")
    return bad


def test_every_command_mentioned_exists():
    commands = _commands()
    found = mentions()
    # the collector really sees hints in messages, the README table and its shell examples
    cmds = {(c, s) for _, c, s in found}
    assert ("gallery", "list") in cmds and ("export", None) in cmds and ("server", "init") in cmds
    assert any(w.startswith("fieldreid/defaults.py") for w, _, _ in found)
    assert len(found) > 50
    assert unknown_commands(found, commands) == []


def test_the_checker_catches_a_missing_command():
    commands = _commands()
    fake = [("x.py:1", "convert-detector", None), ("x.py:2", "gallery", "list\\|check"), ("x.py:3", "doctor", "foo")]
    assert unknown_commands(fake, commands) == ["x.py:1: `fieldreid convert-detector` is not a command",
                                                "x.py:2: `fieldreid gallery check` is not a command"]


@pytest.mark.parametrize("kind", ["detector", "embedder"])
def test_missing_default_model_names_a_real_command(tmp_path, monkeypatch, kind):
    from fieldreid.defaults import default_model
    from fieldreid.errors import ModelError

    monkeypatch.setenv("FIELDREID_MODELS", str(tmp_path / "none"))
    with pytest.raises(ModelError) as info:
        default_model(kind)
    msg = str(info.value)
    hinted = [(m.group(1), m.group(2)) for m in MENTION.finditer(msg)]
    assert hinted and all(cmd in _commands() for cmd, _ in hinted), msg
    if kind == "detector":  # the exact file the lookup wants
        assert f"`fieldreid export CHECKPOINT.pt --out {tmp_path / 'none' / 'detector.onnx'}`" in msg
