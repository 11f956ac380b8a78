#!/usr/bin/env python3
"""Golden ids of real and test tokenizers on a hard corpus, for Hugging Face-exact tokenization.

    .venv/bin/python scripts/make_golden.py tokenizer_parity

Writes under tests/data/tokenizer_parity/ only:
  corpus.json         the hard corpus, one case per line:
                        {"tag": str, "text": str}                 a plain string
                        {"tag": str, "bytes_hex": str, "text": str}
                                                                  invalid UTF-8: the raw bytes and
                                                                  bytes.decode("utf-8", "replace"),
                                                                  the text every golden id list below
                                                                  was computed from (a C++ tokenizer
                                                                  reads the bytes and must sanitize
                                                                  them into exactly this text)
                      hand-written cases (mixed scripts, emoji, digits, whitespace, code,
                      contractions, special-token texts, NFC/NFD, compatibility and control
                      characters, long words) then seeded random ones (tag "random").
  <name>.json         one per tokenizer.json: ../shared/data/<name>/tokenizer.json (the real
                      ones; name = folder, e.g. qwen2-tokenizer) and tests/data/tokenizer/<dir>/
                      (name tests-<dir>). Header: source path relative to the repo root, its
                      sha256, the oracle and its version, corpus sha256; then "cases", index i
                      for corpus line i:
                        ids       Tokenizer.from_file(source).encode(text, add_special_tokens=False).ids
                        ids_bos   the same with add_special_tokens=True (post-processor applied)
                        decoded   decode(ids, skip_special_tokens=False)
                        decoded_bos  decode(ids_bos, skip_special_tokens=False), only where it
                                  differs from decoded
  llama2-tokenizer.json  sentencepiece on ../shared/data/llama2-tokenizer/tokenizer.model:
                      ids = SentencePieceProcessor.encode(text) (special-token texts such as
                      "<s>" are plain text to sentencepiece), ids_bos = encode(text, add_bos=True),
                      decoded = decode(ids).
  llama3-tokenizer.json  tiktoken on ../shared/data/llama3-tokenizer/tokenizer.model with Llama 3's
                      pattern and 256 special tokens (ids 128000..): ids =
                      encode(text, allowed_special="all") (special-token texts match, as added
                      tokens do in Hugging Face), ids_bos = [128000] + ids (what Llama 3's
                      tokenizer.json post-processor adds), decoded = decode(ids).
The real tokenizers are read from ../shared/data and skipped with a note where it is absent
(they are not copied into the repo); so are the two .model oracles where sentencepiece or
tiktoken is not installed. Deterministic: fixed corpus, fixed seed, sorted outputs.
"""
import hashlib
import json
import os
import pathlib
import random
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "tokenizer_parity"
SHARED = ROOT.parent / "shared" / "data"
TESTS = ROOT / "tests" / "data" / "tokenizer"

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIALS  # noqa: E402  (same Llama 3 setup)


