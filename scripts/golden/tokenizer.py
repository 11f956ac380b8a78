#!/usr/bin/env python3
"""Golden data for tests/test_tokenizer.cpp.

    .venv/bin/python scripts/golden/tokenizer.py

Writes under tests/data/tokenizer/ only:
  corpus.json            the hard corpus: {"lines": [{"text": str} | {"bytes_b64": str}]},
                         hand-written lines then seeded random ones ("random": true) drawn
                         from a pool of whitespace, letters, marks, digits, emoji, contractions
                         and special-token fragments
                         (bytes lines hold invalid UTF-8; their golden ids are those of
                         bytes.decode("utf-8", errors="replace"), see Note [Invalid UTF-8])
  bpe/                   a small byte-level BPE tokenizer.json trained here with Llama 3's
                         pre-tokenizer regex, ignore_merges, Llama 3 style special tokens
                         and a TemplateProcessing bos; tokenizer_config.json
  bpe_string_merges/     the same tokenizer with merges written as "a b" strings (old format)
  bpe_qwen2/             a smaller one with Qwen2's regex (\p{N} where Llama 3 has \p{N}{1,3})
  spm/                   a small sentencepiece BPE (byte_fallback) tokenizer.model trained here
                         with Llama 2's settings; tokenizer_config.json
  golden_<name>.json     per tokenizer: ids of every corpus line, HF's decode of those ids,
                         and whether decode round-trips the line
  real_llama3.json       ids from tiktoken (allowed_special="all") for the real Llama 3
                         tokenizer.model in ../shared/data (only when that folder exists)
  real_llama2.json       ids from transformers' LlamaTokenizer for the real Llama 2 model

Oracles: `tokenizers` for the byte-level BPE; transformers' LlamaTokenizer (the class
AutoTokenizer picks for a Llama model directory) for sentencepiece; tiktoken for Llama 3's tiktoken file.
Everything is deterministic (fixed seeds, single-threaded training).
"""
import base64
import io
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic BPE training
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "tokenizer"
SHARED = ROOT.parent / "shared" / "data"

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"] + [
                       f"<|reserved_special_token_{i}|>" for i in range(2, 246)]


def corpus():
    text = [
        "",
        "Hello world",
        " Hello",
        "  Hello",
        "Hello  ",
        "   ",
        " ",
        "I ❤️ 🦙s! 👨‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽 ok",
        "日本語のテキスト、中文文本。한국어 텍스트",
        "café naïve résumé",  # NFC
        "cafe\u0301 nai\u0308ve re\u0301sume\u0301",  # NFD
        "مرحبا بالعالم 123",
        "שלום עולם",
        "नमस्ते दुनिया",
        "def f(x):\n\treturn x**2  # square\n\n\nif __name__ == '__main__':\n    print(f(3))",
        "a\n\n\nb",
        "  \n ",
        "\t\t x",
        "x   \n\n  y",
        "end with spaces   ",
        "\r\n\r\nwindows\r\nlines\r\n",
        " \u00a0 \u3000x\u2009y\u202fz",
        "\x0b\x0c\x1c\x1d\x85 controls",
        "1234567",
        "3.14159 1,000,000 12ab34 0x1F",
        "٣٤٥٦ ١٢ ١٢٣٤٥",
        "１２３４ fullwidth",
        "Ⅻ ½ ² ③",
        "I'LL don't they're we've I'm he'd it's 'S 'ſ 'VE",
        "’s curly ’ll",
        "<|begin_of_text|>Hello<|eot_id|>",
        "a <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "<s>x</s> <unk>",
        "</s>",
        " </s> b",
        "a</s>b",
        "<|eot_id|><|eot_id|>",
        "<|eot_id",
        "Ünïcödé ÅÉÎ ß ﬁ Ǆ ǅ",
        "URL https://example.com/a?b=c&d=e#f email@x.org",
        "$100.00 (50%) & <tag attr=\"v\">",
        "....!!!???",
        "---\n***\n",
        "\\n literal",
        "tab\tseparated\tvalues\t",
        "a" * 300,
        " " * 50 + "x",
        "\n" * 20,
        "ÿ\u0100\u0101 edge",
        "nul\u0000byte",
        "\ue000 private use",
        "The quick brown fox jumps over the lazy dog.",
        "Mixed: αβγ ДЖЗ ĳ ŉ Ω",
    ]
    bad = [
        b"abc\xff\xfe def",
        b"\xe2\x82 truncated",
        b"\xed\xa0\x80 surrogate",
        b"\xc0\xaf overlong",
        b"caf\xc3",
    ]
    return text, bad


