#!/usr/bin/env python3
"""Single-thread throughput of Hugging Face `tokenizers` on a fixed ~10 MB corpus.

    .venv/bin/python scripts/bench_tokenizer.py ../shared/data/qwen2-tokenizer/tokenizer.json ...
    .venv/bin/python scripts/bench_tokenizer.py --write-corpus /tmp/tok_corpus.txt   # corpus only

Prints one JSON line per tokenizer.json given:
  {"bench":"tokenizer","system":"hf-tokenizers","version":..,"tokenizer":..,"bytes":..,"tokens":..,
   "seconds":..,"mb_per_s":..,"tokens_per_s":..,"method":..,"corpus_sha256":..,...}
mb_per_s is 10^6 bytes per second. `seconds` is the faster of two ways of encoding every line
(each line with its "\\n", add_special_tokens=False) on ONE thread (RAYON_NUM_THREADS=1,
TOKENIZERS_PARALLELISM=false, set before the import): a loop of Tokenizer.encode and
Tokenizer.encode_batch over batches of --batch lines. Each way starts from a freshly loaded
tokenizer (its BPE cache cold) and takes the best of --repeat passes; loading is not timed.
cpu_seconds (process CPU time of that pass) and mb_per_s_cpu come along: on a shared, loaded
machine they say more than wall time.

The corpus (deterministic, `--write-corpus PATH` writes its exact bytes for a C++ benchmark;
its sha256 is in every output line):
  - text files tracked by git in this repo (docs, sources, scripts; not tests/data), in
    `git ls-files` order, at most 35% of the target size: real code and English, so the corpus
    follows the checkout (compare corpus_sha256 before comparing numbers across commits);
  - the hard corpus of scripts/golden/tokenizer_parity.py, repeated to about 5%;
  - generated text for the rest: sentences drawn with a fixed seed from small word lists in
    English, German, French, Spanish, Russian, Greek, Arabic, Hebrew, Hindi, Thai, Chinese,
    Japanese and Korean, with numbers, punctuation, emoji and the odd code fragment;
  then every line is shuffled with a fixed seed and the text is cut at the first line end past
  --mb megabytes. The units encoded are exactly the file's lines, each with its "\n" (split the
  written file after every "\n" to encode the same pieces; a "\r" stays inside its line).
"""
import argparse
import hashlib
import json
import os
import pathlib
import random
import subprocess
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 20240726

WORDS = {
    "en": "the of and to in is you that it he was for on are as with his they at be this from have "
          "or by one had not word but what all were we when your can said there use an each which "
          "she do how their if will up other about out many then them these so some her would make "
          "like him into time has look two more write go see number way could people my than first "
          "water been call who oil its now find long down day did get come made may part model "
          "training gradient tokenizer adapter memory quantized weights checkpoint throughput",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch "
          "über größer Straße Mädchen Übung schön früh Bäume Öl Fußgänger Grüße außerdem",
    "fr": "le de un être et à il avoir ne je son que se qui ce dans en du elle au pour pas "
          "déjà été très où là français garçon œuvre noël naïve château forêt hôpital",
    "es": "el la de que y a en un ser se no haber por con su para como estar tener le lo "
          "año niño mañana canción corazón pequeño señor está también",
    "ru": "и в не на я быть он с что а по это она этот к но они мы как из у который то за свой "
          "привет мир язык модель обучение данные ещё съешь мягких французских булок",
    "el": "και το να του η της με που την σε από για τα είναι οι στο των θα ένα δεν "
          "καλημέρα κόσμε γλώσσα μοντέλο εκπαίδευση δεδομένα",
    "ar": "في من على إلى أن هذا التي الذي مع كان عن ما لا هو بين كل مرحبا بالعالم لغة نموذج "
          "تدريب بيانات العربية",
    "he": "של את על לא זה הוא עם גם כל אני היא מה שלום עולם שפה מודל אימון נתונים עברית",
    "hi": "के है में की और से को एक पर यह था कि नमस्ते दुनिया भाषा मॉडल प्रशिक्षण डेटा हिन्दी",
    "th": "ที่ การ และ ใน เป็น ของ มี ได้ ไม่ ว่า สวัสดี ชาวโลก ภาษา แบบจำลอง ข้อมูล",
    "zh": "的 一 是 不 了 人 我 在 有 他 这 中 大 来 上 国 个 到 说 们 为 子 和 你 地 出 道 也 时 年 "
          "你好世界 语言模型 训练数据 分词器 量化 适配器",
    "ja": "の に は を た が で て と し れ さ ある いる も する から な こと として い や "
          "こんにちは 世界 言語モデル 学習データ トークナイザー 量子化",
    "ko": "이 그 저 것 수 등 들 및 안녕하세요 세계 언어 모델 학습 데이터 토크나이저 양자화 "
          "한국어 텍스트입니다",
}
SPACED = {"en", "de", "fr", "es", "ru", "el", "ar", "he", "hi", "ko"}
EXTRAS = ["2024", "3.14", "1,000", "42", "0x1F", "½", "٣٤", "１２", "😀", "👍🏽", "🦙", "(", ")",
          "\"", "'s", "’s", "--", "...", "https://example.com/x?y=1", "a+b=c", "->", "#", "@user"]