def hard_corpus():
    """(tag, text) pairs, written here by hand. Escapes spell out every invisible character."""
    c = []

    def add(tag, *texts):
        c.extend((tag, t) for t in texts)

    add("basic", "", "Hello world", "hello", "HELLO WORLD", "The quick brown fox jumps over the lazy dog.")
    add("edge-space", " ", "  ", "   ", " " * 17, " Hello", "  Hello", "Hello ", "Hello   ",
        " leading and trailing ", "\t", "\n", " \n ", "\n\n\n", "a\n\n\nb", "a \n\n \nb",
        "\t\t x", "x\t\ty", "x   \n\n  y", "line1\r\nline2\r\n", "\r\n\r\n", "\r", "a\rb",
        "nbsp\u00a0here \u00a0 x", "ideographic\u3000space\u3000\u3000x", "line\u2028sep\u2029para",
        "thin\u2009narrow\u202fem\u2003x", "\u00a0", "\u3000", "\x0b\x0c\x1c\x1d\x1e\x1f\x85 ctl",
        "tab\tseparated\tvalues\t", "ends with newline\n", "   \n\t  \r\n  ")
    add("latin", "café naïve résumé coöperate Zürich São Paulo Kraków", "Ärger Öl Übermaß straße STRASSE",
        "ÅÉÎÕÜ àèìòù ÿ Ÿ œ Œ æ Æ ø Ø ð Þ ı İ ǅ Ǆ ǆ ſ ß ẞ",
        "Voilà, l'été à Noël — «déjà vu»", "Ångström Ñandú Łódź Ďábel Ęę Ğğ Şş Țț")
    add("nfd", "cafe\u0301 nai\u0308ve re\u0301sume\u0301", "e\u0301", "\u00e9",
        "A\u030a vs \u00c5 vs \u212b", "o\u0308\u0301 stacked marks", "\u0301 leading mark",
        "x\u0301\u0302\u0303\u0304\u0305\u0306\u0307\u0308\u0309 zalgo",
        "\u1112\u1161\u11ab\u1100\u1173\u11af jamo", "\ud55c\uae00 composed",
        "\u1100\u1161 \uac00 \u1100\u1161\u11a8 \uac01", "\u3131\u314f compatibility jamo",
        # HF's NFC/NFD tables are Unicode 9.0: U+1DFA (Unicode 10, ccc 218) counts as a starter
        # there, so no reordering and e + U+0301 across it stays uncomposed; U+A7F2 has no NFKC.
        "e\u1dfa\u0301 a\u0308\u1dfa \ua7f2")
    add("scripts", "Привет, мир! Съешь же ещё этих мягких французских булок.",
        "ΑΒΓ αβγ Καλημέρα κόσμε ς σ Σ ΐ", "مرحبا بالعالم، كيف حالك؟", "العَرَبِيَّة مع تشكيل",
        "שלום עולם! עִבְרִית", "नमस्ते दुनिया। हिन्दी क्षत्रिय", "สวัสดีชาวโลก ภาษาไทย",
        "日本語のテキスト、中文文本。", "汉字漢字かなカナｶﾅ", "한국어 텍스트입니다.",
        "ქართული Հայերեն አማርኛ ᏣᎳᎩ", "தமிழ் తెలుగు ಕನ್ನಡ മലയാളം বাংলা ગુજરાતી ਪੰਜਾਬੀ",
        "Mixed: αβγ ДЖЗ 中 한 ع ש x", "English中文English日本語English", "Русский123English",
        "𝐁𝐨𝐥𝐝 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 𝟙𝟚𝟛", "\U00020000\U0002a6d6 CJK ext B", "ᚠᛇᚻ runes 𐌰𐌱 gothic")
    add("emoji", "😀😃😄", "I ❤️ 🦙s!", "👨‍👩‍👧‍👦 family", "👩🏽‍💻 coder", "👍🏻👍🏼👍🏽👍🏾👍🏿",
        "🏳️‍🌈 🏴‍☠️ flags 🇺🇸🇯🇵🇩🇪", "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f scotland",
        "1️⃣ 2️⃣ #️⃣ *️⃣ keycaps", "☺ ☺️ ♥ ♥️ text vs emoji", "🤖🧠🔥💯✨", "emoji🙂inside🙂words")
    add("digits", "0", "7", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
        "9" * 64, "3.14159 2.71828 1,000,000 1_000_000", "0x1F 0b1010 1e-9 -42 +7", "12ab34cd56",
        "version 1.2.3-rc4", "2024-07-26T12:00:00Z", "$100.00 (50%) €9,99 ¥500",
        "٠١٢٣٤٥٦٧٨٩ ١٢ ١٢٣٤٥", "۰۱۲۳۴ persian", "०१२३ देवनागरी", "１２３４ fullwidth １",
        "² ³ ¹ ⁴ x² H₂O", "½ ⅓ ¼ ¾ ⅞", "Ⅰ Ⅱ Ⅻ ⅿ roman", "① ② ⑳ ㉑", "4 ½ months",
        "𝟎𝟏𝟐 math digits", "๑๒๓ thai", "〇一二三 kanji")
    add("contraction", "I'LL don't they're we've I'm he'd it's", "'s 'S 'll 'LL 'Ll 're 'RE 've 'VE 'm 'M 'd 'D 't 'T",
        "’s ’ll ’re curly U+2019", "‘quoted’ “double”", "'ſ 'K 'ß", "it''s '' ' 's",
        "O'Neill rock'n'roll", "DON'T WON'T CAN'T", "x's y'S z'll")
    add("code", "def f(x):\n    return x**2  # square\n",
        "if __name__ == '__main__':\n\tprint(f(3))\n\n\n",
        "class A(B):\n    def __init__(self, *args, **kwargs) -> None:\n        super().__init__()\n",
        "#include <vector>\nint main() { std::vector<int> v{1, 2, 3}; return v[0] >> 1; }\n",
        "template <typename T> auto f(T&& t) -> decltype(auto) { return std::forward<T>(t); }",
        '{"key": "value", "n": [1, 2.5, -3e4, true, null], "nested": {"a": {}}}',
        '{\n  "a": 1,\n  "b": "\\u00e9\\n"\n}', "for i in $(seq 1 10); do echo \"$i\" | grep -E '^[0-9]+$' >/dev/null; done",
        "ls -la ~/.config && cd /tmp || exit 1 2>&1", "x+=1;y-=2;z*=3;w/=4;a%=5;b**=6;c//=7",
        "<div class=\"a\">&nbsp;&lt;tag&gt;</div>", "SELECT * FROM t WHERE id = 42;",
        "    indented\n        more\n\t\tmixed", "a == b != c <= d >= e && f || !g",
        "...!!!???---***", "\\n\\t literal backslashes \\\\", "~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/")
    add("url", "https://example.com/a/b?c=d&e=f#g", "http://user:pass@例子.测试:8080/路径",
        "mailto:first.last+tag@sub.example.org", "git@github.com:org/repo.git", "www.x.org/~user/")
    add("special", "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>",
        "<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "<s>", "</s>", "<s>x</s> <unk>", " </s> b", "a</s>b", "<|end|>\n", "<|user|>\nhi<|end|>\n<|assistant|>",
        "<think>", "<think>\nreasoning\n</think>\n\nanswer", "<tool_call>{}</tool_call>",
        "a  <|end|>  b", "x <|im_end|> y", "  </s>  ", " <s> ", "<|begin_of_text|>Hello<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<|eot_id", "|>", "<|endoftext|",
        "<|ENDOFTEXT|>", "<fim_prefix>a<fim_suffix>b<fim_middle>", "<｜begin▁of▁sentence｜>x",
        "<|User|>q<|Assistant|>a<|EOT|>", "a  <tool>  b\n<tool>\tc <tool>",
        "xyzzy axyzzy xyzzyb _xyzzy xyzzy_ xyzzy, (xyzzy) é xyzzy\u0301",
        "Führer õ ÷ ø ü þ", "<unk><unk>")
    add("compat", "ﬁ ﬂ ﬀ ligatures", "ＡＢＣ ａｂｃ fullwidth", "① Ⓐ ⓐ ㎏ ㍻ ™ ℡", "ｶﾀｶﾅ halfwidth",
        "Ǆ ǅ ǆ Ĳ ĳ ŉ", "\u00b5 \u03bc \u2126 \u03a9 \u212a K micro ohm kelvin", "…‥ ‼ ⁇", "x\u00ady soft hyphen")
    add("control", "nul\x00byte", "\x00", "bell\x07tab\tesc\x1b[0m", "zero\u200bwidth\u200bspace",
        "\ufeffBOM at start", "mid\ufeffBOM", "zwj\u200dzwnj\u200c", "rtl\u200f\u202eoverride\u202c",
        "\x7f del \x80\x9f c1", "mongolian\u180evowel \u180e sep",
        # Unicode 16 digits and letters (Ol Onal, Kirat Rai): \p{N}, \p{L} and is_numeric know them.
        "u16: 1\U0001e5f1\U0001e5f2 \U00016d70x \U00016d43\U00016d44's", "\ue000 private use \U000f0000", "\ufffd replacement", "\ufffe\uffff nonchar")
    add("long", "a" * 300, "Pneumonoultramicroscopicsilicovolcanoconiosis" * 6,
        "supercalifragilisticexpialidocious" + "x" * 100 + "ÿ" * 50,
        "".join(chr(0x4e00 + (i * 37) % 2000) for i in range(200)), "ab" * 200, "-" * 120,
        " " * 200 + "x", "\n" * 40, "😀" * 40, "\u0301" * 30, "1" * 101,
        "word " * 60)
    return c


