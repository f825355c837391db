"""The documentation's generated pages, and the MkDocs hook that adds them to the site (mkdocs.yml `hooks:`).

    cli.md         every command and flag, read from the argparse parsers `cnnlab` itself uses
    benchmarks.md  every figure in benchmarks/results/*.json, with its CPU class, date and command

Neither page is written to disk or committed: `make docs` builds them from the code and the results each time,
so they cannot drift. `example_commands` finds the commands the guides show (lines `$ cnnlab ...` in code
blocks), which tests/test_docs.py runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GENERATED = ("cli.md", "benchmarks.md")


# ---------------------------------------------------------------------------------------------- CLI reference
def cli_reference() -> str:
    from cnnlab.cli.args import build_parser

    parser = build_parser()
    out = ["# Command-line reference", "",
           "Generated from the parsers `cnnlab` runs (`src/cnnlab/cli/args.py`), so every command and flag here is "
           "one `cnnlab --help` knows. Flags of `train` override the preset's values; `--dry-run` makes any "
           "training command a smoke test (one epoch on 512 images).", ""]
    for name, sub, help_ in _commands(parser):
        out += _command(name, sub, help_)
    return "\n".join(out) + "\n"


def _commands(parser: argparse.ArgumentParser, prefix: str = "cnnlab"):
    """(full command, its parser, its one-line help) for every subcommand, nested ones included."""
    for action in parser._actions:  # argparse keeps subcommands here; every argparse doc generator reads it
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                if nested:
                    yield from _commands(sub, f"{prefix} {name}")
                else:
                    yield f"{prefix} {name}", sub, helps.get(name, "")


def _command(name: str, parser: argparse.ArgumentParser, help_: str) -> list[str]:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        flag = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.metavar or a.dest}`"
        if a.option_strings and a.nargs != 0:
            flag += f" `{a.metavar or a.dest.upper()}`"
        if a.choices and not isinstance(a.choices, dict):
            flag += " (" + " \\| ".join(str(c) for c in a.choices) + ")"
        default = "" if a.default in (None, False, argparse.SUPPRESS) or a.nargs == 0 else f"`{_plain(a.default)}`"
        rows.append(f"| {_cell(flag)} | {default} | {_cell((a.help or '').replace('%%', '%'))} |")
    return [f"## `{name}`", "", _cell(help_), "", "```text", usage, "```", "", *rows, ""]


def _plain(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value) if value else "none"
    return str(value)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# ------------------------------------------------------------------------------------------------ benchmarks
def benchmarks_page(results: Path = RESULTS) -> str:
    out = ["# Benchmarks", "",
           "Generated from `benchmarks/results/*.json` when the site is built: each file as its script wrote it, "
           "with the CPU class, the date and the command. The machine's CPU changed between sessions (AMD EPYC "
           "with AVX-512 BF16, Intel Xeon with AMX, AMD EPYC with AVX2 only), and a shared host's speed moves by "
           "the hour: compare figures from one file, not across files. The matrix-product rate each script "
           "measured at its start (`matmul_gflops_now`) says how fast the host was then.", ""]
    by_script: dict[str, list[Path]] = {}
    for path in sorted(results.glob("*.json")):
        by_script.setdefault(_script_of(path), []).append(path)
    for script, paths in sorted(by_script.items()):
        out += [f"## {script}", "", _purpose(script), ""]
        for path in paths:
            out += _result(path)
    return "\n".join(out) + "\n"


def _script_of(path: Path) -> str:
    """benchmarks/results/vs_keras-avx2.json -> vs_keras (the longest script name the file name starts with)."""
    scripts = sorted((p.stem for p in (ROOT / "benchmarks").glob("*.py")), key=len, reverse=True)
    return next((s for s in scripts if path.stem == s or path.stem.startswith(s + "-")), path.stem.split("-")[0])


def _purpose(script: str) -> str:
    path = ROOT / "benchmarks" / f"{script}.py"
    if not path.is_file():
        return "(its script is no longer in benchmarks/)"
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _result(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    machine = data.get("machine", {}) if isinstance(data, dict) else {}
    cpu_class = data.get("cpu_class") or machine.get("cpu_class") or "not recorded"
    date = machine.get("date") or data.get("date") or "not recorded"
    command = data.get("command") or f"python benchmarks/{_script_of(path)}.py"
    lines = [f"### `{path.name}`", "",
             f"CPU class **{cpu_class}** ({machine.get('cpu', data.get('cpu', '?'))}, {machine.get('cores', '?')} "
             f"cores, torch {machine.get('torch', data.get('torch', '?'))}), {date}; `{command}`", ""]
    scalars, tables = {}, []
    for key, value in data.items():
        if key in ("machine", "command"):
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        else:
            scalars.update(_flatten(key, value))
    if scalars:
        lines += ["| figure | value |", "|---|---|", *(f"| {k} | {_cell(_fmt(v))} |" for k, v in scalars.items()), ""]
    for key, rows in tables:
        columns = list(dict.fromkeys(k for r in rows for k in _flatten("", r)))
        lines += [f"{key}:", "", "| " + " | ".join(c.lstrip(".") for c in columns) + " |",
                  "|" + "---|" * len(columns)]
        for r in rows:
            flat = _flatten("", r)
            lines.append("| " + " | ".join(_cell(_fmt(flat.get(c, ""))) for c in columns) + " |")
        lines.append("")
    return lines


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return {prefix: json.dumps(value)[:200]}
    return {prefix: value}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


# ------------------------------------------------------------------------------------------ example commands
def example_commands(paths) -> list[tuple[Path, str]]:
    """Every `$ cnnlab ...` line in the code blocks of these Markdown files (a trailing `\\` joins the next
    line; a `# comment` is dropped), in order: (file, command without the `$ `)."""
    found = []
    for path in paths:
        text = Path(path).read_text()
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
            lines = iter(block.splitlines())
            for line in lines:
                line = line.strip()
                if not line.startswith("$ cnnlab "):
                    continue
                while line.endswith("\\"):
                    line = line[:-1] + next(lines).strip()
                found.append((Path(path), re.sub(r"\s+#.*$", "", line[2:]).strip()))
    return found


# ------------------------------------------------------------------------------------------------ MkDocs hook
def on_files(files, config):
    """Add the generated pages to the site (MkDocs >= 1.6: File.generated)."""
    from mkdocs.structure.files import File

    pages = {"cli.md": cli_reference(), "benchmarks.md": benchmarks_page()}
    for name, content in pages.items():
        files.append(File.generated(config, name, content=content))
    return files
