"""Train the small RecurrentGemma model that ships in `rgref/data/tiny`.

The model is trained with the official `recurrentgemma.torch.Griffin` on CPU
on English fortune-cookie texts from Debian's `fortunes` package, so that
`python -m rgref.generate` prints readable English without downloading
anything. The script:

  1. reads the fortunes of the categories in INCLUDED_CATEGORIES from
     /usr/share/games/fortunes and drops single fortunes that match
     EXCLUDED_WORDS;
  2. holds out HELDOUT_FRACTION of the fortunes, chosen by --seed;
  3. trains a SentencePiece tokenizer on the training fortunes that keeps
     Gemma's special ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and the turn
     markers as single pieces;
  4. trains the model on rows of packed documents (BOS + fortune + EOS) with
     AdamW, linear warmup and cosine decay;
  5. rounds every weight to bfloat16, writes the Hugging Face layout into
     --out, and measures the held-out loss with the official model on exactly
     those rounded weights;
  6. writes a fixed held-out token set with its loss to --heldout (the
     golden file of tests/test_bundled_model.py) and a model card.

Needs the official package (recurrentgemma 1.0.1, torch, sentencepiece) and
the corpus: `apt-get install fortunes`. Run from the repository root:

    .venv-ref/bin/python tools/train_tiny.py

Progress goes to stderr. Every random choice is seeded (--seed), but
torch's CPU kernels can round differently on another CPU, torch build or
thread count, so a rerun may end with slightly different weights and losses.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import sys
import time
from importlib import metadata

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from rgref.config import ATTENTION, RECURRENT, Config  # noqa: E402
from rgref.dtypes import bfloat16_to_float32, float32_to_bfloat16  # noqa: E402
from rgref.names import hf_to_official, official_to_hf  # noqa: E402
from rgref.safetensors_file import load_safetensors, save_safetensors  # noqa: E402

# ============================================================================
# Corpus
# ============================================================================

FORTUNE_DIR = "/usr/share/games/fortunes"
FORTUNE_PACKAGE = "fortunes"
FORTUNE_COPYRIGHT = "/usr/share/doc/fortunes/copyright"

# Categories of the Debian `fortunes` and `fortunes-min` packages that are
# used. The `off/` directory (offensive fortunes, a separate package) is never
# read. Left out on purpose:
#   politics, ethnic, men-women, drugs, love  - divisive, ethnic or sex-related
#   knghtbrd, linux, linuxcookie, debian, perl - mostly IRC logs and code
#   zippy                                      - surreal comic-strip non sequiturs
#   ascii-art                                  - drawings, not prose
#   translate-me                               - not English
INCLUDED_CATEGORIES = (
    "art", "computers", "cookie", "definitions", "disclaimer", "education", "food",
    "fortunes", "goedel", "humorists", "kids", "law", "literature", "magic", "medicine",
    "miscellaneous", "news", "paradoxum", "people", "pets", "platitudes", "pratchett",
    "riddles", "science", "songs-poems", "sports", "startrek", "tao", "wisdom", "work",
)

# A fortune that contains one of these words (case-insensitive, whole words) is
# dropped even from an included category: religion, sex, slurs, party
# politics, profanity and violence.
EXCLUDED_WORDS = re.compile(
    r"\b(sex\w*|god|gods|goddam\w*|jesus|christ|christians?|christianity|church\w*|bible"
    r"|religio\w*|pray\w*|allah|satan|republican\w*|democrat\w*|liberals?|conservatives?"
    r"|communis\w*|nazis?|hitler|jews?|jewish|negro\w*|nigger\w*|rap(e|ed|es|ist|ing)|gay"
    r"|homosex\w*|lesbian\w*|fuck\w*|shit\w*|damn\w*|kill\w*|suicid\w*|murder\w*|abortion"
    r"|breasts?|naked|nude|whores?|prostitut\w*|virgins?|bitch\w*|bastards?|orgasm\w*"
    r"|penis|vagina)\b",
    re.IGNORECASE)

# Some fortunes underline with backspaces ("___\b\b\band" overstrikes "and").
OVERSTRIKE = re.compile(r"_+\x08+")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

HELDOUT_FRACTION = 0.05


def read_fortunes(directory: str) -> list[tuple[str, str]]:
    """Return (category, text) for every kept fortune, in file order."""
    if not os.path.isdir(directory):
        sys.exit(f"error: fortune directory {directory} not found. Install the corpus with "
                 f"`apt-get update && apt-get install -y {FORTUNE_PACKAGE}` (Debian/Ubuntu).")
    fortunes = []
    for category in INCLUDED_CATEGORIES:
        path = os.path.join(directory, category)
        if not os.path.isfile(path):
            sys.exit(f"error: fortune file {path} not found. Install the corpus with "
                     f"`apt-get install -y {FORTUNE_PACKAGE}`.")
        with open(path, encoding="utf-8") as f:
            raw = f.read()
        for text in raw.split("\n%\n"):
            text = OVERSTRIKE.sub("", text)
            text = CONTROL_CHARACTERS.sub("", text)
            # Tabs only indent the attribution lines ("\t\t-- Mark Twain").
            text = "\n".join(line.rstrip() for line in text.expandtabs(4).split("\n"))
            text = text.strip("\n")
            if text.strip() == "%":
                text = ""
            if text.strip() and not EXCLUDED_WORDS.search(text):
                fortunes.append((category, text))
    return fortunes


def split_heldout(count: int, seed: int) -> np.ndarray:
    """Return a boolean mask marking the held-out fortunes, HELDOUT_FRACTION of them."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    heldout = np.zeros(count, dtype=bool)
    heldout[order[:round(HELDOUT_FRACTION * count)]] = True
    return heldout


