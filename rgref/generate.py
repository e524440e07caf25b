"""Generate text with a RecurrentGemma model on the CPU: `python -m rgref.generate`.

Generated text goes to stdout as it is produced; everything else (which model,
load time, speed, errors) goes to stderr, so `> out.txt` keeps only the text.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings

import numpy as np

from rgref.config import PRESET_NAMES

PROG = "python -m rgref.generate"
BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny")
TOKENIZER_FILE = "tokenizer.model"


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# =============================================================================
# Command line
# =============================================================================

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 means greedy), got {text}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with a RecurrentGemma model on the CPU. Without --model, "
                    "uses the small model bundled with rgref.",
        epilog="examples:\n"
               f"  {PROG} \"The secret of a happy life is\"\n"
               f"  {PROG} --model ~/models/recurrentgemma-2b-it --chat \"Write a haiku.\"\n"
               f"  {PROG} --model ~/models/recurrentgemma-2b-it --interactive\n"
               f"  echo \"Once upon a time\" | {PROG} --max-new-tokens 50",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?",
                        help="prompt text; '-' or omitted with piped input reads standard input")
    parser.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    parser.add_argument("--model", metavar="PATH",
                        help="checkpoint directory (Hugging Face or Kaggle layout), or its "
                             "weights file: .safetensors (a shard or the index loads every "
                             "shard) or PyTorch .pt (default: the bundled small model)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help=f"SentencePiece model (default: {TOKENIZER_FILE} beside the "
                             "weights)")
    parser.add_argument("--preset", metavar="NAME", choices=PRESET_NAMES,
                        help="for a checkpoint without config.json (a Kaggle .pt file): the "
                             "preset that supplies the attention window, soft cap and "
                             "embedding scale, one of " + ", ".join(PRESET_NAMES) +
                             " (default: the preset whose shapes match)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the instruction-tuned chat format "
                             "(for -it checkpoints)")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="chat turn by turn on the terminal, keeping the model state "
                             "between turns (/reset starts over, /exit or Ctrl-D quits)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, metavar="N",
                        help="maximum number of tokens to generate per reply (default: 200)")
    parser.add_argument("--temperature", type=temperature, default=0.8, metavar="T",
                        help="sampling temperature; 0 picks the most likely token "
                             "(greedy) (default: 0.8)")
    parser.add_argument("--top-k", type=non_negative_int, default=40, metavar="K",
                        help="sample only among the K most likely tokens; 0 disables "
                             "(default: 40)")
    parser.add_argument("--top-p", type=probability, default=0.95, metavar="P",
                        help="sample only among the most likely tokens whose probabilities "
                             "sum to P, in (0, 1]; 1 disables (default: 0.95)")
    parser.add_argument("--seed", type=non_negative_int, metavar="S",
                        help="random seed that makes sampling reproducible (default: a new "
                             "seed each run, reported on stderr)")
    parser.add_argument("--dtype", choices=("stored", "bfloat16"), default="stored",
                        help="weights dtype in memory: 'stored' keeps the checkpoint's dtype "
                             "(memory-mapped, no copy); 'bfloat16' narrows a float32 "
                             "checkpoint at load, halving its memory (default: stored)")
    parser.add_argument("--compute-dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of activations and arithmetic (default: float32)")
    parser.add_argument("--backend", choices=("auto", "c", "numpy"), default="auto",
                        help="'c' runs the compiled kernels, 'numpy' the NumPy reference; "
                             "'auto' uses the kernels when they are built (default: auto)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="threads for the compiled kernels (default: OMP_NUM_THREADS, "
                             "else one per core)")
    return parser


# =============================================================================
# Input
# =============================================================================

def read_prompt(args) -> str | None:
    """Return the prompt text: "" to start from BOS alone, None in interactive mode."""
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise UsageError("give the prompt either as an argument or with --prompt-file, "
                             "not both")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {args.prompt_file}: {e}") from None
    elif args.prompt == "-" or (args.prompt is None and not args.interactive
                                and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif args.prompt is None:
        if args.interactive:
            return None
        if args.chat:
            raise UsageError("no prompt given; --chat needs a message as an argument, with "
                             "--prompt-file or on standard input")
        # No prompt at a terminal: generate a document from its start (BOS alone).
        return ""
    else:
        text = args.prompt
    if not text.strip():
        raise UsageError("the prompt is empty; give some text to continue")
    return text


def load_model_and_tokenizer(args):
    """Load the checkpoint and its tokenizer, or raise UsageError saying what is wrong."""
    from rgref.config import ConfigError
    from rgref.loading import CheckpointError, load
    from rgref.tokenizer import Tokenizer, TokenizerError

    if args.backend == "c" and args.compute_dtype != "float32":
        raise UsageError(f"--backend c computes in float32 only; pass --backend numpy or auto "
                         f"with --compute-dtype {args.compute_dtype}")
    path = args.model
    if path is None:
        path = BUNDLED_MODEL
        print(f"rgref: using the bundled small model ({path}); pass --model PATH to run a "
              "RecurrentGemma checkpoint", file=sys.stderr)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise UsageError(f"model path {path} does not exist")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"model directory {path} is not readable")

    tokenizer_path = args.tokenizer or os.path.join(
        path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), TOKENIZER_FILE)
    try:
        tokenizer = Tokenizer(tokenizer_path)
        model = load(path, dtype=np.dtype(args.compute_dtype), preset=args.preset,
                     weights_dtype=None if args.dtype == "stored" else args.dtype,
                     progress=ProgressBar("narrowing weights to bfloat16"))
    except (CheckpointError, ConfigError, TokenizerError) as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    model.backend = args.backend
    model.num_threads = args.threads
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = model.resolve_backend()
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    for warning in caught:
        print(f"rgref: warning: {warning.message}", file=sys.stderr)
    print(f"rgref: backend {backend}", file=sys.stderr)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} pieces but the "
                         f"model's embedding has {model.config.vocab_size} rows; they do not "
                         "belong together (pass the matching --tokenizer)")
    return model, tokenizer


# =============================================================================
# Output
# =============================================================================

class TextStream:
    """Write decoded text to stdout as tokens arrive.

    SentencePiece joins pieces with context (spaces, bytes of one UTF-8
    character), so the whole reply is decoded each time and only the new
    suffix is written; a trailing partial character waits for its next byte.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = sys.stdout if out is None else out   # looked up now, not at import
        self.ids: list[int] = []
        self.written = 0

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.written:] + "\n")
        self.out.flush()
        self.ids, self.written = [], 0


