"""Greedy generation with transformers from a model directory, the way a user serves a tuned chat
model: AutoTokenizer's chat template with the generation prompt, AutoModelForCausalLM.generate with
the directory's generation_config.json. Prints one JSON object: the new token ids, their text
(special tokens kept), whether generation stopped before max_new_tokens, and the eos ids it used.

    python tests/scripts/chat_generate.py MODEL_DIR '[{"role": "user", "content": "..."}]' [MAX_NEW]

Run by tests/test_chat_serving.cpp on `qlora merge`'s output.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv):
    model_dir, messages = argv[1], json.loads(argv[2])
    max_new = int(argv[3]) if len(argv) > 3 else 24
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                  return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id[0]
                             if isinstance(model.generation_config.eos_token_id, list)
                             else model.generation_config.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    print(json.dumps({"new_ids": new, "text": tok.decode(new, skip_special_tokens=False),
                      "stopped": len(new) < max_new, "eos_token_id": model.generation_config.eos_token_id,
                      "prompt": tok.decode(ids[0].tolist(), skip_special_tokens=False)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
