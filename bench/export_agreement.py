"""Does an exported GGUF file run in llama.cpp as the model does in transformers?

Exports a model folder (or embedded name) with `lmshrink export` at one type, then feeds the same
token ids (the first `--tokens` of a text, framed as the model saw text: `lmshrink.data.sources.Framing`)
to transformers and to llama.cpp (llama-cpp-python, `make llamacpp`), and prints the share of
positions where both predict the same next token, and each runtime's perplexity on those ids.

    python bench/export_agreement.py --model ~/lmshrink-runs/gemma-cut --quant q8_0 --tokens 512
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from lmshrink.cli import main as lmshrink
from lmshrink.data.sources import Framing, token_stream
from lmshrink.export import llamacpp
from lmshrink.losses import next_token_nll
from lmshrink.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--text", default="python-docs/tutorial")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--output", default=None, help="folder for the GGUF file (default: a temporary one)")
    args = parser.parse_args()
    loaded = load(args.model)
    framing = Framing.of(loaded.tokenizer)
    ids = framing.window(token_stream(args.text, loaded.tokenizer, args.tokens))[None, : args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output or tmp)
        if lmshrink(["export", "--model", args.model, "--output", str(out), "--quant", args.quant, "--overwrite"]):
            raise SystemExit("export failed")
        (path,) = out.glob(f"*-{args.quant.upper()}.gguf")
        llm = llamacpp.open_gguf(path, n_ctx=ids.shape[1] + 16)
        got = llamacpp.logits(llm)(ids)
        llm.close()
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits.float()
    agree = (want[0, :-1].argmax(-1) == got[0, :-1].argmax(-1)).float().mean().item()
    result = {"model": args.model, "quant": args.quant, "text": args.text, "tokens": ids.shape[1],
              "framing": framing.record(loaded.tokenizer), "top1_agreement": agree,
              "ppl_transformers": math.exp(next_token_nll(want, ids).mean().item()),
              "ppl_llamacpp": math.exp(next_token_nll(got, ids).mean().item())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