RANDOM_POOL = {
    # weight, choices: units the random lines are made of (seeded, see random_lines)
    "ascii": (30, list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")),
    "digit": (8, list("0123456789")),
    "punct": (8, list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'")),
    "space": (12, [" ", " ", "  ", "\t", "\n", "\n\n", "\r\n", "\r", "\x0b", "\x0c", "\x85",
                   "\xa0", "\u2028", "\u3000", "\u2009", " \n ", "\n "]),
    "letter": (10, list("éßſǄǅαЖщשع日本한กไÅﬁĳ")),
    "mark": (3, ["\u0301", "\u0308", "\u093f", "\u0e31", "\u200d", "\ufe0f"]),
    "number": (3, list("٣١５Ⅻ½²③")),
    "emoji": (3, ["😀", "🦙", "🏽", "👨‍👩‍👧", "🏳️‍🌈", "❤️"]),
    "symbol": (3, list("€©™—…“”’«»")),
    "contraction": (4, ["'s", "'T", "'re", "'LL", "'ve", "'d", "'m", "'ſ", "n't"]),
    "special": (2, ["<|eot_id|>", "<|begin_of_text|>", "</s>", "<s>", "<unk>", "<tool>", "xyzzy",
                    "<|eot_id", "|>"]),
}


def random_lines(seed, count):
    rng = random.Random(seed)
    kinds = list(RANDOM_POOL)
    weights = [RANDOM_POOL[k][0] for k in kinds]
    lines = []
    for _ in range(count):
        units = [rng.choice(RANDOM_POOL[rng.choices(kinds, weights)[0]][1])
                 for _ in range(rng.randint(0, 40))]
        lines.append("".join(units))
    return lines


def train_text(seed):
    rng = random.Random(seed)
    words = ("the of and to in is you that it he was for on are as with his they at be this "
             "from have or by one had not word but what all were we when your can said there "
             "use an each which she do how their if will up other about out many then them "
             "hello world data model train token llama python return print def class import "
             "café naïve über straße 日本 中文 한국 мир привет مرحبا שלום").split()
    lines = []
    for _ in range(3000):
        n = rng.randint(3, 12)
        parts = []
        for _ in range(n):
            r = rng.random()
            if r < 0.75:
                w = rng.choice(words)
                parts.append(w.capitalize() if rng.random() < 0.2 else w)
            elif r < 0.85:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.93:
                parts.append(rng.choice([",", ".", "!", "?", "(x)", "==", "->", "'s", "'ll", "n't"]))
            else:
                parts.append(rng.choice(["\n", "\n\n", "\t", "  ", "    "]))
        lines.append(" ".join(parts))
    return lines


def build_bpe(dirpath, pattern=LLAMA3_PATTERN, vocab_size=1200):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(train_text(1), trainer=trainer)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    # Two normal added tokens with the flags Hugging Face supports (Llama 3 uses none).
    tok.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True, normalized=False),
                    AddedToken("xyzzy", single_word=True, normalized=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    dirpath.mkdir(parents=True, exist_ok=True)
    tok.save(str(dirpath / "tokenizer.json"))
    (dirpath / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|eot_id|>", "special": True},
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
    }, indent=1) + "\n")
    return tok


def string_merges_copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    j = json.loads((src / "tokenizer.json").read_text())
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    (dst / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False))
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")


def build_spm(dirpath):
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_text(2)), model_writer=buf, model_type="bpe",
        vocab_size=600, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, seed_sentencepiece_size=100000,
        shuffle_input_sentence=False)
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "tokenizer.model").write_bytes(buf.getvalue())
    (dirpath / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
    }, indent=1) + "\n")


