"""`python -m rgref.generate` end to end, on a random model with a small tokenizer."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rgref import generate
from rgref.config import Config
from rgref.random_model import random_model
from rgref.saving import save
from rgref.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = """The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
All that glitters is not gold. Fortune favours the bold.
Time flies like an arrow; fruit flies like a banana.
""" * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random model directory with a SentencePiece tokenizer that has Gemma's ids."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("checkpoint")
    corpus = directory / "corpus.txt"
    corpus.write_text(TEXT)
    sentencepiece.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=60,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2, num_threads=1)
    config = Config(vocab_size=64, width=16, mlp_width=32, num_heads=2, lru_width=16,
                    block_types=("recurrent", "recurrent", "attention"), attention_window=8)
    model = random_model(config, seed=3)
    # Zero the stop tokens' embedding rows: their logit is then 0, below the greedy
    # pick's, so greedy generation runs until max_new_tokens or Ctrl-C.
    tokenizer = Tokenizer(directory / "tokenizer.model")
    for stop in (tokenizer.eos_id, tokenizer.end_of_turn_id):
        model.params["model.embed_tokens.weight"][stop] = 0
    save(model, directory)
    return directory


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "rgref.generate", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_generates_text(checkpoint):
    result = run("The quick", "--model", str(checkpoint), "--max-new-tokens", "12",
                 "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tok/s" in result.stderr
    assert "time to first token" in result.stderr
    assert "Traceback" not in result.stderr


def test_seed_reproducible(checkpoint):
    args = ("A journey", "--model", str(checkpoint), "--max-new-tokens", "15", "--seed", "9",
            "--temperature", "1.0")
    assert run(*args).stdout == run(*args).stdout


def test_greedy_matches_library(checkpoint):
    result = run("All that", "--model", str(checkpoint), "--max-new-tokens", "10",
                 "--temperature", "0")
    import rgref
    from rgref.sampling import generate as library_generate

    tokenizer = Tokenizer(checkpoint / "tokenizer.model")
    ids = tokenizer.encode("All that", add_bos=True)
    expected = library_generate(rgref.load(checkpoint), [ids], 10,
                                stop_ids=[tokenizer.eos_id, tokenizer.end_of_turn_id])
    assert result.stdout == tokenizer.decode(expected.tokens[0]) + "\n"


def test_prompt_from_stdin_and_file(checkpoint, tmp_path):
    piped = run("--model", str(checkpoint), "--max-new-tokens", "5", "--temperature", "0",
                stdin="Time flies")
    dash = run("-", "--model", str(checkpoint), "--max-new-tokens", "5", "--temperature", "0",
               stdin="Time flies")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Time flies")
    from_file = run("--prompt-file", str(prompt_file), "--model", str(checkpoint),
                    "--max-new-tokens", "5", "--temperature", "0")
    argument = run("Time flies", "--model", str(checkpoint), "--max-new-tokens", "5",
                   "--temperature", "0")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == dash.stdout == from_file.stdout == argument.stdout


def test_help_explains_options():
    result = run("--help")
    assert result.returncode == 0
    for option in ("--model", "--chat", "--max-new-tokens", "--temperature", "--top-k",
                   "--top-p", "--seed", "--interactive", "--dtype"):
        assert option in result.stdout


def test_bundled_model_is_default():
    parser = generate.build_parser()
    assert parser.parse_args(["x"]).model is None
    assert os.path.isdir(generate.BUNDLED_MODEL) or not os.path.exists(generate.BUNDLED_MODEL)


# ---------------------------------------------------------------- bad input

def assert_one_line_error(result, pattern):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines()
             if line and not line.startswith("rgref: using")]
    assert len(lines) == 1 or lines[-1].startswith("python -m rgref.generate: error"), \
        result.stderr
    assert pattern in lines[-1], result.stderr


def test_missing_model_directory(tmp_path):
    assert_one_line_error(run("hi", "--model", str(tmp_path / "absent")), "does not exist")


def test_directory_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    result = run("hi", "--model", str(tmp_path))
    assert_one_line_error(result, "error")


def test_not_a_checkpoint_with_tokenizer(checkpoint, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    result = run("hi", "--model", str(tmp_path))
    assert_one_line_error(result, "is it a RecurrentGemma checkpoint directory")


def test_missing_tokenizer(checkpoint, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    assert_one_line_error(run("hi", "--model", str(tmp_path)), "tokenizer file")


def test_corrupt_tokenizer(checkpoint, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    assert_one_line_error(run("hi", "--model", str(tmp_path)), "not a valid SentencePiece")


def test_tokenizer_larger_than_vocabulary(checkpoint, tmp_path):
    for name in ("model.safetensors", "tokenizer.model"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    config["vocab_size"] = 50
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = run("hi", "--model", str(tmp_path))
    assert_one_line_error(result, "error")


def test_empty_prompt(checkpoint):
    assert_one_line_error(run("   ", "--model", str(checkpoint)), "prompt is empty")
    assert_one_line_error(run("--model", str(checkpoint), stdin=""), "prompt is empty")


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "-1", "must be >= 0"),
    ("--temperature", "hot", "expected a number"),
    ("--top-p", "0", "must be in (0, 1]"),
    ("--top-p", "1.5", "must be in (0, 1]"),
    ("--top-k", "-3", "integer >= 0"),
    ("--max-new-tokens", "0", "positive integer"),
    ("--seed", "-1", "integer >= 0"),
])
def test_invalid_option_values(checkpoint, option, value, message):
    result = run("hi", "--model", str(checkpoint), option, value)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_prompt_and_prompt_file_conflict(checkpoint, tmp_path):
    (tmp_path / "p.txt").write_text("x")
    assert_one_line_error(run("hi", "--prompt-file", str(tmp_path / "p.txt"), "--model",
                              str(checkpoint)), "not both")


def test_missing_prompt_file(checkpoint, tmp_path):
    assert_one_line_error(run("--prompt-file", str(tmp_path / "none.txt"), "--model",
                              str(checkpoint)), "cannot read prompt file")


def test_ctrl_c_stops_cleanly(checkpoint):
    process = subprocess.Popen(
        [sys.executable, "-m", "rgref.generate", "The quick", "--model", str(checkpoint),
         "--max-new-tokens", "1000000", "--temperature", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    first = process.stdout.read(1)               # wait until text is streaming
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert first + stdout


def test_interactive_reuses_state(checkpoint):
    result = run("--model", str(checkpoint), "--interactive", "--max-new-tokens", "6",
                 "--temperature", "0", stdin="Hello there\nAnd again\n/exit\n")
    assert result.returncode == 0, result.stderr
    fed = re.findall(r"rgref: fed (\d+) new tokens \(of (\d+) in the conversation\)",
                     result.stderr)
    assert len(fed) == 2, result.stderr
    # The second turn feeds only its new tokens, not the whole conversation.
    (first_new, first_total), (second_new, second_total) = [map(int, f) for f in fed]
    assert first_new == first_total
    assert second_new < second_total
    assert len(result.stdout.splitlines()) == 2


def test_backend_options(checkpoint):
    outputs = []
    for backend in ("numpy", "auto"):
        result = run("Fortune", "--model", str(checkpoint), "--max-new-tokens", "8",
                     "--temperature", "0", "--backend", backend, "--threads", "1")
        assert result.returncode == 0, result.stderr
        assert "rgref: backend" in result.stderr
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    result = run("x", "--model", str(checkpoint), "--backend", "c", "--compute-dtype", "float64")
    assert_one_line_error(result, "computes in float32")


# ------------------------------------------------- broken checkpoints on the CLI

def copy_checkpoint(source, target):
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        (target / name).write_bytes((source / name).read_bytes())


def test_cli_truncated_safetensors(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert_one_line_error(run("hi", "--model", str(tmp_path)), "model.safetensors")


def test_cli_index_names_missing_shard(checkpoint, tmp_path):
    import rgref

    save(rgref.load(checkpoint), tmp_path, max_shard_bytes=10_000)
    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    os.remove(sorted(tmp_path.glob("model-*-of-*.safetensors"))[0])
    assert_one_line_error(run("hi", "--model", str(tmp_path)), "does not exist")


def test_cli_wrong_shape(checkpoint, tmp_path):
    import safetensors.numpy

    copy_checkpoint(checkpoint, tmp_path)
    tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    tensors["model.final_norm.weight"] = np.zeros(17, np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    assert_one_line_error(run("hi", "--model", str(tmp_path)),
                          "model.final_norm.weight has shape (17,), expected (16,)")


def test_cli_config_contradicts_weights(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 2 * 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("hi", "--model", str(tmp_path)), "expected")


def test_cli_forbidden_pickle(checkpoint, tmp_path):
    """A .pt whose pickle would run a command is rejected and the command never runs."""
    import zipfile

    marker = tmp_path / "ran"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    with zipfile.ZipFile(tmp_path / "2b.pt", "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", "3\n")
    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    assert_one_line_error(run("hi", "--model", str(tmp_path / "2b.pt")), "os.system")
    assert not marker.exists()


def test_no_prompt_at_terminal_starts_a_document(checkpoint, monkeypatch, capsys):
    """Without a prompt or piped input, generation starts from BOS alone."""
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    args = generate.build_parser().parse_args(["--model", str(checkpoint)])
    assert generate.read_prompt(args) == ""
    chat = generate.build_parser().parse_args(["--model", str(checkpoint), "--chat"])
    with pytest.raises(generate.UsageError, match="--chat needs a message"):
        generate.read_prompt(chat)
    assert generate.main(["--model", str(checkpoint), "--max-new-tokens", "5",
                          "--temperature", "0"]) == 0
    output = capsys.readouterr()
    assert "generating from the start of a document" in output.err
    assert "generated 5 tokens" in output.err


def test_kaggle_file_with_preset(checkpoint, tmp_path):
    """A .pt checkpoint whose shapes match no preset loads with --preset."""
    fixtures = os.path.join(REPO, "tests", "data", "torch")
    (tmp_path / "2b.pt").write_bytes(pathlib.Path(fixtures, "griffin_tiny.pt").read_bytes())
    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    assert_one_line_error(run("hi", "--model", str(tmp_path)), "pass the preset")
    # With the preset the checkpoint loads; this tiny fixture's 32-token vocabulary is then
    # too small for the tokenizer, the next check the command makes.
    result = run("hi", "--model", str(tmp_path), "--preset", "recurrentgemma-2b")
    assert_one_line_error(result, "the model's embedding has 32 rows")


def test_preset_with_config_json(checkpoint):
    result = run("hi", "--model", str(checkpoint), "--preset", "recurrentgemma-2b")
    assert_one_line_error(result, "applies only to a checkpoint without config.json")


def test_config_json_as_model(checkpoint):
    result = run("hi", "--model", str(checkpoint / "config.json"))
    assert_one_line_error(result, "config.json is not a weights file")
