"""Copy every benchmarks/results/<name>.md into README.md between `<!-- bench:<name> -->` markers.

python benchmarks/update_readme.py
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    for table in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        name = table.stem
        pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> section")
        figures = table.read_text(encoding="utf-8").strip()
        text = pattern.sub(
            lambda match, figures=figures: f"{match.group(1)}{figures}\n{match.group(2)}", text
        )
    readme.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