def line_texts(text, bad):
    return text + [b.decode("utf-8", errors="replace") for b in bad]


def golden(name, texts, encode, decode, path):
    ids = [encode(t) for t in texts]
    dec = [decode(i) for i in ids]
    out = {"tokenizer": name, "ids": ids, "decoded": dec,
           "roundtrip": [d == t for d, t in zip(dec, texts)]}
    path.write_text(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({len(ids)} lines, "
          f"{sum(len(i) for i in ids)} ids, {sum(out['roundtrip'])} round-trip)")


def llama_tokenizer(dirpath):
    # What AutoTokenizer builds for a Llama model directory (tokenizer_class LlamaTokenizer).
    from transformers import LlamaTokenizer
    return LlamaTokenizer.from_pretrained(str(dirpath))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    text, bad = corpus()
    rand = random_lines(3, 250)
    (OUT / "corpus.json").write_text(json.dumps({
        "lines": [{"text": t} for t in text] +
                 [{"bytes_b64": base64.b64encode(b).decode()} for b in bad] +
                 [{"text": t, "random": True} for t in rand]},
        ensure_ascii=False, indent=0) + "\n")
    texts = line_texts(text, bad) + rand
    print(f"wrote corpus.json ({len(texts)} lines: {len(text) + len(bad)} hand-written, "
          f"{len(rand)} random)")

    bpe = build_bpe(OUT / "bpe")
    string_merges_copy(OUT / "bpe", OUT / "bpe_string_merges")
    golden("bpe", texts, lambda t: bpe.encode(t, add_special_tokens=False).ids,
           lambda i: bpe.decode(i, skip_special_tokens=False), OUT / "golden_bpe.json")

    qwen = build_bpe(OUT / "bpe_qwen2", pattern=QWEN2_PATTERN, vocab_size=700)
    golden("bpe_qwen2", texts, lambda t: qwen.encode(t, add_special_tokens=False).ids,
           lambda i: qwen.decode(i, skip_special_tokens=False), OUT / "golden_bpe_qwen2.json")

    build_spm(OUT / "spm")
    sp = llama_tokenizer(OUT / "spm")
    print("spm oracle:", type(sp).__name__, sp.backend_tokenizer.pre_tokenizer)
    golden("spm", texts, lambda t: sp.encode(t, add_special_tokens=False),
           lambda i: sp.decode(i, skip_special_tokens=False), OUT / "golden_spm.json")

    if not SHARED.is_dir():
        print(f"{SHARED} absent: real_*.json not written")
        return
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    l3 = SHARED / "llama3-tokenizer" / "tokenizer.model"
    ranks = load_tiktoken_bpe(str(l3))
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)})
    golden("llama3 tiktoken", texts, lambda t: enc.encode(t, allowed_special="all"),
           lambda i: enc.decode(i), OUT / "real_llama3.json")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(SHARED / "llama2-tokenizer" / "tokenizer.model", tmp)
        l2 = llama_tokenizer(tmp)
        golden("llama2 sentencepiece", texts, lambda t: l2.encode(t, add_special_tokens=False),
               lambda i: l2.decode(i, skip_special_tokens=False), OUT / "real_llama2.json")
        # Cross-check (not a golden file): the Llama 3 file converted to a tokenizer.json by
        # transformers must tokenize as tiktoken does.
        try:
            from transformers.convert_slow_tokenizer import TikTokenConverter
            conv = TikTokenConverter(vocab_file=str(l3), pattern=LLAMA3_PATTERN,
                                     extra_special_tokens=LLAMA3_SPECIALS).converted()
            conv_path = pathlib.Path(tempfile.gettempdir()) / "qlora_llama3_tokenizer.json"
            conv.save(str(conv_path))
            diff = sum(conv.encode(t, add_special_tokens=False).ids != enc.encode(t, allowed_special="all")
                       for t in texts)
            print(f"llama3 tiktoken vs transformers-converted tokenizer.json ({conv_path}): "
                  f"{diff} of {len(texts)} lines differ")
        except Exception as e:  # optional cross-check
            print("llama3 tokenizer.json conversion skipped:", type(e).__name__, e)


if __name__ == "__main__":
    sys.exit(main())
