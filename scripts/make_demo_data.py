#!/usr/bin/env python3
"""Generate the shipped demo data set: data/demo/{train,eval}.{alpaca,chat}.jsonl.

One synthetic task whose answer can be checked exactly: is a number even or
odd ("Is 4817 even or odd?" -> "odd"). `qlora demo` trains a LoRA adapter for
a tiny random-weight Llama on it, so the task has to be one that such a model
learns in well under a minute on a CPU: the answer comes from a set of two and is
decided by one feature of the prompt (the last digit), so what is learned on
the training numbers carries over to numbers never seen in training, and the
fine-tune's effect shows as held-out exact match, not only as loss.
Everything is generated here from a fixed seed with the standard library:
no external text, license-clean.

    python3 scripts/make_demo_data.py           # (re)write data/demo/
    python3 scripts/make_demo_data.py --check   # regenerate in memory, compare with the files

Each item is one (instruction, input, output) triple plus its task name. The
alpaca file stores it as {"task","instruction","input","output"}; the chat file
as {"task","messages":[user, assistant]} where the user message is the
instruction, followed by a blank line and the input when there is one. The
held-out split is drawn first from a pool of distinct (instruction, input)
pairs, so no held-out prompt appears in train (checked below and by
tests/test_data_demo.cpp).
"""
import argparse
import json
import os
import random
import sys

SEED = 20261207
N_TRAIN = 3000
N_EVAL = 300
MAX_BYTES = int(1.5 * 1024 * 1024)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "data", "demo")


def parity_item(rng, odd):
    n = 2 * rng.randint(0 if odd else 1, 4999) + odd  # 1..9999
    return {"task": "parity", "instruction": f"Is {n} even or odd?", "input": "",
            "output": "odd" if odd else "even"}


def generate():
    rng = random.Random(SEED)
    seen = set()
    items = []
    while len(items) < N_TRAIN + N_EVAL:
        item = parity_item(rng, odd=len(items) % 2)  # even and odd in turn: half each
        key = (item["instruction"], item["input"])
        if key in seen:
            continue  # distinct prompts only: held-out items can never recur in train
        seen.add(key)
        items.append(item)
    rng.shuffle(items)
    return items[N_EVAL:], items[:N_EVAL]


def user_text(item):
    return item["instruction"] + ("\n\n" + item["input"] if item["input"] else "")


def alpaca_line(item):
    return json.dumps(item, ensure_ascii=False)


def chat_line(item):
    return json.dumps({"task": item["task"], "messages": [
        {"role": "user", "content": user_text(item)},
        {"role": "assistant", "content": item["output"]}]}, ensure_ascii=False)


def render():
    train, held_out = generate()
    files = {}
    for split, items in (("train", train), ("eval", held_out)):
        files[f"{split}.alpaca.jsonl"] = "".join(alpaca_line(i) + "\n" for i in items)
        files[f"{split}.chat.jsonl"] = "".join(chat_line(i) + "\n" for i in items)
    return train, held_out, files


def check_split(train, held_out):
    train_keys = {(i["instruction"], i["input"]) for i in train}
    leaked = [i for i in held_out if (i["instruction"], i["input"]) in train_keys]
    assert not leaked, f"{len(leaked)} held-out prompts appear in train: {leaked[:3]}"
    assert len(train) == N_TRAIN and len(held_out) == N_EVAL


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = ap.parse_args()
    train, held_out, files = render()
    check_split(train, held_out)
    total = sum(len(t.encode()) for t in files.values())
    assert total < MAX_BYTES, f"demo data is {total} bytes, over the {MAX_BYTES} budget"
    if args.check:
        bad = []
        for name, text in files.items():
            path = os.path.join(OUT_DIR, name)
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                bad.append(name)
        if bad:
            print(f"data/demo differs from the generator: {', '.join(bad)}; "
                  "rerun scripts/make_demo_data.py", file=sys.stderr)
            return 1
        print(f"data/demo matches the generator ({total} bytes)")
        return 0
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(OUT_DIR, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"wrote data/demo/{name} ({len(text.encode())} bytes)")
    counts = {}
    for i in held_out:
        counts[i["task"]] = counts.get(i["task"], 0) + 1
    print(f"{len(train)} train, {len(held_out)} held-out items; held-out per task: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
