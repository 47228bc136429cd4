"""Every YAML in configs/ and callbacks/ must be driven through the real CLI by some test."""

from conftest import ROOT


def test_every_yaml_is_named_by_a_cli_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    yamls = sorted([*(ROOT / "configs").rglob("*.yaml"), *(ROOT / "callbacks").glob("*.yaml")])
    assert yamls
    missing = [str(p.relative_to(ROOT)) for p in yamls if str(p.relative_to(ROOT)) not in tests]
    assert not missing, f"YAMLs no test runs through the CLI: {missing}"