# ============================================================================
# Tokenizer
# ============================================================================

TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")


def tokenizer_options(vocab_size: int) -> dict:
    """Return the SentencePiece trainer options (also written to the model card)."""
    return dict(
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        # The newline is a piece of its own so that pieces never span two lines.
        user_defined_symbols=list(TURN_MARKERS) + ["\n"],
        # Keep the text as it is (no NFKC, spaces kept) so decode(encode(s)) == s.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=1.0,
        max_sentence_length=1 << 16,
        # Use every sentence in file order: nothing is sampled or shuffled.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
    )


def train_tokenizer(texts: list[str], vocab_size: int, seed: int, model_path: str) -> None:
    """Train a SentencePiece model on `texts` (one fortune per sentence) into model_path."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    # The model is written to memory, not to a model_prefix file, because the
    # serialized model records its model_prefix and a temporary path would
    # make the file differ from run to run.
    model_writer = io.BytesIO()
    # A fortune spans several lines, so sentences come from an iterator, not a
    # one-sentence-per-line file.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model_writer,
                                   minloglevel=2, **tokenizer_options(vocab_size))
    model = model_writer.getvalue()
    with open(model_path, "wb") as f:
        f.write(model)


def check_tokenizer(processor) -> None:
    """Exit with a message if the trained tokenizer lacks Gemma's special ids."""
    expected = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for piece, index in expected.items():
        if processor.piece_to_id(piece) != index:
            sys.exit(f"error: tokenizer gives {piece} id {processor.piece_to_id(piece)}, "
                     f"expected {index}")
    for marker in TURN_MARKERS:
        if len(processor.encode(marker)) != 1:
            sys.exit(f"error: tokenizer splits {marker} into {processor.encode(marker)}")


# ============================================================================
# Packing documents into rows
# ============================================================================

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


