"""attn_compiler/config.py reads every environment variable the package uses, and the README's table lists them."""
import re
from pathlib import Path

import pytest

from attn_compiler import config

ROOT = Path(__file__).resolve().parent.parent
READS = re.compile(r"os\.environ\.get\(|os\.environ\[|getenv\(|environ\.get\(")


def test_no_module_but_config_reads_the_environment():
    sources = [p for d in ("attn_compiler", "codegen", "patterns") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 20
    readers = [f"{p.relative_to(ROOT)}:{i}" for p in sources if p.name != "config.py"
               for i, line in enumerate(p.read_text().splitlines(), 1) if READS.search(line)]
    assert readers == [], readers


def test_the_readme_table_lists_every_variable():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Environment variables"):]
    table = table[:table.index("\n## ")]
    listed = set(re.findall(r"^\| `([A-Z_]+)`", table, re.M)) - {"MEMATTN_FUZZ"}   # the tests' own, read there
    assert listed == set(config.VARIABLES), (listed ^ set(config.VARIABLES))


def test_values_are_checked_against_the_allowed_ones(monkeypatch):
    monkeypatch.delenv("MEMATTN_TMA", raising=False)
    assert config.read("MEMATTN_TMA") == "auto"
    monkeypatch.setenv("MEMATTN_TMA", "1")
    assert config.read("MEMATTN_TMA") == "1"
    monkeypatch.setenv("MEMATTN_TMA", "yes")
    with pytest.raises(ValueError, match="MEMATTN_TMA='yes': expected one of '0', '1', 'auto'$"):
        config.read("MEMATTN_TMA")
    monkeypatch.setenv("MEMATTN_CACHE_DIR", "/some/where")
    assert config.cache_dir() == "/some/where"
    monkeypatch.delenv("MEMATTN_CACHE_DIR")
    assert config.cache_dir().endswith(".cache/memattn")
