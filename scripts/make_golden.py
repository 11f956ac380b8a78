"""Regenerates every golden file under tests/data from the reference libraries.

The oracles are installed from PyPI into the project venv by
`bash scripts/setup.sh --oracles` (transformers, peft, bitsandbytes, tokenizers,
safetensors, sentencepiece, tiktoken: pinned there). Each topic has its own
generator, scripts/golden/<topic>.py, which writes only under
tests/data/<topic>/ with fixed seeds, so running this twice gives the same
files and `git diff` after a run shows whether a library upgrade changed an
answer.

    .venv/bin/python scripts/make_golden.py            # every topic
    .venv/bin/python scripts/make_golden.py quant io   # some topics
"""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv):
    scripts = sorted((ROOT / "scripts" / "golden").glob("*.py"))
    if argv:
        wanted = set(argv)
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            sys.exit(f"unknown topic(s) {sorted(unknown)}; topics: {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem in wanted]
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=ROOT).returncode != 0:
            failed.append(script.stem)
    if failed:
        sys.exit(f"golden generation failed for: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