def pack_rows(documents: list[np.ndarray], row_length: int) -> dict[str, np.ndarray]:
    """Pack whole documents into rows of `row_length` tokens by best fit.

    Each document is BOS + text + EOS and starts at segment_pos 0, so the model
    resets its state there. A document longer than a row is cut to its first
    `row_length` tokens. The unused tail of a row contains <pad> tokens that form
    one more document. `loss_mask[b, t]` is 1 where tokens[b, t] predicts
    tokens[b, t + 1] within one document, and 0 elsewhere (the last position
    of every document, padding and the last column).

    Returns tokens, segment_pos and loss_mask, each int32 [rows, row_length].
    """
    documents = [doc[:row_length] for doc in documents]
    rows: list[list[np.ndarray]] = []
    # rows_by_space[s] lists the rows that have exactly s free tokens.
    rows_by_space: list[list[int]] = [[] for _ in range(row_length + 1)]
    for doc in documents:
        for space in range(len(doc), row_length + 1):
            if rows_by_space[space]:
                row = rows_by_space[space].pop()
                break
        else:
            row, space = len(rows), row_length
            rows.append([])
        rows[row].append(doc)
        rows_by_space[space - len(doc)].append(row)

    tokens = np.full((len(rows), row_length), PAD_ID, dtype=np.int32)
    segment_pos = np.zeros((len(rows), row_length), dtype=np.int32)
    loss_mask = np.zeros((len(rows), row_length), dtype=np.int32)
    for r, docs in enumerate(rows):
        start = 0
        for doc in docs:
            end = start + len(doc)
            tokens[r, start:end] = doc
            segment_pos[r, start:end] = np.arange(len(doc))
            loss_mask[r, start:end - 1] = 1
            start = end
        segment_pos[r, start:] = np.arange(row_length - start)
    return dict(tokens=tokens, segment_pos=segment_pos, loss_mask=loss_mask)


def encode_documents(processor, texts: list[str]) -> list[np.ndarray]:
    return [np.array([BOS_ID] + processor.encode(text) + [EOS_ID], dtype=np.int32)
            for text in texts]


# ============================================================================
# Model
# ============================================================================

def tiny_config(vocab_size: int, width: int, num_blocks: int, num_heads: int,
                window: int) -> Config:
    """Return the bundled model's config: Griffin's R, R, A pattern at a small width."""
    pattern = (RECURRENT, RECURRENT, ATTENTION)
    return Config(
        vocab_size=vocab_size,
        width=width,
        mlp_width=3 * width,
        num_heads=num_heads,
        lru_width=width,
        block_types=tuple(pattern[i % 3] for i in range(num_blocks)),
        attention_window=window,
        embeddings_scale_by_sqrt_dim=True,
        logits_soft_cap=30.0,
    )


def official_config(config: Config):
    """Return the `recurrentgemma.common.GriffinConfig` of an rgref Config."""
    from recurrentgemma import common

    kinds = {RECURRENT: common.TemporalBlockType.RECURRENT,
             ATTENTION: common.TemporalBlockType.ATTENTION}
    return common.GriffinConfig(
        vocab_size=config.vocab_size,
        width=config.width,
        mlp_expanded_width=config.mlp_width,
        num_heads=config.num_heads,
        block_types=tuple(kinds[kind] for kind in config.block_types),
        embeddings_scale_by_sqrt_dim=config.embeddings_scale_by_sqrt_dim,
        attention_window_size=config.attention_window,
        logits_soft_cap=config.logits_soft_cap or 0.0,
        lru_width=config.lru_width,
    )


