"""The commands the docs show exist and parse.

A fenced ```bash block directly preceded by the line ``<!-- runnable -->`` in README.md or
TRAINING_GUIDE.md is checked command by command (``\\`` continuations joined, ``#`` comments
dropped, leading ``VAR=value`` assignments skipped):

- ``make T``: the Makefile has target T;
- ``python SCRIPT ...`` / ``python -m MODULE ...`` / ``snac-*`` console scripts / ``torchrun OPTS
  SCRIPT ...``: the script exists, ``--help`` (of the subcommand, when one is named) exits 0, every
  ``--flag`` / ``-f`` used appears in that help, a value of a flag with listed choices is one of
  them, and torchrun's own options appear in ``torchrun --help``;
- ``--set KEY=VALUE`` keys and every `section.key` named in the docs are real config keys;
- example names given to example_training.py / dataset_examples.py are listed by ``--list``.

A fenced ```python block directly preceded by the marker is run as a script and must exit 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "TRAINING_GUIDE.md")
MARKER = "<!-- runnable -->"
CONSOLE_SCRIPTS = {"snac-train": "train_snac.py", "snac-infer": "inference.py", "snac-tokenize": "-m training.tokenize"}
# Commands that take a subcommand; inference.py without one is its documented round-trip short form.
SUBCOMMANDS = {"inference.py": ("roundtrip", "encode", "decode", "export"), "-m training.dataset": ("prepare", "list"),
               "-m training.codec": ("agree",)}
DEFAULT_SUBCOMMAND = {"inference.py": "roundtrip"}
EXAMPLE_SCRIPTS = ("example_training.py", "dataset_examples.py")


def runnable_blocks(text: str, lang: str = "bash"):
    """Yield the body of every ```<lang> block whose previous non-blank line is the marker."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith("```" + lang):
            prev = next((l.strip() for l in reversed(lines[:i]) if l.strip()), "")
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
            if prev == MARKER:
                yield "\n".join(lines[i + 1:end])
            i = end
        i += 1


def commands(block: str):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        if words:
            yield words


def documented_commands():
    out = []
    for doc in DOCS:
        for block in runnable_blocks((ROOT / doc).read_text(encoding="utf-8")):
            out += [(doc, words) for words in commands(block)]
    return out


_OUTPUTS: dict = {}


def tool_output(argv: tuple) -> dict:
    """``{"code", "stdout"}`` of ``python *argv`` run from the repository root.

    The first call runs every ``--help`` / ``--list`` the documented commands can ask for in one
    process (tests/tool_outputs.py), so torch is imported once for all of them; an invocation not
    foreseen gets a batch of its own."""
    if argv not in _OUTPUTS:
        batch = [argv] + sorted(a for a in foreseen_invocations() if a not in _OUTPUTS and a != argv)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "outputs.json"
            r = subprocess.run([sys.executable, str(ROOT / "tests" / "tool_outputs.py"), str(out), json.dumps(batch)],
                               cwd=ROOT, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
            assert r.returncode == 0, f"tests/tool_outputs.py failed: {r.stderr[-2000:]}"
            _OUTPUTS.update(zip(batch, json.loads(out.read_text())))
    return _OUTPUTS[argv]


def foreseen_invocations() -> set:
    """``--help`` of every script and module the documented commands name (and of each of its
    subcommands), ``torchrun --help``, and ``--list`` of the example scripts: a superset of what
    the checks below read."""
    found = {("-m", "torch.distributed.run", "--help")}
    for _, words in COMMANDS:
        words = CONSOLE_SCRIPTS.get(words[0], words[0]).split() + words[1:]
        for i, w in enumerate(words):
            if w == "-m" and i + 1 < len(words):
                tool = f"-m {words[i + 1]}"
            elif w.endswith(".py") and (ROOT / w).is_file():
                tool = w
            else:
                continue
            found.add((*tool.split(), "--help"))
            found.update((*tool.split(), sub, "--help") for sub in SUBCOMMANDS.get(tool, ()))
            if tool in EXAMPLE_SCRIPTS:
                found.add((tool, "--list"))
    return found


def help_text(tool: str, sub: str = "") -> str:
    """``--help`` output of ``tool`` (a script path or ``-m module``), optionally of a subcommand."""
    argv = (*tool.split(), *([sub] if sub else []), "--help")
    r = tool_output(argv)
    assert r["code"] == 0, f"{' '.join(argv)} exited {r['code']}: {r['stdout'][-500:]}"
    return r["stdout"]


def flag_choices(help_out: str, flag: str):
    m = re.search(rf"{re.escape(flag)} \{{([^}}]*)\}}", help_out)
    return m.group(1).split(",") if m else None


def check_flags(words, help_out: str, where: str) -> None:
    for i, w in enumerate(words):
        if not w.startswith("-") or w in ("-", "--"):
            continue
        flag = w.split("=", 1)[0]
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}([\s\],=]|$)", help_out, re.M), \
            f"{where}: flag {flag} is not in the --help output"
        choices = flag_choices(help_out, flag)
        if choices and "=" not in w and i + 1 < len(words):
            assert words[i + 1] in choices, f"{where}: {flag} {words[i + 1]} is not one of {choices}"


