"""Reads a GGUF file with the `gguf` package (llama.cpp's gguf-py) and prints its metadata and
tensors as JSON: {"fields": {key: value}, "tensors": {name: {"ne": [...], "type": "F32",
"data": [...]}}}. Run by tests/test_gguf_export.cpp.

    python tests/scripts/read_gguf.py FILE.gguf
"""
import json
import sys

import gguf


def main(argv):
    r = gguf.GGUFReader(argv[1])
    fields = {k: (f.contents() if not isinstance(f.contents(), bytes) else f.contents().decode())
              for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: {"ne": [int(d) for d in t.shape], "type": t.tensor_type.name,
                        "data": [float(x) for x in t.data.flatten()]} for t in r.tensors}
    print(json.dumps({"fields": fields, "tensors": tensors}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