def stacked_rnn_scan(x, a, reset, h0, acc_dtype=None):
    """Compute `recurrentgemma.torch.layers.rnn_scan` with a backward pass linear in T.

    The official scan writes each step into a preallocated tensor
    (`y[:, t] = h_t`). Autograd then backpropagates every one of those T
    writes, and every read `a[:, t]`, through the whole (B, T, E) tensor, so
    the backward pass costs O(T^2) and dominated a training step at T = 256.
    This version evaluates the same float32 expression per step and stacks
    the steps at the end. Its outputs are bit-identical, and only the autograd
    graph differs.
    """
    import torch

    acc_dtype = acc_dtype or torch.float32
    a = a * ~reset[..., None]
    if x.shape[1] == 1:
        if h0 is None:
            return x, x[:, 0].type(acc_dtype)
        y = a.type(acc_dtype) * h0[:, None] + x.type(acc_dtype)
        return y.type(x.dtype), y[:, -1]
    h_t = h0 if h0 is not None else torch.zeros(x[:, 0].shape, dtype=acc_dtype,
                                                  device=x.device)
    # unbind() has one backward node for all steps; indexing a[:, t] would
    # again scatter each step's gradient into a zeroed (B, T, E) tensor.
    steps = []
    for a_t, x_t in zip(a.type(acc_dtype).unbind(1), x.type(acc_dtype).unbind(1)):
        h_t = a_t * h_t + x_t
        steps.append(h_t)
    return torch.stack(steps, dim=1).type(x.dtype), h_t


def masked_loss(model, batch: dict, torch) -> tuple:
    """Return (mean next-token cross-entropy over loss_mask, number of predicted tokens)."""
    tokens = torch.from_numpy(batch["tokens"]).long()
    segment_pos = torch.from_numpy(batch["segment_pos"]).long()
    mask = torch.from_numpy(batch["loss_mask"][:, :-1]).float()
    logits, _ = model(tokens, segment_pos, return_cache=False)
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        tokens[:, 1:].reshape(-1), reduction="none")
    count = mask.sum()
    return (losses * mask.reshape(-1)).sum() / count, int(count)


def token_losses_float64(model, rows: dict, torch, batch_size: int = 16) -> np.ndarray:
    """Return -log p(tokens[b, t + 1]) at [b, t] where loss_mask[b, t], else 0.

    The model runs in float32. The log-softmax of its logits is float64, so
    the mean of these values does not depend on how the rows are batched.
    """
    losses = np.zeros(rows["tokens"].shape, dtype=np.float64)           # (N, T)
    with torch.no_grad():
        for start in range(0, len(rows["tokens"]), batch_size):
            part = {k: v[start:start + batch_size] for k, v in rows.items()}
            tokens = torch.from_numpy(part["tokens"]).long()
            logits, _ = model(tokens, torch.from_numpy(part["segment_pos"]).long(),
                              return_cache=False)
            log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
            mask = part["loss_mask"][:, :-1].astype(bool)
            losses[start:start + batch_size, :-1] = np.where(mask, nll.numpy(), 0.0)
    return losses


def mean_loss(losses: np.ndarray, rows: dict) -> float:
    return float(losses.sum() / rows["loss_mask"][:, :-1].sum())