def check_tool(tool: str, args, where: str) -> None:
    script = tool.split()[-1]
    if tool.startswith("-m "):
        module = ROOT / script.replace(".", "/")
        assert module.with_suffix(".py").is_file() or (module / "__main__.py").is_file(), \
            f"{where}: module {script} not found"
    else:
        assert (ROOT / script).is_file(), f"{where}: script {script} not found"
    sub = ""
    if tool in SUBCOMMANDS:
        if args and args[0] in SUBCOMMANDS[tool]:
            sub, args = args[0], args[1:]
        else:
            assert tool in DEFAULT_SUBCOMMAND, f"{where}: {tool} needs a subcommand"
            sub = DEFAULT_SUBCOMMAND[tool]
    check_flags(args, help_text(tool, sub), where)
    if script == "train_snac.py":
        for i, w in enumerate(args[:-1]):
            if w == "--set":
                check_config_key(args[i + 1].split("=", 1)[0], where)
    if script in EXAMPLE_SCRIPTS:
        listed = tool_output((script, "--list"))["stdout"]
        # example_training.py lists "name  description" lines; dataset_examples.py "group: names..."
        names = set()
        for line in filter(str.strip, listed.splitlines()):
            words_ = line.split()
            names.update(words_[1:] if words_[0].endswith(":") else words_[:1])
        for w in args:
            if not w.startswith("-"):
                assert w in names, f"{where}: {script} has no example {w!r}"


def check_config_key(key: str, where: str) -> None:
    from training.config import ALIASES, SECTIONS, Config, _hints

    section, _, name = ALIASES.get(key, key).partition(".")
    assert section in SECTIONS and name in _hints(type(getattr(Config(), section))), \
        f"{where}: {key} is not a config key"


def check_command(words, where: str) -> None:
    head = words[0]
    if head == "make":
        targets = re.findall(r"^([A-Za-z_-]+):", (ROOT / "Makefile").read_text(), re.M)
        for t in words[1:]:
            assert t in targets, f"{where}: make target {t} not in Makefile"
        return
    if head in CONSOLE_SCRIPTS:
        return check_tool(CONSOLE_SCRIPTS[head], words[1:], where)
    if head == "torchrun":
        i = 1
        while i < len(words) and words[i].startswith("-"):
            i += 1 if "=" in words[i] else 2
        assert i < len(words), f"{where}: no script after the torchrun options"
        check_flags(words[1:i], help_text("-m torch.distributed.run"), where)
        return check_tool(words[i], words[i + 1:], where)
    if head in ("python", "python3"):
        if words[1] == "-m":
            return check_tool(f"-m {words[2]}", words[3:], where)
        return check_tool(words[1], words[2:], where)
    pytest.fail(f"{where}: unknown command {head!r} in a runnable block")


