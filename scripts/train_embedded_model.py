"""Train the embedded default language model and its tokenizer, and write them to bridge/embedded/.

Corpus: the CPython standard library sources and pydoc topics (bridge.corpus), 5% of documents
held out. Tokenizer: byte-level BPE, 4096 tokens, <|endoftext|> as BOS/EOS. Model: a 4-layer
HookedTransformer (d_model 128, 4 heads, d_mlp 512, n_ctx 128, gelu, LayerNorm), trained with
AdamW on rows packed exactly as the SAE pipeline packs them (BOS first, BOS between documents).

    python scripts/train_embedded_model.py [--tokens 6500000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.corpus import stdlib_documents  # noqa: E402
from bridge.embedded import EMBEDDED_DIR, MODEL_CONFIG, load_embedded_model  # noqa: E402

BOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS,
                                      model_max_length=MODEL_CONFIG["n_ctx"])
    wrapped.save_pretrained(out_dir)


def pack_rows(token_lists: list[list[int]], bos: int, n_ctx: int) -> torch.Tensor:
    """Rows of n_ctx tokens: BOS first, BOS between documents (SAELens' default packing)."""
    from bridge.data import pack_token_sequences

    rows = list(pack_token_sequences(iter(token_lists), n_ctx, bos_token_id=bos, separator_token_id=bos))
    return torch.tensor(rows, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=6_500_000, help="training tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    train_docs = [t for _, t in stdlib_documents("train")]
    heldout_docs = [t for _, t in stdlib_documents("heldout")]
    t0 = time.time()
    train_tokenizer(train_docs, MODEL_CONFIG["d_vocab"], args.out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.out)
    bos = tokenizer.bos_token_id
    n_ctx = MODEL_CONFIG["n_ctx"]
    train_rows = pack_rows([tokenizer(t)["input_ids"] for t in train_docs], bos, n_ctx)
    heldout_rows = pack_rows([tokenizer(t)["input_ids"] for t in heldout_docs], bos, n_ctx)
    chars = sum(map(len, heldout_docs))
    print(f"tokenizer: {time.time() - t0:.0f}s; {len(train_rows)} train rows, {len(heldout_rows)} held-out rows; "
          f"{chars / heldout_rows.numel():.2f} chars/token held out", flush=True)

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**MODEL_CONFIG, device=args.device, seed=args.seed))
    model.train()
    steps = args.tokens // (args.batch_size * n_ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(steps // 50, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))) + 0.02)
    generator = torch.Generator().manual_seed(args.seed)

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [float(model(heldout_rows[i:i + 64].to(args.device), return_type="loss"))
                      for i in range(0, len(heldout_rows), 64)]
        model.train()
        return sum(losses) / len(losses)

    print(f"initial held-out loss {heldout_loss():.3f}", flush=True)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(train_rows), (args.batch_size,), generator=generator)
        loss = model(train_rows[idx].to(args.device), return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            rate = (step + 1) * args.batch_size * n_ctx / (time.time() - t0)
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} ({rate:.0f} tokens/s)", flush=True)
    final = heldout_loss()
    print(f"final held-out loss {final:.4f} nats/token", flush=True)

    from safetensors.torch import save_file

    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"))
    (args.out / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    model = load_embedded_model(args.out, device=args.device)  # the shipped (bf16-stored) weights
    shipped = heldout_loss()
    print(f"held-out loss of the shipped weights {shipped:.4f}", flush=True)
    report = {
        "heldout_loss_nats_per_token": round(shipped, 4),
        "heldout_loss_before_bf16_storage": round(final, 4),
        "train_tokens": steps * args.batch_size * n_ctx,
        "train_rows": len(train_rows),
        "heldout_rows": len(heldout_rows),
        "heldout_chars_per_token": round(chars / heldout_rows.numel(), 3),
        "train_seconds": round(time.time() - t0),
        "device": args.device,
        "python": sys.version.split()[0],
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