def golden_rows(heldout_docs: list[np.ndarray], num_rows: int, row_length: int) -> dict:
    """Return the fixed held-out rows of the golden file.

    Half the rows contain the longest held-out documents, which run past the
    attention window. The other half pack the remaining documents in split
    order, several to a row, so documents start mid-row and rows end in padding.
    """
    by_length = sorted(range(len(heldout_docs)), key=lambda i: -len(heldout_docs[i]))
    longest = set(by_length[:num_rows // 2])
    long_rows = pack_rows([heldout_docs[i] for i in sorted(longest)], row_length)
    other_rows = pack_rows([doc for i, doc in enumerate(heldout_docs) if i not in longest],
                           row_length)
    return {k: np.concatenate([long_rows[k], other_rows[k]])[:num_rows] for k in long_rows}


def write_golden(path: str, model, heldout_docs, config, args, versions, torch) -> float:
    """Write the golden held-out token set, its losses and metadata; return the mean loss."""
    golden = golden_rows(heldout_docs, args.heldout_rows, args.heldout_length)
    losses = token_losses_float64(model, golden, torch)
    loss = mean_loss(losses, golden)
    metadata_json = {
        "description": "Held-out fortunes packed into rows, and the next-token "
                       "cross-entropy of rgref/data/tiny computed by the official "
                       "recurrentgemma PyTorch model in float32 (log-softmax and mean in "
                       "float64). loss_mask[b, t] = 1 where tokens[b, t] predicts "
                       "tokens[b, t + 1]; token_losses[b, t] is that prediction's "
                       "cross-entropy (0 elsewhere); loss is their mean.",
        "regenerate": "python tools/train_tiny.py (with the official recurrentgemma "
                      "installed); it retrains the model too",
        "reference": "recurrentgemma.torch.Griffin",
        "versions": versions,
        "seed": args.seed,
        "weights_dtype": "bfloat16",
        "compute_dtype": "float32",
        "config": config.to_hf_config(),
        "tokens_predicted": int(golden["loss_mask"][:, :-1].sum()),
        "max_segment_pos": int(golden["segment_pos"].max()),
    }
    np.savez(path, tokens=golden["tokens"], segment_pos=golden["segment_pos"],
             loss_mask=golden["loss_mask"], token_losses=losses, loss=np.float64(loss),
             metadata=np.array(json.dumps(metadata_json, sort_keys=True)))
    return loss


# ============================================================================
# Export
# ============================================================================

def export_weights(model, path: str) -> dict[str, np.ndarray]:
    """Write the model's weights as bfloat16 in Hugging Face layout; return the bits."""
    official = {name: tensor.detach().float().numpy()
                for name, tensor in model.state_dict().items()}
    bits = {name: float32_to_bfloat16(value) for name, value in official_to_hf(official).items()}
    save_safetensors(path, bits, metadata={"format": "pt"})
    return bits


def load_exported(path: str, config, torch):
    """Build an official float32 Griffin holding exactly the weights in `path`."""
    from recurrentgemma.torch import griffin

    hf = {name: bfloat16_to_float32(bits) for name, bits in load_safetensors(path).items()}
    state = {name: torch.from_numpy(np.ascontiguousarray(value))
             for name, value in hf_to_official(hf).items()}
    model = griffin.Griffin(official_config(config), gradient_checkpointing=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ============================================================================
# Main
# ============================================================================

def learning_rate(step: int, steps: int, peak: float, warmup: int, final_fraction: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `final_fraction * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (final_fraction + (1 - final_fraction) * cosine)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "rgref", "data", "tiny"),
                        help="output directory for config.json, model.safetensors, "
                             "tokenizer.model and MODEL_CARD.md")
    parser.add_argument("--heldout", default=os.path.join(REPO_ROOT, "tests", "data",
                                                          "tiny_heldout.npz"),
                        help="output .npz with the fixed held-out token set and its loss")
    parser.add_argument("--fortune-dir", default=FORTUNE_DIR,
                        help="directory of the Debian fortune files")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the held-out split, packing order and weight init")
    parser.add_argument("--vocab-size", type=int, default=4096, help="SentencePiece pieces")
    parser.add_argument("--width", type=int, default=128, help="model width D")
    parser.add_argument("--blocks", type=int, default=6, help="residual blocks (R, R, A, ...)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads H")
    parser.add_argument("--window", type=int, default=128, help="local attention window S")
    parser.add_argument("--row-length", type=int, default=256, help="tokens per training row")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--steps", type=int, default=450, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=40, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="AdamW weight decay of matrices (norms, biases, a_param: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--heldout-rows", type=int, default=8,
                        help="rows of the golden held-out token set")
    parser.add_argument("--heldout-length", type=int, default=256,
                        help="tokens per row of the golden held-out token set")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import sentencepiece as spm
    import torch
    from recurrentgemma.torch import griffin, layers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(os.path.dirname(args.heldout), exist_ok=True)

    # Corpus and split.
    fortunes = read_fortunes(args.fortune_dir)
    heldout = split_heldout(len(fortunes), args.seed)
    train_texts = [text for (_, text), held in zip(fortunes, heldout) if not held]
    heldout_texts = [text for (_, text), held in zip(fortunes, heldout) if held]
    log(f"corpus: {len(fortunes)} fortunes from {len(INCLUDED_CATEGORIES)} categories, "
        f"{len(train_texts)} for training, {len(heldout_texts)} held out")

    # Tokenizer.
    tokenizer_path = os.path.join(args.out, "tokenizer.model")
    train_tokenizer(train_texts, args.vocab_size, args.seed, tokenizer_path)
    processor = spm.SentencePieceProcessor(model_file=tokenizer_path)
    check_tokenizer(processor)
    train_docs = encode_documents(processor, train_texts)
    heldout_docs = encode_documents(processor, heldout_texts)
    train_tokens = sum(len(doc) for doc in train_docs)
    log(f"tokenizer: {processor.get_piece_size()} pieces, {train_tokens} training tokens "
        f"({sum(len(t) for t in train_texts) / train_tokens:.2f} characters per token)")

    # Model.
    config = tiny_config(args.vocab_size, args.width, args.blocks, args.heads, args.window)
    model = griffin.Griffin(official_config(config), gradient_checkpointing=False)
    param_count = sum(p.numel() for p in model.parameters())
    log(f"model: {param_count} parameters, {config}")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    # Training: each epoch repacks the training documents in a new shuffled order.
    rng = np.random.default_rng(args.seed)
    heldout_rows = pack_rows(heldout_docs, args.row_length)
    epoch, row_cursor, epoch_rows = 0, 0, None
    tokens_seen, losses = 0, []
    official_rnn_scan = layers.rnn_scan
    layers.rnn_scan = stacked_rnn_scan
    start_time = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if epoch_rows is None or row_cursor + args.batch > len(epoch_rows["tokens"]):
            order = rng.permutation(len(train_docs))
            epoch_rows = pack_rows([train_docs[i] for i in order], args.row_length)
            rows_order = rng.permutation(len(epoch_rows["tokens"]))
            epoch_rows = {k: v[rows_order] for k, v in epoch_rows.items()}
            epoch, row_cursor = epoch + 1, 0
        batch = {k: v[row_cursor:row_cursor + args.batch] for k, v in epoch_rows.items()}
        row_cursor += args.batch

        lr = learning_rate(step, args.steps, args.lr, args.warmup, final_fraction=0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, _ = masked_loss(model, batch, torch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += args.batch * args.row_length
        losses.append(loss.item())

        if step % 10 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start_time
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            log(f"step {step + 1}/{args.steps} epoch {epoch} loss {np.mean(losses[-10:]):.4f} "
                f"lr {lr:.2e} {tokens_seen / elapsed:.0f} tokens/s "
                f"elapsed {elapsed / 60:.1f} min ETA {eta / 60:.1f} min")
    train_seconds = time.perf_counter() - start_time
    # Evaluation and sampling below run the unmodified official model.
    layers.rnn_scan = official_rnn_scan
    final_train_loss = float(np.mean(losses[-50:]))

    # Export and evaluate the exported (bfloat16-rounded) weights.
    model_path = os.path.join(args.out, "model.safetensors")
    export_weights(model, model_path)
    with open(os.path.join(args.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_config(), f, indent=2)
        f.write("\n")
    exported = load_exported(model_path, config, torch)
    heldout_split_loss = mean_loss(token_losses_float64(exported, heldout_rows, torch),
                                   heldout_rows)
    versions = {name: metadata.version(name)
                for name in ("recurrentgemma", "torch", "numpy", "sentencepiece")}
    golden_loss = write_golden(args.heldout, exported, heldout_docs, config, args, versions,
                               torch)
    log(f"final training loss {final_train_loss:.4f}, held-out loss {heldout_split_loss:.4f} "
        f"(split), {golden_loss:.6f} (golden {args.heldout_rows}x{args.heldout_length})")

    # Samples from the official sampler, for the model card.
    samples = generate_samples(exported, processor, torch, args.seed)
    for kind, prompt, text in samples:
        log(f"[{kind}] {prompt!r} -> {text!r}")

    write_model_card(args, config, param_count, fortunes, heldout, processor, versions,
                     train_tokens, epoch, train_seconds, final_train_loss,
                     heldout_split_loss, golden_loss, samples)
    log(f"wrote {args.out} and {args.heldout}")


SAMPLE_PROMPTS = ("", "The best way to", "A computer", "Life is", "Q: What")


def generate_samples(model, processor, torch, seed: int) -> list[tuple[str, str, str]]:
    """Return (kind, prompt, completion) from the official sampler, greedy and sampled."""
    from recurrentgemma.torch import sampler as sampler_lib

    samples = []
    for greedy in (True, False):
        torch.manual_seed(seed)
        sampler = sampler_lib.Sampler(model=model, vocab=processor, greedy_sampling=greedy)
        for prompt in SAMPLE_PROMPTS:
            # return_logits=True because the official sampler fails on a prompt
            # that is BOS alone when it is False (it slices logits that are None).
            output = sampler([prompt], total_generation_steps=64, return_logits=True)
            samples.append(("greedy" if greedy else "sampled", prompt, output.text[0]))
    return samples


def write_model_card(args, config, param_count, fortunes, heldout, processor, versions,
                     train_tokens, epochs, train_seconds, final_train_loss,
                     heldout_split_loss, golden_loss, samples) -> None:
    counts: dict[str, int] = {}
    for category, _ in fortunes:
        counts[category] = counts.get(category, 0) + 1
    with open(FORTUNE_COPYRIGHT, encoding="utf-8") as f:
        copyright_text = f.read()
    license_lines = copyright_text[copyright_text.index("This program falls under"):]
    license_lines = license_lines[:license_lines.index("----")].rstrip()
    options = tokenizer_options(args.vocab_size)
    options["user_defined_symbols"] = [repr(s)[1:-1] for s in options["user_defined_symbols"]]
    size_bytes = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    sample_lines = []
    for kind, prompt, text in samples:
        sample_text = (prompt + text).replace("\n", "\n    ")
        sample_lines.append(f"- {kind}, prompt {prompt!r}:\n\n    {sample_text}\n")

    card = f"""# rgref tiny: a small RecurrentGemma-architecture model

A {param_count / 1e6:.2f}M-parameter model with the Griffin architecture of
RecurrentGemma (residual blocks R, R, A), trained from scratch by
`tools/train_tiny.py` with the official `recurrentgemma` PyTorch
implementation, so that rgref can generate English text without a download.
It writes fortune-cookie style quips and quotations. It has learned nothing
else and is not a useful language model. The weights are in Hugging Face layout,
stored as bfloat16 ({size_bytes / 1e6:.1f} MB).

## Data

Debian package `{FORTUNE_PACKAGE}` (with `fortunes-min`), version
{_dpkg_version(FORTUNE_PACKAGE)}, files in {FORTUNE_DIR}, installed with
`apt-get install -y {FORTUNE_PACKAGE}`. The `off/` (offensive) collection is not used.
The package's copyright file ({FORTUNE_COPYRIGHT}) gives one license,
the BSD license below, and names no separate terms for the fortune files. The
fortunes themselves are quotations and jokes from many authors, attributed
in the text where known, as collected and distributed in that package.

```
{license_lines}
```

Categories used (fortunes kept after filtering): {", ".join(f"{c} ({counts.get(c, 0)})"
                                                        for c in INCLUDED_CATEGORIES)}.

Left out: politics, ethnic, men-women, drugs and love (divisive, ethnic or
sex-related); knghtbrd, linux, linuxcookie, debian and perl (mostly IRC logs
and code); zippy (surreal non sequiturs); ascii-art (drawings); translate-me
(not English). A fortune from an included category is also dropped when it
contains a word about religion, sex, slurs, party politics, profanity or
violence (the `EXCLUDED_WORDS` pattern in `tools/train_tiny.py`).
Backspace overstrikes and control characters are removed, tabs become spaces.

{len(fortunes)} fortunes in all; {int(heldout.sum())} ({HELDOUT_FRACTION:.0%}) are held out, chosen
by a permutation with seed {args.seed}; {len(fortunes) - int(heldout.sum())} are used for training
({train_tokens} tokens with BOS and EOS).

## Tokenizer

SentencePiece {versions["sentencepiece"]}, trained on the training fortunes only (one
fortune per sentence), with random seed {args.seed} and these options:

```
{json.dumps(options, indent=2)}
```

Gemma's special ids are kept: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3;
`<start_of_turn>` and `<end_of_turn>` are single pieces (ids
{processor.piece_to_id(TURN_MARKERS[0])} and {processor.piece_to_id(TURN_MARKERS[1])}) but never occur in the training
data, so the model has not learned the chat format.

## Model

```
{json.dumps(config.to_hf_config(), indent=2)}
```

{param_count} parameters ({config.vocab_size} x {config.width} of them are the tied embedding).

## Training

- Objective: next-token cross-entropy on rows of {args.row_length} tokens. Each row
  packs whole documents (BOS + fortune + EOS, cut to {args.row_length} tokens) by best
  fit, and segment_pos restarts at 0 at every document, so the recurrence,
  Conv1D and attention never look across documents. Predictions across a
  document boundary and padding are masked out of the loss.
- {args.steps} AdamW steps of {args.batch} rows ({args.batch * args.row_length} tokens with padding),
  {epochs} passes over the training set (the last one partial); betas (0.9, 0.95), weight decay {args.weight_decay} on matrices
  only; learning rate warms up linearly to {args.lr} over {args.warmup} steps, then
  follows a cosine to a tenth of it; gradient norm clipped at 1.0.
- float32 throughout; weights rounded to bfloat16 only for export.
- During training only, `recurrentgemma.torch.layers.rnn_scan` is replaced
  by `stacked_rnn_scan` from the script. It computes the same float32
  recurrence (bit-identical outputs) with a backward pass linear in the
  sequence length; the official scan's backward is quadratic. Evaluation and
  sampling use the unmodified official code.
- Seed {args.seed} for torch's initialisation, the held-out split and the
  packing order.
- Wall time {train_seconds / 60:.1f} min of training with {args.threads} torch threads on
  {cpu} ({os.cpu_count()} cores, shared with other jobs),
  torch {versions["torch"]}, recurrentgemma {versions["recurrentgemma"]}.

## Results

Computed by the official PyTorch model in float32 on the exported bfloat16 weights:

- Final training loss (mean of the last 50 steps, float32 weights): {final_train_loss:.4f}
- Held-out loss over all {int(heldout.sum())} held-out fortunes: {heldout_split_loss:.4f}
- Held-out loss over the fixed token set in `tests/data/tiny_heldout.npz`
  ({args.heldout_rows} rows x {args.heldout_length} tokens): {golden_loss:.6f}. Half of its rows are
  the longest held-out fortunes (long poems and stories, cut to {args.heldout_length} tokens),
  which is why it is higher than the loss over the whole held-out split.

Losses are mean natural-log cross-entropy per token.

## Samples

From `recurrentgemma.torch.sampler.Sampler` (BOS + prompt, 64 steps, stops at
EOS) on the exported weights; sampled means unmodified softmax sampling with
`torch.manual_seed({args.seed})`.

{chr(10).join(sample_lines)}
## Reproduce

```
apt-get update && apt-get install -y {FORTUNE_PACKAGE}
make tools-env
.venv-ref/bin/python tools/train_tiny.py
```

The script rewrites this directory and `tests/data/tiny_heldout.npz`.
Another CPU or torch build can change the last bits of the weights, and then
the losses above.
"""
    with open(os.path.join(args.out, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(card)


def _dpkg_version(package: str) -> str:
    import subprocess

    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                                capture_output=True, text=True, check=True)
        return result.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