# Byte strings that are not UTF-8; the golden text is Python's decode with errors="replace"
# (one U+FFFD per maximal invalid subpart, as the Unicode standard recommends).
INVALID_UTF8 = [
    ("utf8-truncated", b"\xe2\x82 truncated"),
    ("utf8-truncated", b"\xf0\x9f\x98"),
    ("utf8-truncated", b"caf\xc3"),
    ("utf8-continuation", b"\x80"),
    ("utf8-continuation", b"a\xbfb\x80\x80c"),
    ("utf8-overlong", b"\xc0\xaf overlong"),
    ("utf8-overlong", b"\xe0\x80\xaf \xc1\xbf \xf0\x80\x80\xaf"),
    ("utf8-surrogate", b"\xed\xa0\x80 surrogate"),
    ("utf8-surrogate", b"\xed\xa0\xbd\xed\xb8\x80 pair"),
    ("utf8-ff", b"abc\xff\xfe def"),
    ("utf8-ff", b"\xff"),
    ("utf8-too-big", b"\xf4\x90\x80\x80 \xf5\x80 \xf8\x88\x80\x80\x80"),
    ("utf8-mixed", "é".encode() + b"\xe9" + "日".encode()[:2] + "本".encode() + b"\xc3"),
]

RANDOM_POOL = [
    # (weight, units): the random lines are built of these, seeded (see random_lines)
    (30, list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")),
    (8, list("0123456789")),
    (8, list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'")),
    (12, [" ", " ", "  ", "\t", "\n", "\n\n", "\r\n", "\r", "\x0b", "\x85", "\xa0", "\u2028",
          "\u3000", " \n ", "\n "]),
    (10, list("éßſǄαЖщשع日本한กไÅﬁĳ")),
    (3, ["\u0301", "\u0308", "\u093f", "\u0e31", "\u200d", "\ufe0f", "\u200b"]),
    (3, list("٣١５Ⅻ½²③")),
    (3, ["😀", "🦙", "🏽", "👨‍👩‍👧", "🏳️‍🌈", "❤️", "🇯🇵"]),
    (3, list("€©™—…“”’«»")),
    (4, ["'s", "'T", "'re", "'LL", "'ve", "'d", "'m", "’s", "n't"]),
    (3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>", "<s>", "<unk>", "<|end|>",
         "<think>", "<|eot_id|>", "<tool>", "xyzzy", "<|eot_id", "|>"]),
]


def random_lines(seed, count):
    rng = random.Random(seed)
    weights = [w for w, _ in RANDOM_POOL]
    lines = []
    for _ in range(count):
        units = [rng.choice(rng.choices(RANDOM_POOL, weights)[0][1]) for _ in range(rng.randint(1, 40))]
        lines.append("".join(units))
    return lines


def corpus():
    cases = [{"tag": tag, "text": t} for tag, t in hard_corpus()]
    cases += [{"tag": tag, "bytes_hex": b.hex(), "text": b.decode("utf-8", errors="replace")}
              for tag, b in INVALID_UTF8]
    cases += [{"tag": "random", "text": t} for t in random_lines(7, 30)]
    return cases


def dump_lines(header, key, rows):
    """JSON with one row per line: readable diffs, compact ids. ASCII only (escapes keep
    invisible and look-alike characters, NFC vs NFD, unambiguous)."""
    head = json.dumps(header, ensure_ascii=True, indent=1)[:-2]
    body = ",\n".join(json.dumps(r, ensure_ascii=True, separators=(",", ":")) for r in rows)
    return f'{head},\n "{key}": [\n{body}\n]}}\n'


def sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def rel(path):
    return os.path.relpath(path, ROOT)


def write(name, header, rows):
    path = OUT / f"{name}.json"
    path.write_text(dump_lines(header, "cases", rows))
    n_ids = sum(len(r["ids"]) for r in rows)
    print(f"wrote {rel(path)} ({len(rows)} cases, {n_ids} ids, {path.stat().st_size} bytes)")


def rows_for(texts, encode, encode_bos, decode):
    rows = []
    for t in texts:
        ids, ids_bos = encode(t), encode_bos(t)
        row = {"ids": ids, "ids_bos": ids_bos, "decoded": decode(ids)}
        dec_bos = decode(ids_bos)
        if dec_bos != row["decoded"]:
            row["decoded_bos"] = dec_bos
        rows.append(row)
    return rows


def main():
    import tokenizers
    from tokenizers import Tokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    cases = corpus()
    corpus_path = OUT / "corpus.json"
    corpus_path.write_text(dump_lines(
        {"about": "Hard corpus for tokenizer parity (scripts/golden/tokenizer_parity.py). "
                  "Golden ids are of 'text'; where 'bytes_hex' is present the input is those raw "
                  "bytes, not UTF-8, and 'text' is bytes.decode('utf-8', errors='replace')."},
        "lines", cases))
    texts = [c["text"] for c in cases]
    print(f"wrote {rel(corpus_path)} ({len(texts)} lines)")
    common = {"corpus": rel(corpus_path), "corpus_sha256": sha256(corpus_path)}

    sources = []
    if SHARED.is_dir():
        sources += [(p.parent.name, p) for p in sorted(SHARED.glob("*-tokenizer/tokenizer.json"))]
    else:
        print(f"{SHARED} absent: real tokenizers skipped")
    sources += [(f"tests-{p.parent.name}", p) for p in sorted(TESTS.glob("*/tokenizer.json"))]
    for name, path in sources:
        tok = Tokenizer.from_file(str(path))
        header = {"tokenizer": name, "source": rel(path), "sha256": sha256(path),
                  "oracle": "tokenizers", "version": tokenizers.__version__,
                  "ids": "Tokenizer.from_file(source).encode(text, add_special_tokens=False).ids",
                  "ids_bos": "encode(text, add_special_tokens=True).ids",
                  "decoded": "decode(ids, skip_special_tokens=False); decoded_bos likewise for "
                             "ids_bos, present only where it differs", **common}
        write(name, header, rows_for(
            texts, lambda t: tok.encode(t, add_special_tokens=False).ids,
            lambda t: tok.encode(t, add_special_tokens=True).ids,
            lambda i: tok.decode(i, skip_special_tokens=False)))

    l2 = SHARED / "llama2-tokenizer" / "tokenizer.model"
    try:
        import sentencepiece as spm
    except ImportError:
        spm = None
        print("sentencepiece not installed (bash scripts/setup.sh --oracles): llama2-tokenizer skipped")
    if spm is not None and l2.is_file():
        sp = spm.SentencePieceProcessor(model_file=str(l2))
        header = {"tokenizer": "llama2-tokenizer", "source": rel(l2), "sha256": sha256(l2),
                  "oracle": "sentencepiece", "version": spm.__version__,
                  "ids": "SentencePieceProcessor(model_file=source).encode(text) (special-token "
                         "texts are plain text here)",
                  "ids_bos": "encode(text, add_bos=True)",
                  "decoded": "decode(ids); decoded_bos likewise, only where it differs", **common}
        write("llama2-tokenizer", header, rows_for(
            texts, lambda t: sp.encode(t), lambda t: sp.encode(t, add_bos=True),
            lambda i: sp.decode(i)))

    l3 = SHARED / "llama3-tokenizer" / "tokenizer.model"
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        tiktoken = None
        print("tiktoken not installed (bash scripts/setup.sh --oracles): llama3-tokenizer skipped")
    if tiktoken is not None and l3.is_file():
        ranks = load_tiktoken_bpe(str(l3))
        specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
        enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                special_tokens=specials)
        bos = specials["<|begin_of_text|>"]
        header = {"tokenizer": "llama3-tokenizer", "source": rel(l3), "sha256": sha256(l3),
                  "oracle": "tiktoken", "version": tiktoken.__version__,
                  "pattern": LLAMA3_PATTERN, "special_tokens": LLAMA3_SPECIALS,
                  "special_first_id": len(ranks),
                  "ids": "tiktoken.Encoding(pattern, ranks, special_tokens).encode(text, "
                         "allowed_special='all')",
                  "ids_bos": f"[{bos}] + ids (<|begin_of_text|>)",
                  "decoded": "decode(ids) (invalid UTF-8 replaced); decoded_bos likewise, only "
                             "where it differs", **common}
        write("llama3-tokenizer", header, rows_for(
            texts, lambda t: enc.encode(t, allowed_special="all"),
            lambda t: [bos] + enc.encode(t, allowed_special="all"), lambda i: enc.decode(i)))

    total = sum(p.stat().st_size for p in OUT.glob("*.json"))
    print(f"tests/data/tokenizer_parity: {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