def generated_lines(rng, target_bytes):
    langs = sorted(WORDS)
    vocab = {k: v.split() for k, v in WORDS.items()}
    lines, size = [], 0
    while size < target_bytes:
        lang = rng.choice(langs)
        words = [rng.choice(vocab[lang]) for _ in range(rng.randint(4, 30))]
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(EXTRAS))
        if lang == "en" and rng.random() < 0.3:
            words[0] = words[0].capitalize()
        line = (" " if lang in SPACED else rng.choice(["", "", " "])).join(words)
        line += rng.choice([".", ".", "!", "?", ",", "", "。" if lang in ("zh", "ja") else ":"])
        if rng.random() < 0.05:
            line = rng.choice(["    ", "\t", "  "]) + line
        lines.append(line)
        size += len(line.encode()) + 1
    return lines


def repo_lines(limit_bytes):
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return []
    exts = {".md", ".py", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".txt", ".yaml", ".yml", ".sh",
            ".cmake"}
    lines, size = [], 0
    for f in files:
        p = ROOT / f
        if not f or f.startswith("tests/data/") or p.suffix not in exts or not p.is_file():
            continue
        for line in p.read_bytes().decode("utf-8", errors="replace").split("\n"):
            if size >= limit_bytes:
                return lines
            lines.append(line)
            size += len(line.encode()) + 1
    return lines


def hard_lines(target_bytes):
    sys.path.insert(0, str(ROOT / "scripts" / "golden"))
    from tokenizer_parity import corpus
    texts = [c["text"] for c in corpus()]
    lines, size = [], 0
    while size < target_bytes:
        for t in texts:
            for line in t.split("\n"):  # a case with newlines gives several lines
                lines.append(line)
                size += len(line.encode()) + 1
    return lines


def build_corpus(mb):
    target = int(mb * 1e6)
    rng = random.Random(SEED)
    lines = repo_lines(int(target * 0.35))
    lines += hard_lines(int(target * 0.05))
    have = sum(len(line.encode()) + 1 for line in lines)
    lines += generated_lines(rng, max(0, target - have))
    rng.shuffle(lines)
    out, size = [], 0
    for line in lines:
        out.append(line + "\n")
        size += len(out[-1].encode())
        if size >= target:
            break
    return out


def bench_one(path, lines, repeat, batch):
    from tokenizers import Tokenizer

    def run_loop(tok):
        n = 0
        for line in lines:
            n += len(tok.encode(line, add_special_tokens=False).ids)
        return n

    def run_batch(tok):
        n = 0
        for i in range(0, len(lines), batch):
            for enc in tok.encode_batch(lines[i:i + batch], add_special_tokens=False):
                n += len(enc.ids)
        return n

    results = {}
    for name, fn in (("encode", run_loop), ("encode_batch", run_batch)):
        t0 = time.perf_counter()
        tok = Tokenizer.from_file(str(path))
        load = time.perf_counter() - t0
        best, cpu, tokens = None, None, None
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn(tok)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if tokens is not None and n != tokens:
                sys.exit(f"{path}: token count changed between passes ({tokens} vs {n})")
            tokens = n
            if best is None or dt < best:
                best, cpu = dt, dc
        results[name] = (best, tokens, load, cpu)
    counts = {r[1] for r in results.values()}
    if len(counts) != 1:
        sys.exit(f"{path}: encode and encode_batch disagree on the token count: {results}")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tokenizers", nargs="*", help="tokenizer.json paths")
    ap.add_argument("--write-corpus", metavar="PATH", help="write the corpus bytes to PATH")
    ap.add_argument("--mb", type=float, default=10.0, help="corpus size in 10^6 bytes (10)")
    ap.add_argument("--repeat", type=int, default=1, help="passes per way, best kept (1)")
    ap.add_argument("--batch", type=int, default=1024, help="lines per encode_batch call (1024)")
    args = ap.parse_args()
    if not args.tokenizers and not args.write_corpus:
        ap.error("give tokenizer.json paths and/or --write-corpus PATH")

    lines = build_corpus(args.mb)
    data = "".join(lines).encode()
    digest = hashlib.sha256(data).hexdigest()
    if args.write_corpus:
        pathlib.Path(args.write_corpus).write_bytes(data)
        print(f"wrote {args.write_corpus}: {len(data)} bytes, {len(lines)} lines, sha256 {digest}",
              file=sys.stderr)

    import tokenizers
    for path in args.tokenizers:
        res = bench_one(path, lines, args.repeat, args.batch)
        method = min(res, key=lambda k: res[k][0])
        seconds, tokens, load, cpu = res[method]
        print(json.dumps({
            "bench": "tokenizer", "system": "hf-tokenizers", "version": tokenizers.__version__,
            "tokenizer": path, "bytes": len(data), "tokens": tokens,
            "seconds": round(seconds, 4), "mb_per_s": round(len(data) / seconds / 1e6, 3),
            "tokens_per_s": round(tokens / seconds), "method": method,
            "cpu_seconds": round(cpu, 4), "mb_per_s_cpu": round(len(data) / cpu / 1e6, 3),
            "seconds_encode": round(res["encode"][0], 4),
            "seconds_encode_batch": round(res["encode_batch"][0], 4),
            "load_seconds": round(load, 3), "threads": 1, "lines": len(lines),
            "corpus_sha256": digest}), flush=True)


if __name__ == "__main__":
    main()
