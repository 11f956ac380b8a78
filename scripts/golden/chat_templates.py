"""Our own conversations rendered by transformers with the real chat templates, and the token ids
the tokenizers library gives the rendered text.

The shared oracle (../shared/data/chat-templates/expected.json) holds 12 conversations; these add
the shapes a fine-tuning set brings: a long multi-turn chat, a system prompt with blank lines,
contents with leading/trailing whitespace, scripts beyond Latin (CJK, Arabic, emoji, combining
marks), text that looks like template syntax or special tokens, and two user turns in a row
(which some templates refuse). Each is rendered with each template of the oracle and each of its
variants (the same variables: bos_token, eos_token, date_string, enable_thinking), with and
without the generation prompt, by transformers' own renderer (render_jinja_template: jinja2's
sandbox, trim/lstrip blocks), its strftime_now clock fixed at 2024-07-26 12:00 as the oracle's.
For the templates whose tokenizer is in ../shared/data (Qwen2.5 and Qwen3: qwen2-tokenizer;
Phi-3.5: phi3-tokenizer), the ids tokenizers' Tokenizer.encode(text, add_special_tokens=False)
gives the rendered text are stored too.

    .venv/bin/python scripts/golden/chat_templates.py   # writes tests/data/chat_templates/own_cases.json

Read by tests/test_chat_template.cpp (OwnConversationsAndTheirTokenIds); the templates and
tokenizers stay in ../shared/data, so the test skips where that is absent.
"""
import datetime as _dt
import json
import pathlib

import transformers.utils.chat_template_utils as ctu
from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "tests" / "data" / "chat_templates" / "own_cases.json"
TOKENIZERS = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": "qwen2-tokenizer",
    "Qwen-Qwen3-0.6B.jinja": "qwen2-tokenizer",
    "microsoft-Phi-3.5-mini-instruct.jinja": "phi3-tokenizer",
}

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"},
     {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You're welcome."}],
    [{"role": "system", "content": "Rules:\n\n1. Be kind.\n\n2. Be brief.\n"},
     {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}],
    [{"role": "user", "content": "  padded  \n\n"}, {"role": "assistant", "content": "\n  answer with spaces  "}],
    [{"role": "user", "content": "日本語で答えて。مرحبا 👋🏽 Zoë (Zoe\u0308)"},
     {"role": "assistant", "content": "はい。😀 ✓"}],
    [{"role": "user", "content": "Explain {{ messages }} and {% if %} and <|im_start|> and [INST]"},
     {"role": "assistant", "content": "They are {# not #} special here: {{ 1 }}"}],
    [{"role": "user", "content": "first"}, {"role": "user", "content": "second"},
     {"role": "assistant", "content": "both"}],
]


class _FixedNow(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 7, 26, 12, 0, 0)


def main():
    ctu.datetime = _FixedNow  # strftime_now reads datetime.now(), as the oracle's fixed clock
    oracle = json.loads((SHARED / "chat-templates" / "expected.json").read_text())
    tokenizers = {}
    cases = []
    for name, info in oracle["templates"].items():
        template = (SHARED / "chat-templates" / name).read_text()
        tok_dir = TOKENIZERS.get(name)
        if tok_dir and tok_dir not in tokenizers:
            tokenizers[tok_dir] = Tokenizer.from_file(str(SHARED / tok_dir / "tokenizer.json"))
        for v, variables in enumerate(info["variants"]):
            for c, conversation in enumerate(CONVERSATIONS):
                for agp in (False, True):
                    case = dict(template=name, variant=v, conversation=c, add_generation_prompt=agp)
                    try:
                        text = ctu.render_jinja_template(
                            conversations=[conversation], chat_template=template, tools=None, documents=None,
                            add_generation_prompt=agp, **variables)[0][0]
                        case["rendered"] = text
                        if tok_dir:
                            case["tokenizer"] = tok_dir
                            case["ids"] = tokenizers[tok_dir].encode(text, add_special_tokens=False).ids
                    except Exception as e:  # the template's raise_exception
                        case["error"] = f"{type(e).__name__}: {e}"
                    cases.append(case)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"conversations": CONVERSATIONS, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    errors = sum("error" in c for c in cases)
    with_ids = sum("ids" in c for c in cases)
    print(f"wrote {OUT}: {len(cases)} cases ({errors} raised by their template, {with_ids} with token ids)")


if __name__ == "__main__":
    main()