class ProgressBar:
    """A one-line progress report on stderr, shown only once work lasts over half a second."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.perf_counter()
        self.last_update = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.start < 0.5 or (now - self.last_update < 0.2 and done < total):
            return
        self.last_update = now
        width = 30
        filled = width * done // max(total, 1)
        print(f"\rrgref: {self.label} [{'#' * filled}{'.' * (width - filled)}] "
              f"{done / 1e9:.1f}/{total / 1e9:.1f} GB", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.1f} tok/s" if seconds > 0 else "n/a"


# =============================================================================
# Modes
# =============================================================================

def run_once(model, tokenizer, prompt: str, args, sampling, seed: int) -> None:
    from rgref.sampling import generate

    if args.chat:
        ids = tokenizer.encode_chat([("user", prompt)])
    else:
        ids = tokenizer.encode(prompt, add_bos=True)
        if not prompt:
            print("rgref: no prompt given; generating from the start of a document",
                  file=sys.stderr)
    stream = TextStream(tokenizer)
    stop_ids = [i for i in (tokenizer.eos_id, tokenizer.end_of_turn_id) if i is not None]
    first_token_time = []
    start = time.perf_counter()

    def on_step(step_ids, active):
        if not first_token_time:
            first_token_time.append(time.perf_counter() - start)
        if active[0] and int(step_ids[0]) not in stop_ids:
            stream.add(int(step_ids[0]))

    try:
        result = generate(model, [ids], args.max_new_tokens, sampling=sampling,
                          stop_ids=stop_ids, seed=seed, pad_id=tokenizer.pad_id,
                          on_step=on_step)
    finally:
        stream.finish()
    generated = len(result.tokens[0])
    print(f"rgref: prompt {result.prompt_tokens} tokens in {result.prefill_seconds:.2f} s "
          f"({rate(result.prompt_tokens, result.prefill_seconds)}); generated {generated} "
          f"tokens in {result.decode_seconds:.2f} s ({rate(generated, result.decode_seconds)}); "
          f"time to first token {first_token_time[0]:.2f} s; seed {seed}", file=sys.stderr)


def run_interactive(model, tokenizer, first_prompt: str | None, args, sampling,
                    seed: int) -> None:
    from rgref.chat import ChatSession

    if not tokenizer.has_chat_pieces:
        raise UsageError(f"tokenizer {tokenizer.path} has no <start_of_turn>/<end_of_turn> "
                         "pieces, so --interactive cannot format a chat")
    session = ChatSession(model, tokenizer, sampling, seed)
    print("rgref: interactive chat; /reset starts over, /exit or Ctrl-D quits",
          file=sys.stderr)
    prompt = first_prompt
    while True:
        if prompt is None:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                if sys.stdin.isatty():
                    print(file=sys.stderr)
                return
            prompt = line.rstrip("\n")
        if prompt.strip() == "/exit":
            return
        if prompt.strip() == "/reset":
            session = ChatSession(model, tokenizer, sampling, seed)
            print("rgref: conversation reset", file=sys.stderr)
            prompt = None
            continue
        if prompt.strip():
            stream = TextStream(tokenizer)
            fed_before = len(session.fed_tokens)
            start = time.perf_counter()
            try:
                reply = session.send(prompt, args.max_new_tokens, on_token=stream.add)
            finally:
                stream.finish()
            elapsed = time.perf_counter() - start
            print(f"rgref: fed {len(session.fed_tokens) - fed_before} new tokens (of "
                  f"{len(session.fed_tokens)} in the conversation); replied "
                  f"{len(reply.tokens[0])} tokens at {rate(len(reply.tokens[0]), reply.decode_seconds)}"
                  f"; {elapsed:.2f} s", file=sys.stderr)
        prompt = None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rgref.sampling import SamplingParams

    try:
        prompt = read_prompt(args)
        start = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(args)
        print(f"rgref: loaded {model} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k or None,
                                  top_p=args.top_p)
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        if args.chat and not tokenizer.has_chat_pieces:
            raise UsageError(f"tokenizer {tokenizer.path} has no <start_of_turn>/"
                             "<end_of_turn> pieces, so --chat cannot format a chat")
        if args.interactive:
            run_interactive(model, tokenizer, prompt, args, sampling, seed)
        else:
            run_once(model, tokenizer, prompt, args, sampling, seed)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nrgref: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly like other Unix tools.
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
