from pathlib import Path

from sdlora.cli import build_parser
from sdlora.config import options_markdown

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_readme_option_table_is_generated_from_the_config():
    block = README.split("<!-- options:start -->\n")[1].split("<!-- options:end -->")[0]
    assert block.strip() == options_markdown().strip(), "regenerate with sdlora.config.options_markdown()"


def test_every_command_has_help_and_is_documented():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert sub.description, name
        assert f"sdlora {name}" in README or f"make {name}" in README, name


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README
