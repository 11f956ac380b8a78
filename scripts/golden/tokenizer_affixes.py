"""A BPE tokenizer.json with continuing_subword_prefix "##" and end_of_word_suffix "</w>"
(trained here by the tokenizers library on a fixed text) and its ids for a few strings:
tests/data/tokenizer_affixes/. The families qlora targets do not use these options; this
file checks that qlora reads them as tokenizers does.

    .venv/bin/python scripts/make_golden.py tokenizer_affixes
"""
import json
import pathlib

import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "tokenizer_affixes"

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "unbelievable tokenization of unusual words happens here",
    "lower lowest newer newest wider widest",
    "the the the there their theirs",
] * 20

STRINGS = ["the lowest tokenization", "unbelievably new", "foxes jump", "zebra", "", "a b  c", "théâtre ünïcode"]


def main():
    tok = Tokenizer(models.BPE(continuing_subword_prefix="##", end_of_word_suffix="</w>", unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"], continuing_subword_prefix="##",
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    tok = Tokenizer.from_file(str(OUT / "tokenizer.json"))
    cases = [{"text": s, "ids": tok.encode(s, add_special_tokens=False).ids} for s in STRINGS]
    (OUT / "golden.json").write_text(json.dumps({"tokenizers": tokenizers.__version__, "cases": cases}, ensure_ascii=False,
                                                indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
