"""The package's layers, written once (setup.cfg's [importlinter] contract) and checked by the
maintained tool for it; every folder's "May import" line says the same as the contract."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "split_trainer"


def _layers() -> list[list[str]]:
    """The contract's layers, top first, each a list of its folders (peers joined by |)."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    text = parser["importlinter:contract:layers"]["layers"]
    return [[name.strip().removeprefix("split_trainer.") for name in line.split("|")]
            for line in text.strip().splitlines()]


def test_the_layer_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")  # installed with the test extra, beside this Python
    done = subprocess.run([str(lint), "--config", str(ROOT / "setup.cfg"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout, done.stdout[-2000:]
    assert "ignore_imports" not in (ROOT / "setup.cfg").read_text()  # no exception listed


def test_every_folder_says_what_the_contract_lets_it_import():
    layers = _layers()
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert sorted(name for layer in layers for name in layer if name != "__main__") == folders
    for i, layer in enumerate(layers):
        below = {name for lower in layers[i + 1:] for name in lower}
        for name in layer:
            if name == "__main__":
                continue
            doc = (PACKAGE / name / "__init__.py").read_text()
            said = re.search(r"May import: ([^.]*)\.", doc)
            assert said, f"{name}/__init__.py has no 'May import:' line"
            listed = re.sub(r"\([^)]*\)", "", said.group(1))  # what a parenthesis says of a layer is not one
            named = set() if listed.startswith("nothing") else {part.strip() for part in listed.split(",")}
            assert named == below, (name, named, below)