COMMANDS = documented_commands()
PYTHON_BLOCKS = [(doc, block) for doc in DOCS
                 for block in runnable_blocks((ROOT / doc).read_text(encoding="utf-8"), "python")]


@pytest.mark.parametrize("doc,block", PYTHON_BLOCKS, ids=[f"{d}:python#{i}" for i, (d, _) in enumerate(PYTHON_BLOCKS)])
def test_documented_python_runs(doc, block, tmp_path):
    """A runnable ```python block runs as a script (in an empty folder) and exits 0."""
    script = tmp_path / "snippet.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"{doc}: a runnable python block failed:\n{r.stderr[-2000:]}"


def test_docs_have_runnable_commands():
    docs = {doc for doc, _ in COMMANDS}
    assert docs == set(DOCS)
    shown = [" ".join(w) for _, w in COMMANDS]
    assert "make demo" in shown and "make test" in shown
    assert "python inference.py --checkpoint PATH --input audio.wav --output result.wav" in shown
    assert any(c.startswith("torchrun --nproc_per_node 8 train_snac.py") for c in shown)
    assert any(c.startswith("torchrun --nnodes 2") and "--rdzv_backend c10d" in c for c in shown)
    assert any("--format onnx" in c and "--check" in c for c in shown)
    assert any("StreamingDecoder" in b and "FrameLayout" in b for _, b in PYTHON_BLOCKS)


@pytest.mark.parametrize("doc,words", COMMANDS, ids=[f"{d}:{' '.join(w)[:60]}" for d, w in COMMANDS])
def test_documented_command_parses(doc, words):
    check_command(words, f"{doc}: {' '.join(words)}")


def test_config_keys_named_in_docs_exist():
    # (a path such as `training/model.py` is a file, not a key)
    pattern = re.compile(r"(?<![/\w])(model|data|loss|discriminator|optim|train)\.([a-z_]+)\b(?!\.py|\()")
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for code in re.findall(r"`([^`\n]+)`", text):
            if code.startswith("error:"):  # quoted error messages name wrong keys on purpose
                continue
            for section, name in pattern.findall(code):
                check_config_key(f"{section}.{name}", f"{doc}: `{code}`")


def test_checker_rejects_wrong_commands():
    """The checks above would catch a documented flag, key, subcommand or script that does not exist."""
    bad = [
        "python train_snac.py --no_such_flag 1",
        "python train_snac.py --preset 16khz",
        "python train_snac.py --set optim.no_such_key=1",
        "python inference.py encode -c x --input a --output b --keep-rate",  # decode/roundtrip only
        "python -m training.tokenize --no_such_option",
        "python no_such_script.py",
        "torchrun --no_such_torchrun_flag 1 train_snac.py",
        "python example_training.py no_such_example",
        "make no_such_target",
    ]
    for cmd in bad:
        with pytest.raises(AssertionError):
            check_command(shlex.split(cmd), cmd)


def test_console_scripts_match_the_tools():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"snac-train": "train_snac:main", "snac-infer": "inference:main",
                       "snac-tokenize": "training.tokenize:main"}
    import importlib

    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def _code_map_paths() -> list:
    """Every path named in the first column of README's "Code map" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    paths = []
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        first = row.split("|")[1]
        names = re.findall(r"`([^`]+)`", first)
        folder = str(Path(names[0]).parent) if "/" in names[0] else ""
        paths += [n if "/" in n or not folder else f"{folder}/{n}" for n in names]
    return paths


def test_code_map_matches_the_tree():
    """README's code map names every module of the package (and the CLIs), and nothing that is gone."""
    mapped = set(_code_map_paths())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "training").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert modules - mapped == set(), "modules missing from README's code map"
    assert {p for p in mapped if not (ROOT / p).is_file()} == set(), "code map names files that do not exist"
