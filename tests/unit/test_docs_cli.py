"""Every `stowagectl` and `stowage-csi` command line the docs show parses with today's CLI, so
the docs and the CLI cannot drift apart. Lines in code blocks must parse completely; a command
named inline in prose may leave out required arguments (it names the command), but every flag,
choice and size it does show must be accepted."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver import cli
from driver.ctl import main as ctl_main

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("stowagectl", "stowage-csi")
_INLINE = re.compile(r"`((?:stowagectl|stowage-csi)(?: [^`]*)?)`")
_OPTIONAL = re.compile(r"\[([^\[\]]*)\]")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "charts/stowage/README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "deploy").rglob("*.md"))
    return [f for f in files if f.is_file()]


def command_lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, command, complete?) for every command shown: lines of fenced code blocks
    (continuations joined) are complete; inline code spans in prose are not."""
    in_block = False
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if in_block:
            line = pending + raw.strip().removeprefix("$ ")
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            for part in re.split(r" ; | && ", line):
                if part.split(" ", 1)[0] in PROGRAMS:
                    yield number, part, True
        else:
            for match in _INLINE.finditer(raw):
                yield number, match.group(1), False


def argv_of(command: str) -> list[str]:
    """The argv a reader would type: comments dropped, `[--opt X]` taken as written and
    `[a|b]` as its first alternative."""
    command = re.split(r"\s+#\s", command, maxsplit=1)[0]
    while _OPTIONAL.search(command):
        command = _OPTIONAL.sub(lambda m: m.group(1).split("|")[0], command)
    return shlex.split(command)


def refusal(argv: list[str], complete: bool, capsys: pytest.CaptureFixture[str]) -> str | None:
    """None when the program's parser accepts argv, else its error line."""
    program, args = argv[0], argv[1:]
    try:
        if program == "stowagectl":
            ctl_main.build_parser().parse_args(args)
        else:
            cli.parse(args)
    except SystemExit as exc:
        err = capsys.readouterr().err.strip()
        if exc.code == 0:
            return None
        if not complete and "the following arguments are required" in err:
            return None
        return err or f"exit status {exc.code}"
    return None


def test_docs_show_commands() -> None:
    found = [c for f in doc_files() for c in command_lines(f.read_text(encoding="utf-8"))]
    shown = {argv_of(cmd)[0] for _, cmd, complete in found if complete}
    assert shown == set(PROGRAMS), "README should show both programs in a code block"
    assert len(found) >= 25


def test_every_documented_command_parses(capsys: pytest.CaptureFixture[str]) -> None:
    bad = []
    for path in doc_files():
        for number, command, complete in command_lines(path.read_text(encoding="utf-8")):
            error = refusal(argv_of(command), complete, capsys)
            if error:
                bad.append(f"{path.relative_to(ROOT)}:{number}: {command!r}: {error}")
    assert not bad, "documented commands the CLI refuses:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("```\nstowagectl volume create demo --size 1Gx\n```", "invalid size '1Gx'"),
        ("```\nstowagectl volume create demo --colour red\n```", "unrecognized arguments"),
        ("```\nstowage-csi --mode sometimes\n```", "invalid choice"),
        ("Run `stowagectl pool create --size 16Q` first.", "invalid size '16Q'"),
        ("```sh\nstowage-csi --endpoint unix:///s \\\n  --reserved-bytes lots\n```", "lots"),
    ],
)
def test_a_drifted_doc_is_caught(
    doc: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (command,) = [(cmd, complete) for _, cmd, complete in command_lines(doc)]
    error = refusal(argv_of(command[0]), command[1], capsys)
    assert error is not None
    assert expected in error


def test_inline_mentions_may_omit_required_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    ((_, command, complete),) = list(command_lines("Runs `stowagectl demo` at the end."))
    assert not complete
    assert refusal(argv_of(command), complete, capsys) is None
    assert refusal(argv_of(command), True, capsys) is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1Gi", 1 << 30), ("512Mi", 512 << 20), ("1G", 10**9), ("16Gi", 16 << 30), ("2Gi", 2 << 30),
     ("1500k", 1_500_000), ("1048576", 1 << 20), ("1.5Gi", 3 << 29)],
)
def test_sizes_are_kubernetes_quantities(text: str, expected: int) -> None:
    assert ctl_main.size(text) == expected


@pytest.mark.parametrize("text", ["1Gx", "1gi", "", "-1Gi", "0", "100m", "1 Gi", "0x10", "lots"])
def test_bad_sizes_are_refused_in_one_line(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ctl_main.build_parser().parse_args(["volume", "create", "demo", f"--size={text}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("stowagectl volume create: error: argument --size: invalid size")


def test_reserved_bytes_takes_a_quantity(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.parse(["--reserved-bytes", "10Gi"]).reserved_bytes == 10 << 30
    assert cli.parse(["--reserved-bytes", "0"]).reserved_bytes == 0
    with pytest.raises(SystemExit) as exc:
        cli.parse(["--reserved-bytes=-1Gi"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
