"""Copy every benchmarks/results/<name>.md into README.md between `<!-- bench:<name> -->` markers, and into
model_card.md (the card the package ships and writes into every converted folder) where it has such markers.

python benchmarks/update_readme.py
"""

import argparse
import re

from harness import REPOSITORY, RESULTS_DIR

# document -> whether it must hold a section for every table
DOCUMENTS = {"README.md": True, "model_card.md": False}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    for document, every_table in DOCUMENTS.items():
        path = REPOSITORY / document
        text = path.read_text(encoding="utf-8")
        for table in sorted(RESULTS_DIR.glob("*.md")):
            name = table.stem
            pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.DOTALL)
            if not pattern.search(text):
                if every_table:
                    raise SystemExit(
                        f"{document} has no <!-- bench:{name} --> ... <!-- /bench:{name} --> section"
                    )
                continue
            figures = table.read_text(encoding="utf-8").strip()
            text = pattern.sub(
                lambda match, figures=figures: f"{match.group(1)}{figures}\n{match.group(2)}", text
            )
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
