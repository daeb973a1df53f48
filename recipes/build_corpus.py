"""Build the demo corpus shipped in data/corpus.jsonl from the docstrings of Python's standard library.

Each document is one docstring (module, class or function) of at least --min_chars characters, taken from
the source files with `ast` (nothing is imported or executed), cleaned with `inspect.cleandoc`, and
deduplicated. Test packages are skipped. The output is one JSON object per line: {"source": ..., "text": ...}.

The shipped file was built with CPython 3.11.7:

    python recipes/build_corpus.py --output data/corpus.jsonl

Another Python version gives a slightly different corpus; the shipped one is what the demo and tests use.
"""

import argparse
import ast
import json
import pathlib
import sysconfig

SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def iter_docstrings(stdlib: pathlib.Path, min_chars: int):
    """Yield (source, docstring) in a deterministic order: files sorted by path, nodes in `ast.walk` order."""
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS.intersection(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, DOCSTRING_NODES):
                continue
            docstring = ast.get_docstring(node, clean=True)
            if docstring and len(docstring) >= min_chars:
                name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                yield name, docstring.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="data/corpus.jsonl")
    parser.add_argument("--min_chars", type=int, default=120, help="shortest docstring kept (characters)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library folder")
    args = parser.parse_args()

    seen = set()
    num_docs = num_chars = 0
    with open(args.output, "w", encoding="utf-8") as out:
        for source, text in iter_docstrings(pathlib.Path(args.stdlib), args.min_chars):
            if text in seen:
                continue
            seen.add(text)
            out.write(json.dumps({"source": source, "text": text}, ensure_ascii=False) + "\n")
            num_docs += 1
            num_chars += len(text)
    print(f"wrote {num_docs} documents, {num_chars} characters to {args.output}")


if __name__ == "__main__":
    main()
